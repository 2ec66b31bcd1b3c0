"""Corpus-size sweep of the char-LM: epoch time and peak RSS at 0.15, 10 and 100 MB of text.

Run: .venv/bin/python -m benchmarks.scale   (about 7 min here; results in benchmarks/SCALE.md)
Children run pinned as the speed rules ask (``taskset -c 0``,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``). The corpora are Alice repeated to the size
asked (cut at a line end), in a temporary directory. The model is the tutorial's
(SimpleRNN(128), 10-char windows, step 1, batch 128, RMSprop).

1. Memory, one fresh child per size, so that its peak RSS (``VmHWM``) is its own: the
   pipeline (read and clean, vocabulary and encode, windows; timed), then the fused epoch
   compiled and run over ``--num_batches`` batches. Like the experiment, the child keeps the
   text and the host tokens alive.
2. Time, one child holding every size, the contenders interleaved: partial epochs of
   ``--num_batches`` and of a quarter as many batches of the real shuffled epoch, ``--repeats``
   times each. t(k) = fixed + k x per_batch gives the time per batch (min and median) and the
   fixed cost per epoch (the shuffle's permutation, up to 2**20 examples; beyond, the shuffle is
   computed batch by batch and nothing else in the epoch grows with the corpus), so an epoch is
   fixed + batches x per_batch. Corpora up to ``--full_epoch_max_mb`` also run one whole epoch,
   measured, to check that extrapolation.
For comparison, the tutorial's boolean one-hot arrays take examples x (seq_len + 1) x
vocabulary bytes. Results also go to benchmarks/out/scale.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

from benchmarks._common import peak_rss_mb
from experiments import char_lm
from rnn_jax import data, optim, train
from rnn_jax.batches import shuffled_epoch

_SIZES = flags.DEFINE_list("sizes_mb", ["0.15", "10", "100"], "Corpus sizes in MB (10**6 B).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 2000, "Batches per timed partial epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed partial epochs per size.")
_FULL_MAX = flags.DEFINE_float(
    "full_epoch_max_mb", 10.0, "Also time one whole epoch for corpora up to this size."
)
_TEXT = flags.DEFINE_string("text", None, "Text to repeat (default: the alice corpus's book).")
_PIN = flags.DEFINE_bool("pin", True, "Run the children with taskset -c 0, single-threaded XLA.")
_OUT = flags.DEFINE_string("out", "benchmarks/out/scale.json", "Where results are written.")
_MEMORY_OF = flags.DEFINE_string("memory_of", None, "Internal: phase 1 on this corpus file.")
_TIME_OF = flags.DEFINE_list("time_of", None, "Internal: phase 2 on these corpus files.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = char_lm.Config()  # the tutorial's model and batch


def _timed(fn, *args):
    tic = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - tic


class _Run:
    """One corpus made ready to train: windows, state, and epochs of any number of batches."""

    def __init__(self, path: str):
        tic = time.perf_counter()
        self.text = data.load_text(path, min_length=_CONFIG.seq_len + 1)
        vocab = data.Vocabulary.from_text(self.text)
        self.tokens = vocab.encode(self.text)
        self.windows = jax.block_until_ready(
            data.make_windows(self.tokens, _CONFIG.seq_len, _CONFIG.step)
        )
        self.pipeline_s = time.perf_counter() - tic
        self.examples = int(self.windows.starts.shape[0])
        self.batches = -(-self.examples // _CONFIG.batch_size)
        _, model = char_lm.make_model(_CONFIG, vocab.size)
        self.loss_fn, self.optimizer = char_lm.make_loss(model), optim.rmsprop()
        self.state = train.create_train_state(
            model.init(jax.random.PRNGKey(0)), self.optimizer, jax.random.PRNGKey(1)
        )
        self.facts = {
            "file_bytes": os.path.getsize(path),
            "chars": len(self.text),
            "vocab": vocab.size,
            "examples": self.examples,
            "batches_per_epoch": self.batches,
            "one_hot_gb": self.examples * (_CONFIG.seq_len + 1) * vocab.size / 1e9,
        }

    def epoch(self, num_batches):
        """``(compiled epoch over the first num_batches batches (None: all), compile seconds)``."""
        batches = shuffled_epoch(
            lambda w, idx: data.get_window_batch(w, idx, _CONFIG.seq_len),
            self.examples,
            _CONFIG.batch_size,
            num_batches=num_batches,
        )
        trainer = train.make_trainer(self.loss_fn, self.optimizer, batches)
        return _timed(lambda: jax.jit(trainer.__call__).lower(self.state, self.windows).compile())

    def run(self, epoch) -> float:
        (self.state, self.metrics), seconds = _timed(epoch, self.state, self.windows)
        return seconds


def measure_memory(path: str, num_batches: int) -> dict:
    start = peak_rss_mb()
    run = _Run(path)
    pipeline_mb = peak_rss_mb()
    epoch, compile_s = run.epoch(min(num_batches, run.batches))
    run.run(epoch)
    return {
        **run.facts,
        "pipeline_s": run.pipeline_s,
        "compile_s": compile_s,
        "rss_start_mb": start,
        "rss_pipeline_mb": pipeline_mb,
        "rss_peak_mb": peak_rss_mb(),
    }


def measure_time(paths, num_batches: int, repeats: int, full_max_bytes: float) -> list[dict]:
    runs = [_Run(path) for path in paths]
    plans = []
    for run in runs:
        k = min(num_batches, run.batches)
        quarter = max(1, k // 4)
        plans.append({k: run.epoch(k)[0], quarter: run.epoch(quarter)[0]})
    times = [{k: [] for k in plan} for plan in plans]
    for _ in range(repeats):  # every size, both lengths, in turn
        for run, plan, seconds in zip(runs, plans, times):
            for k, epoch in plan.items():
                seconds[k].append(run.run(epoch))
    results = []
    for run, seconds in zip(runs, times):
        k, quarter = max(seconds), min(seconds)
        row = {**run.facts, "timed_batches": [quarter, k], "partial_epoch_s": seconds}
        for name, stat in (("min", min), ("median", statistics.median)):
            per_batch = (stat(seconds[k]) - stat(seconds[quarter])) / max(k - quarter, 1)
            row[f"ms_per_batch_{name}"] = 1e3 * per_batch
            row[f"fixed_s_{name}"] = max(stat(seconds[quarter]) - quarter * per_batch, 0.0)
        row["epoch_s_extrapolated"] = (
            row["fixed_s_min"] + 1e-3 * row["ms_per_batch_min"] * run.batches
        )
        if run.facts["file_bytes"] <= full_max_bytes:
            row["epoch_s_measured"] = run.run(run.epoch(None)[0])
        row["loss"] = float(run.metrics["loss"])
        results.append(row)
    return results


def _make_corpus(source: bytes, size: int, path: str):
    """``source`` repeated to ``size`` bytes, cut after the last line end within them."""
    body = (source * -(-size // len(source)))[:size]
    with open(path, "wb") as f:
        f.write(body[: body.rfind(b"\n") + 1])


def _table(rows) -> str:
    lines = [
        "| corpus | examples | pipeline s | ms/batch min (median) | steps/s | epoch s | "
        "µs/char | peak RSS MB | RSS - 13 B/char MB | one-hot GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = r.get("epoch_s_measured")
        epoch = r["epoch_s_extrapolated"]
        shown = f"{measured:.1f} (extrap. {epoch:.1f})" if measured else f"{epoch:.1f} (extrap.)"
        rest = r["rss_peak_mb"] - 13 * r["chars"] / 2**20
        lines.append(
            f"| {r['file_bytes'] / 1e6:.3g} MB | {r['examples']:,} | {r['pipeline_s']:.1f} | "
            f"{r['ms_per_batch_min']:.3f} ({r['ms_per_batch_median']:.3f}) | "
            f"{1e3 / r['ms_per_batch_min']:.0f} | {shown} | "
            f"{1e6 * (measured or epoch) / r['chars']:.2f} | "
            f"{r['rss_peak_mb']:.0f} | {rest:.0f} | {r['one_hot_gb']:.1f} |"
        )
    return "\n".join(lines)


def _child(prefix, env, args) -> list:
    cmd = [*prefix, sys.executable, "-m", "benchmarks.scale", *args]
    run = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _MEMORY_OF.value:
        print(json.dumps(measure_memory(_MEMORY_OF.value, _NUM_BATCHES.value)))
        return
    if _TIME_OF.value:
        rows = measure_time(
            _TIME_OF.value, _NUM_BATCHES.value, _REPEATS.value, _FULL_MAX.value * 1e6
        )
        print(json.dumps(rows))
        return
    try:
        if _TEXT.value is None:  # the book's lines, as the recipe reads them
            with open(data.corpus_path("alice"), "rb") as f:
                source = data.gutenberg_body(f.read())
        else:
            with open(_TEXT.value, "rb") as f:
                source = f.read()
    except (data.TextError, OSError) as e:
        sys.exit(f"error: {e}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    prefix = []
    if _PIN.value:
        flags_now = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags_now} --xla_cpu_multi_thread_eigen=false".strip()
        prefix = ["taskset", "-c", "0"]
    common = [
        f"--num_batches={_NUM_BATCHES.value}",
        f"--repeats={_REPEATS.value}",
        f"--full_epoch_max_mb={_FULL_MAX.value}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for size_mb in map(float, _SIZES.value):
            paths.append(os.path.join(tmp, f"corpus_{size_mb:g}mb.txt"))
            _make_corpus(source, int(size_mb * 1e6), paths[-1])
        memory = [_child(prefix, env, [f"--memory_of={path}", *common]) for path in paths]
        timing = _child(prefix, env, [f"--time_of={','.join(paths)}", *common])
    rows = [{**m, **t} for m, t in zip(memory, timing)]
    print(_table(rows))
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(
            {"device": str(jax.devices()[0]), "pinned": _PIN.value, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    app.run(main)
