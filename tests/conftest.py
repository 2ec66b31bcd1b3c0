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
