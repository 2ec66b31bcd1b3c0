"""What every benchmark script shares: the pinned, single-threaded environment of the children
it times, and the machine it names in its results."""

import os
import sys

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
