"""What every benchmark script shares: the pinned, single-threaded environment of the children
it times, the machine it names in its results, the text it reads, and the peak-memory reader."""

import os
import resource
import sys

from rnn_jax import data

# XLA's CPU backend single-threaded: with `taskset -c 0`, every contender on one core alone.
XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false"


def pinned_env(**extra: str) -> dict:
    """This process's environment with ``XLA_SINGLE_THREAD`` added to ``XLA_FLAGS``, and
    ``extra`` (e.g. ``JAX_PLATFORMS="cpu"``) set; for the children a benchmark starts under
    ``taskset``."""
    env = {**os.environ, **extra}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_SINGLE_THREAD).strip()
    return env


def pinned_module(module: str, *args: str) -> list[str]:
    """The command ``python -m module ARGS`` on core 0 alone (``taskset -c 0``), with this
    interpreter; start it with :func:`pinned_env`."""
    return ["taskset", "-c", "0", sys.executable, "-m", module, *args]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def read_text(text: str | None, min_length: int = 2) -> str:
    """The text a benchmark trains on: the file ``text`` read with the tutorial's cleaning, or
    (None) the alice corpus as the recipe reads it (:func:`rnn_jax.data.read_corpus`)."""
    if text is None:
        return data.read_corpus("alice")
    return data.load_text(text, min_length=min_length)


def text_args(text: str | None) -> list[str]:
    """The flags that give a child experiment or benchmark the same text."""
    return [] if text is None else [f"--text={text}"]


def text_name(text: str | None) -> str:
    """The text as a results page names it."""
    return text or "the alice corpus (rnn_jax.data.CORPORA, the book alone, tutorial cleaning)"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of /proc/self/status, not
    ``ru_maxrss``, which Linux carries over from the parent across fork and exec (``ru_maxrss``
    only where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
