"""Strict numerics for every test (silent rank promotion is an error), the shipped corpus, and
the command line of the experiments."""

import os
import subprocess
import sys

import jax
import pytest

from rnn_jax.data import alice_path as _alice_path

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def alice_path() -> str:
    """The committed Alice corpus, sha256-checked (rnn_jax.data.alice_path)."""
    return _alice_path()


def _start_experiment(name: str, *args: str, cache: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"experiments.{name}", *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session")
def start_experiment(tmp_path_factory):
    """``start(name, *args) -> Popen``: ``python -m experiments.<name> ARGS`` from the repository
    root, its output piped (the command line itself is what such a test checks; everything
    else calls ``run`` in process). Killed at the end of the session if still running. The
    processes share one persistent compilation cache for the session (as reruns of a command
    do), not the user's."""
    started, cache = [], str(tmp_path_factory.mktemp("jax_compilation_cache"))

    def start(name: str, *args: str) -> subprocess.Popen:
        started.append(_start_experiment(name, *args, cache=cache))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _on_virtual_devices(test_file: str, count: int, keyword: str, passed: int) -> str:
    """Runs the tests of ``test_file`` selected by ``-k keyword`` in a child pytest whose JAX
    sees ``count`` virtual CPU devices; checks that ``passed`` of them passed and none was
    skipped; returns the child's output."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip(),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", test_file, "-k", keyword]
        + ["--durations=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"{passed} passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
    return run.stdout


@pytest.fixture(scope="session")
def on_virtual_devices():
    """``run(test_file, count, keyword, passed) -> output``: a file's multi-device tests in a
    child process that sees ``count`` virtual CPU devices (XLA's host platform device count
    must be set before JAX starts, so not in this process)."""
    return _on_virtual_devices
