"""Char-RNN benchmark: epoch time against the FLOP floor and against Keras 3, sampler, whole run.

Run: .venv/bin/python -m benchmarks.char_lm --keras_full_run
       (about 5 min here; writes benchmarks/RESULTS.md, the numbers to expect)
     .venv/bin/python -m benchmarks.char_lm --quick   (smoke run, about 1 min; writes nothing)

Everything runs pinned as the speed rules ask: the script re-executes itself under
``taskset -c 0`` with ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` (``--nopin`` to skip), and
its children (the Keras 3 worker, the experiment's whole run) inherit that. Contenders are timed
in one process and interleaved round by round; each number is the min and the median of
``--repeats`` rounds, wall clock (and process CPU time, which excludes time the shared core
spent on other processes).

- Epoch: one steady-state shuffled epoch of the default recipe (Alice, seq_len 10, step 1, 128
  units, batch 128, RMSprop) for each cell, compiled once by ``rnn_jax.train.make_trainer``
  over a ``shuffled_epoch``, from integer tokens (the row gather); the tutorial's one-hot float
  input path (``onehot(x) @ W``, built per batch on device) for comparison; and Keras 3 (JAX
  backend, ``model.fit``, one epoch, batch 128) in a worker process.
- Floor: epoch FLOPs / the rate of a large fp32 matmul (2048^3) timed in the same rounds with the
  same thread setting. FLOPs per example ``3 (2 H^2 k (T-1) + 2 H V)``, ``k`` the gate blocks
  (1, 4, 3), the first step's product with the zero carry not counted: 128.5, 500.5, 376.5
  GFLOP on Alice. The ratio uses the best matmul rate of the run (the lowest floor).
- Sampler: 100 greedy characters from a 10-char seed, for 1 seed and for 128 seeds at once;
  floor ``100 x 10 x 2 B H^2 k`` (the rolling window recomputes 10 steps per character);
  Keras: 100 ``model.predict`` calls on the window, as the tutorial generates.
- Whole run: ``python -m experiments.char_lm --val_fraction=0`` (the tutorial's recipe on the
  whole text: 25 iterations with generation, checkpoints), timed end to end; Keras estimated
  as 25 x (epoch + 100 predicts) from the medians
  (``--keras_full_run`` also times its whole run end to end).
- Peak RSS (VmHWM) of the experiment's whole run, of this process and of the Keras worker.
"""

import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks._common import (
    XLA_SINGLE_THREAD,
    cpu_name,
    peak_rss_mb,
    pinned_env,
    pinned_module,
    read_text,
    text_args,
    text_name,
)
from experiments import char_lm
from rnn_jax import data, optim, train
from rnn_jax.batches import shuffled_epoch
from rnn_jax.sample import make_sampler

_TEXT = flags.DEFINE_string(
    "text", None, "Text file (default: the alice corpus, read as the recipe reads it)."
)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 40-batch epochs, 2 rounds, no Keras.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds.", lower_bound=1)
_CELLS = flags.DEFINE_list("cells", ["simple_rnn", "lstm", "gru"], "Cells to time.")
_ONEHOT = flags.DEFINE_list("onehot_cells", ["simple_rnn"], "Cells also timed on one-hot inputs.")
_KERAS = flags.DEFINE_bool("keras", True, "Time Keras 3 (JAX backend) in a worker process.")
_KERAS_FULL = flags.DEFINE_bool(
    "keras_full_run", False, "Also time Keras's whole 25-iteration run."
)
_WHOLE = flags.DEFINE_bool("whole_run", True, "Time the experiment's whole default run.")
_PIN = flags.DEFINE_bool("pin", True, "Re-run pinned: taskset -c 0, single-threaded XLA.")
_OUT = flags.DEFINE_string(
    "out", None, "Results file (default: benchmarks/RESULTS.md; with --quick: none)."
)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MATMUL_N = 2048
_SAMPLE_CHARS, _SAMPLE_SEEDS = 100, 128
_BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}
_CONFIG = char_lm.Config()


def _pinned() -> bool:
    return os.sched_getaffinity(0) == {0} and XLA_SINGLE_THREAD in os.environ.get("XLA_FLAGS", "")


