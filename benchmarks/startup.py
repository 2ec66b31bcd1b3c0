"""Time to the first iteration: a cold run against a rerun that finds its compiled programs in the
persistent compilation cache (``--compilation_cache``, on by default for every experiment).

Run: .venv/bin/python -m benchmarks.startup   (about 3 min here; writes benchmarks/STARTUP.md)

Each round starts ``python -m experiments.char_lm`` with the default recipe for one iteration
twice, in turn: *cold*, with an empty cache directory (what a first run on a machine pays:
compiling the epoch, the sampler and the small programs around them), and *warm*, with a
directory that an earlier run filled (what a resume, or the same command again, pays). Both get
a fresh workdir, so both train the same first epoch from scratch. The figure is the wall time
from the start of the process to the line ``Iteration #: 1`` (the first epoch trained and its
100 characters generated), and the time the run itself reports for compiling the training
steps. Pinned as the speed rules ask: ``taskset -c 0`` and
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``; min and median over interleaved rounds.
"""

import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from absl import app, flags

from benchmarks._common import pinned_env, pinned_module

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved cold/warm rounds.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Results file (default: benchmarks/STARTUP.md).")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_to_first_iteration(cache: str) -> tuple[float, float]:
    """``(seconds to "Iteration #: 1", compile seconds the run reported)`` of one run."""
    with tempfile.TemporaryDirectory() as workdir:
        command = pinned_module(
            "experiments.char_lm",
            "--iterations=1",
            f"--workdir={workdir}",
            f"--compilation_cache={cache}",
        )
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=_ROOT,
            env=pinned_env(JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first, compiled = None, None
        for line in proc.stdout:
            if compiled is None and (
                m := re.match(r"compiled the training steps in (\S+) s", line)
            ):
                compiled = float(m.group(1))
            if line.startswith("Iteration #: 1"):
                first = time.perf_counter() - start
        proc.wait()
        if proc.returncode != 0 or first is None:
            raise RuntimeError(f"the run failed:\n{proc.stderr.read()[-3000:]}")
        return first, compiled


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="rnn_jax_startup_")
    try:
        warm_cache = os.path.join(root, "warm")
        time_to_first_iteration(warm_cache)  # fills it
        times = {"cold": [], "warm": []}
        compiled = {"cold": [], "warm": []}
        for r in range(_ROUNDS.value):
            for name in ("cold", "warm"):
                cache = os.path.join(root, f"cold-{r}") if name == "cold" else warm_cache
                seconds, compile_seconds = time_to_first_iteration(cache)
                times[name].append(seconds)
                compiled[name].append(compile_seconds)
                print(f"round {r + 1} {name}: {seconds:.2f} s (compile {compile_seconds:.2f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def row(name):
        t, c = times[name], compiled[name]
        return (
            f"| {name} | {min(t):.2f} / {statistics.median(t):.2f} | "
            f"{min(c):.2f} / {statistics.median(c):.2f} |"
        )

    ratio_median = statistics.median(times["cold"]) / statistics.median(times["warm"])
    ratio_min = min(times["cold"]) / min(times["warm"])
    lines = [
        "## Time to the first iteration: cold run vs rerun with the compilation cache",
        "",
        f"`python -m benchmarks.startup` ({_ROUNDS.value} interleaved rounds; "
        f"{platform.processor() or platform.machine()}, pinned to one core, single-threaded XLA).",
        "Default recipe (SimpleRNN 128 on Alice), one iteration, a fresh workdir each run.",
        "",
        "| run | to `Iteration #: 1`, min / median (s) | compile reported, min / median (s) |",
        "|---|---|---|",
        row("cold"),
        row("warm"),
        "",
        f"Cold / warm: {ratio_median:.2f}× by medians, {ratio_min:.2f}× by minima (target ≥ 2×).",
        "",
        "The warm run still imports JAX, reads and cleans the corpus, and trains and samples the",
        "first epoch (about 2 s of the total on this machine): only compilation is saved.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = _OUT.value or os.path.join(_ROOT, "benchmarks", "STARTUP.md")
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
