"""Strict numerics for every test (silent rank promotion is an error), the corpora, a read-only
directory, and the command line of the experiments."""

import contextlib
import os
import subprocess
import sys

import jax
import pytest
from helpers import tmpfs

from rnn_jax import data

jax.config.update("jax_numpy_rank_promotion", "raise")
# Eight CPU devices for the data-parallel tests, in this process: JAX reads it when its CPU
# backend starts, which no test has done yet. A computation not placed on a mesh runs on the
# first device, as with one.
jax.config.update("jax_num_cpu_devices", 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The copy of tiny Shakespeare this machine holds for tests (never part of the project).
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare.txt")


def pytest_configure(config):
    """Obtains the alice corpus once, before xdist's workers start (each would fetch it)."""
    if not hasattr(config, "workerinput"):
        # Where it cannot be obtained, the alice_path fixture skips, saying why.
        with contextlib.suppress(data.TextError):
            data.corpus_path("alice", log=lambda line: print(line, file=sys.stderr))


@pytest.fixture
def alice_path() -> str:
    """The alice corpus's file (rnn_jax.data.corpus_path: cached, or fetched once, checked by
    sha256); skips with the reason where it cannot be obtained."""
    try:
        return data.corpus_path("alice")
    except data.TextError as e:
        pytest.skip(str(e))


@pytest.fixture
def shakespeare_path() -> str:
    """This machine's copy of tiny Shakespeare, checked by sha256; skips where it is absent."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"no copy of tiny Shakespeare at {SHAKESPEARE}")
    return data.corpus_path("tiny_shakespeare", path=SHAKESPEARE)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory nothing can be written into: a read-only tmpfs where this machine
    mounts one (root ignores permissions), else one without write permission."""
    path = tmp_path / "read_only"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with tmpfs(path, "ro,size=64k"):
        yield path


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
    for proc in started:  # every pipe closed, read or not (an unclosed one warns when collected)
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if hasattr(stream, "close"):
                stream.close()
        proc.wait()