class Timings:
    """Wall and CPU seconds per contender, appended round by round."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def add(self, name, wall, cpu):
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)

    def time(self, name, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        self.add(name, time.perf_counter() - wall, time.process_time() - cpu)
        return out

    def stats(self, name):
        w, c = self.wall[name], self.cpu[name]
        return min(w), statistics.median(w), min(c), statistics.median(c)


class KerasWorker:
    """benchmarks/keras_reference.py --worker: one JSON answer per command."""

    def __init__(self, text_path):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.keras_reference",
            "--worker",
            *text_args(text_path),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=_ROOT,
            env=pinned_env(KERAS_BACKEND="jax"),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"the Keras worker exited ({self.proc.wait()}); see its stderr above")

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        out = self.ask("quit")
        self.proc.wait()
        return out


def _contenders(windows, vocab_size, num_batches):
    """Jitted epochs: {name: [epoch, state, cell]}; names ``cell`` and ``cell/onehot``."""
    out = {}
    for cell_name in _CELLS.value:
        for onehot in (False, True):
            if onehot and cell_name not in _ONEHOT.value:
                continue
            config = char_lm.Config(cell=cell_name)
            _, model = char_lm.make_model(config, vocab_size)
            optimizer = optim.rmsprop()

            def get_batch(w, idx, onehot=onehot):
                inputs, labels = data.get_window_batch(w, idx, _CONFIG.seq_len)
                if onehot:  # the tutorial's float one-hot inputs: project is x @ W
                    inputs = jax.nn.one_hot(inputs, vocab_size, dtype=jnp.float32)
                return inputs, labels

            batches = shuffled_epoch(
                get_batch,
                int(windows.starts.shape[0]),
                config.batch_size,
                num_batches=num_batches,
            )
            epoch = train.make_trainer(char_lm.make_loss(model), optimizer, batches)
            params = model.init(jax.random.PRNGKey(config.seed))
            state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1))
            out[cell_name + ("/onehot" if onehot else "")] = [epoch, state, cell_name]
    return out


def _epoch_flops(cell_name, vocab_size, num_examples):
    h, t, k = _CONFIG.units, _CONFIG.seq_len, _BLOCKS[cell_name]
    return num_examples * 3 * (2 * h * h * k * (t - 1) + 2 * h * vocab_size)


def _sampler_flops(cell_name, batch):
    return _SAMPLE_CHARS * _CONFIG.seq_len * 2 * batch * _CONFIG.units**2 * _BLOCKS[cell_name]


def _whole_run(text_path):
    """The experiment's default run, end to end, in a child; (seconds, peak RSS MB, last loss)."""
    with tempfile.TemporaryDirectory() as workdir:
        script = (
            "import atexit, sys, runpy\n"
            "from benchmarks._common import peak_rss_mb\n"
            "atexit.register(lambda: print('@@ rss', peak_rss_mb(), file=sys.stderr))\n"
            # Cold, as a first run is: no persistent compilation cache (benchmarks/startup.py
            # times what a warm one saves).
            # The tutorial trains on the whole text, as the Keras contender does: nothing held out.
            f"sys.argv = ['char_lm', '--workdir={workdir}', *{text_args(text_path)!r}, "
            "'--compilation_cache=none', '--val_fraction=0']\n"
            "runpy.run_module('experiments.char_lm', run_name='__main__')\n"
        )
        tic = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=_ROOT,
            env=pinned_env(KERAS_BACKEND="jax"),
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - tic
        if proc.returncode != 0:
            raise RuntimeError(f"the whole run failed:\n{proc.stderr[-3000:]}")
        rss = [
            float(line.split()[2]) for line in proc.stderr.splitlines() if line.startswith("@@ rss")
        ]
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
    return seconds, rss[-1] if rss else float("nan"), last["loss"]


def _keras_full_run(text_path):
    tic = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.keras_reference", *text_args(text_path)],
        cwd=_ROOT,
        env=pinned_env(KERAS_BACKEND="jax"),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - tic


def _machine():
    model = cpu_name()
    try:
        keras = f"keras {importlib.metadata.version('keras')}"
    except importlib.metadata.PackageNotFoundError:  # the optional "benchmark" dependency
        keras = "keras not installed"
    return (
        f"{model}, {os.cpu_count()} cores ({platform.machine()}), Linux {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, {keras}; affinity "
        f"{sorted(os.sched_getaffinity(0))}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )


def _fmt(seconds, unit="s"):
    return f"{seconds * 1e3:.2f} ms" if unit == "ms" else f"{seconds:.3f} s"


def run(argv_for_record):
    quick = _QUICK.value
    repeats = 2 if quick else _REPEATS.value
    text_path = _TEXT.value
    load_before = os.getloadavg()
    text = read_text(text_path, min_length=_CONFIG.seq_len + 1)
    vocab = data.Vocabulary.from_text(text)
    windows = data.make_windows(vocab.encode(text), _CONFIG.seq_len, _CONFIG.step)
    total_examples = int(windows.starts.shape[0])
    num_batches = 40 if quick else None  # quick: the first 40 batches of each shuffled epoch
    num_examples = min(total_examples, 40 * _CONFIG.batch_size) if quick else total_examples
    print(f"{len(text)} characters, vocabulary {vocab.size}, {num_examples} examples per epoch")

    timings = Timings()
    a = jax.random.normal(jax.random.PRNGKey(0), (_MATMUL_N, _MATMUL_N), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    contenders = _contenders(windows, vocab.size, num_batches)
    for name, c in contenders.items():  # compile, and one epoch of warm-up
        tic = time.perf_counter()
        c[1], _ = jax.block_until_ready(c[0](c[1], windows))
        print(f"compiled {name} + first epoch: {time.perf_counter() - tic:.1f} s")
    keras = KerasWorker(text_path) if _KERAS.value and not quick else None
    if keras:
        print(f"Keras worker ready: {keras.info}")

    losses = {}
    for round_ in range(repeats):
        for _ in range(3):
            timings.time("matmul", lambda: matmul(a))
        for name, c in contenders.items():
            c[1], metrics = timings.time(name, lambda c=c: c[0](c[1], windows))
            losses[name] = float(metrics["loss"])
        if keras:
            answer = keras.ask("epoch")
            timings.add("keras", answer["wall"], answer["cpu"])
            losses["keras"] = answer["loss"]
        names = list(contenders) + (["keras"] if keras else [])
        print(
            f"round {round_ + 1}/{repeats}: "
            + ", ".join(f"{n} {timings.wall[n][-1]:.3f}" for n in names)
        )

    # Sampler: 1 seed and 128 seeds, 100 greedy characters, interleaved with Keras's predicts.
    samplers = {}
    for cell_name in _CELLS.value:
        params = contenders[cell_name][1].params
        sample = make_sampler(
            char_lm.make_model(char_lm.Config(cell=cell_name), vocab.size)[0], _SAMPLE_CHARS
        )
        for batch in (1, _SAMPLE_SEEDS):
            seeds = windows.tokens[windows.starts[:batch, None] + jnp.arange(_CONFIG.seq_len)]
            jax.block_until_ready(sample(params, seeds, jax.random.PRNGKey(0)))
            samplers[f"{cell_name}/sample{batch}"] = (sample, params, seeds)
    for _ in range(repeats):
        for _ in range(3):
            timings.time("matmul", lambda: matmul(a))
        for name, (sample, params, seeds) in samplers.items():
            for _ in range(10 if seeds.shape[0] == 1 else 2):
                timings.time(name, lambda: sample(params, seeds, jax.random.PRNGKey(0)))
        if keras:
            answer = keras.ask("generate")
            timings.add("keras/generate", answer["wall"], answer["cpu"])

    whole = _whole_run(text_path) if _WHOLE.value and not quick else None
    keras_full = _keras_full_run(text_path) if keras and _KERAS_FULL.value else None
    keras_end = keras.close() if keras else None
    load_after = os.getloadavg()

    best_rate = 2 * _MATMUL_N**3 / min(timings.wall["matmul"])
    median_rate = 2 * _MATMUL_N**3 / statistics.median(timings.wall["matmul"])
    report = _report(
        timings,
        contenders,
        samplers,
        losses,
        vocab.size,
        num_examples,
        best_rate,
        median_rate,
        whole,
        keras_end,
        keras_full,
    )
    header = [
        "# Char-RNN benchmark" + (" (quick smoke run)" if quick else ""),
        "",
        f"Command: `{argv_for_record}`",
        (
            f"(runs pinned: `taskset -c 0`, `XLA_FLAGS={XLA_SINGLE_THREAD}`, for every contender)."
            if _pinned()
            else "(not pinned: --nopin; every core, multi-threaded XLA.)"
        ),
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {_machine()}.",
        f"Corpus: {text_name(text_path)} ({len(text)} characters after cleanup, "
        f"vocabulary {vocab.size}, "
        f"{num_examples} examples per epoch). Rounds: {repeats}, interleaved; min and median.",
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}: the machine is shared, so wall times carry "
        "noise from other processes; CPU time (this process only) is given beside them.",
        "",
    ]
    if quick:
        header += [
            "Quick run: epochs of 40 batches, whose fixed cost (the shuffle of every "
            "example) dominates, so the ratios here say nothing about the targets.",
            "",
        ]
    text_out = "\n".join(header + report) + "\n"
    print(text_out)
    out = _OUT.value or (None if quick else os.path.join(_ROOT, "benchmarks", "RESULTS.md"))
    if out:
        with open(out, "w") as f:
            f.write(text_out)
        print(f"written to {out}")


def _report(
    timings,
    contenders,
    samplers,
    losses,
    vocab_size,
    num_examples,
    best_rate,
    median_rate,
    whole,
    keras_end,
    keras_full,
):
    lines = [
        f"Large fp32 matmul ({_MATMUL_N}^3): best {best_rate / 1e9:.0f} GFLOP/s, median "
        f"{median_rate / 1e9:.0f} GFLOP/s. Floor = FLOPs / best rate.",
        "",
        "## Epoch (steady state, default recipe)",
        "",
        "| contender | GFLOP | floor | wall min | wall median | CPU min | min / floor "
        "| median / floor (median rate) | target ≤ 1.5x | loss after the run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in contenders.items():
        flops = _epoch_flops(c[2], vocab_size, num_examples)
        floor = flops / best_rate
        w_min, w_med, c_min, _ = timings.stats(name)
        ok = "yes" if w_min <= 1.5 * floor else "no"
        lines.append(
            f"| {name} | {flops / 1e9:.1f} | {_fmt(floor)} | {_fmt(w_min)} | {_fmt(w_med)} | "
            f"{_fmt(c_min)} | {w_min / floor:.2f}x | {w_med / (flops / median_rate):.2f}x | "
            f"{ok if '/' not in name else '-'} | {losses[name]:.4f} |"
        )
    keras = "keras" in timings.wall
    if keras:
        w_min, w_med, c_min, _ = timings.stats("keras")
        flops = _epoch_flops("simple_rnn", vocab_size, num_examples)
        lines.append(
            f"| Keras 3 SimpleRNN (model.fit) | {flops / 1e9:.1f} | {_fmt(flops / best_rate)} | "
            f"{_fmt(w_min)} | {_fmt(w_med)} | {_fmt(c_min)} | {w_min * best_rate / flops:.2f}x "
            f"| {w_med * median_rate / flops:.2f}x | - | {losses['keras']:.4f} |"
        )
        ours = timings.stats("simple_rnn")
        lines += [
            "",
            f"SimpleRNN vs Keras 3: {timings.stats('keras')[0] / ours[0]:.2f}x faster (min), "
            f"{timings.stats('keras')[1] / ours[1]:.2f}x (median); target ≥ 2x.",
        ]
    lines += [
        "",
        "## Sampler (100 greedy characters from a 10-char seed, one compiled call)",
        "",
        "| contender | seeds | GFLOP | floor | wall min | wall median | min / floor | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, seeds) in samplers.items():
        cell_name, batch = name.split("/")[0], seeds.shape[0]
        flops = _sampler_flops(cell_name, batch)
        w_min, w_med, _, _ = timings.stats(name)
        if batch == 1:
            target = "≤ 1 ms: " + ("yes" if w_min <= 1e-3 else "no")
        else:
            target = "≤ 1.5x floor: " + ("yes" if w_min <= 1.5 * flops / best_rate else "no")
        lines.append(
            f"| {cell_name} | {batch} | {flops / 1e9:.2f} | {_fmt(flops / best_rate, 'ms')} | "
            f"{_fmt(w_min, 'ms')} | {_fmt(w_med, 'ms')} | {w_min * best_rate / flops:.2f}x | "
            f"{target if cell_name == 'simple_rnn' else '-'} |"
        )
    if keras:
        w_min, w_med, _, _ = timings.stats("keras/generate")
        lines.append(
            f"| Keras 3 SimpleRNN, 100 x model.predict | 1 | - | - | {_fmt(w_min, 'ms')} "
            f"| {_fmt(w_med, 'ms')} | - | - |"
        )
    title = "## Whole default run (25 iterations of one epoch + 100 generated characters)"
    lines += ["", title, ""]
    if whole:
        seconds, rss, loss = whole
        lines.append(
            f"- rnn_jax `python -m experiments.char_lm` (defaults, checkpoints, compile "
            f"included): {seconds:.1f} s, final loss {loss:.4f}, peak RSS {rss:.0f} MB."
        )
    if keras:
        estimate = 25 * (timings.stats("keras")[1] + timings.stats("keras/generate")[1])
        lines.append(
            f"- Keras 3, estimated as 25 x (median epoch + median 100 predicts): "
            f"{estimate:.1f} s (no start-up or compile counted)."
        )
        if whole:
            lines.append(
                f"- Ratio rnn_jax / Keras 3 (estimate): {whole[0] / estimate:.2f} (target ≤ 0.5)."
            )
    if keras_full:
        ratio = f"; ratio rnn_jax / Keras 3: {whole[0] / keras_full:.2f}" if whole else ""
        lines.append(f"- Keras 3 whole run, timed end to end: {keras_full:.1f} s{ratio}.")
    lines += _notes(timings, vocab_size, num_examples, best_rate)
    lines += ["", "## Peak RSS (VmHWM)", ""]
    if whole:
        lines.append(f"- the experiment's whole default run: {whole[1]:.0f} MB")
    lines.append(
        f"- this benchmark process (every contender compiled, data on device): "
        f"{peak_rss_mb():.0f} MB"
    )
    if keras_end:
        rss = keras_end["peak_rss_mb"]
        lines.append(f"- the Keras 3 worker (one-hot arrays, model): {rss:.0f} MB")
    return lines


def _notes(timings, vocab_size, num_examples, best_rate):
    """What bounds the numbers, from this run's own measurements."""
    if "keras" not in timings.wall or "simple_rnn" not in timings.wall:
        return []
    floor = _epoch_flops("simple_rnn", vocab_size, num_examples) / best_rate
    keras = timings.stats("keras")[0] / floor
    return [
        "",
        "## Notes",
        "",
        f"- Keras 3 on the JAX backend compiles the same recurrence with XLA: its epoch is "
        f"{keras:.2f}x the floor here, so being 2x faster than it would take an epoch at "
        f"{keras / 2:.2f}x the floor, and the whole run at half of Keras's is bounded by the "
        "same epochs (25 of them are most of the run).",
        "- The floor counts matrix-product FLOPs only. Beyond the products (1.05-1.15x the "
        "floor on their own, timed kernel by kernel), each step pays for its gate nonlinearities "
        "(tanh and sigmoid, several per element for LSTM and GRU), the residuals kept for the "
        "backward pass, the input rows' gather and scatter, the optimizer update, the epoch's "
        "shuffle and the accuracy metric: XLA on CPU runs these as separate small kernels.",
    ]


def main(argv):
    record = "python -m benchmarks.char_lm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if _PIN.value and not _pinned():
        cmd = pinned_module("benchmarks.char_lm", *sys.argv[1:])
        sys.exit(subprocess.run(cmd, cwd=_ROOT, env=pinned_env(KERAS_BACKEND="jax")).returncode)
    del argv
    run(record.strip())


if __name__ == "__main__":
    app.run(main)
