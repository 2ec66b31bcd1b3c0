"""Tiny Shakespeare scored as nanoGPT scores it: held-out nats per character (block and stream)
against training seconds, each contender a child ``python -m experiments.char_lm`` pinned to one
core, with nanoGPT's documented numbers as the reference lines.

Run: .venv/bin/python -m benchmarks.shakespeare --text=../shared/data/tiny_shakespeare.txt \
         --budget=175 --contenders=simple_rnn,lstm,gru,ln_lstm
       (each contender: a calibration run of at least 20 s, then --budget training seconds;
       writes benchmarks/shakespeare_175.json and docs/figures/shakespeare_175.png and prints
       the table of docs/shakespeare.md)
     .venv/bin/python -m benchmarks.shakespeare --budget=1800 --contenders=gru_large ...
     .venv/bin/python -m benchmarks.shakespeare --from_json=benchmarks/shakespeare_175.json
       (runs nothing: the table and the figure again from a results file; several files, e.g.
       contenders run one per core at the same time, merge into one with --out)

The protocol (nanoGPT's ``data/shakespeare_char/prepare.py`` and ``train.py``): the corpus read
as it is (65 symbols), the first ``int(0.9 n)`` characters for training and the rest held out;
the held-out loss is the mean cross-entropy in nats over every held-out character after the
first, **block**: in consecutive blocks of 64 characters each read from a zero carry (the
context nanoGPT's CPU recipe, ``block_size=64``, has), and **stream**: the whole tail as one
stream, the carry passed on (the context a recurrent model can carry). nanoGPT reports an
estimate of the first over random blocks; here every held-out character is scored.

Every contender trains with Adam(W), a linear warmup and a cosine decay that ends at its budget:
the calibration run measures the contender's updates per training second on this core, and
``decay_steps`` is that rate times the budget. Training stops once ``--max_train_seconds``
(the budget) of training have passed, counted as char_lm counts them (the compiled updates
alone: compiling, evaluating, sampling and checkpoints excluded); the held-out scores are taken
``--evals`` times along the way, and the best block score's state is kept and sampled from
(500 characters at temperature 0.8). Rounds (``--rounds``) run every contender once each,
interleaved, round r with char_lm's ``--seed=SEED+r`` (``--seed``, default 0: another
initialisation, dropout and batch order); scores are min / median over rounds. Peak RSS is
the child's own (``wait4``).
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks._common import cpu_name, pinned_env

# The 30-minute regularisation: dropout 0.3 on what a layer passes on, DropConnect on a quarter
# of the recurrent kernel, and each update's blocks at uniform offsets (nanoGPT's sampling).
_WD25_RW = dict(units=512, dropout=0.3, weight_drop=0.25, random_windows=True)
# Each contender: char_lm flags beside the protocol's. The search that chose them is in
# docs/shakespeare.md ("How the configurations were chosen").
CONTENDERS = {
    "simple_rnn": dict(cell="simple_rnn", units=512, learning_rate=8e-3),
    "lstm": dict(cell="lstm", units=256, learning_rate=1.6e-2),
    "gru": dict(cell="gru", units=256, learning_rate=1.6e-2),
    "ln_lstm": dict(cell="ln_lstm", units=256, learning_rate=1.6e-2),
    "min_gru": dict(cell="min_gru", units=512, learning_rate=1.6e-2),
    # minGRU's gates read only the input: depth is where its mixing across units comes from.
    "min_gru_3x512": dict(cell="min_gru", units=512, layers=3, learning_rate=4e-3),
    # The 30-minute budget: wider, and (the last) more dropout against overfitting.
    "gru_512": dict(cell="gru", units=512, learning_rate=5e-3, dropout=0.1),
    "ln_lstm_512": dict(cell="ln_lstm", units=512, learning_rate=3e-3, dropout=0.1),
    "ln_lstm_512_drop3": dict(cell="ln_lstm", units=512, learning_rate=3e-3, dropout=0.3),
    # ... and the recurrence regularised too: DropConnect on the recurrent kernel.
    "ln_lstm_512_wd25": dict(
        cell="ln_lstm", units=512, learning_rate=3e-3, dropout=0.3, weight_drop=0.25
    ),
    "ln_lstm_512_wd5": dict(
        cell="ln_lstm", units=512, learning_rate=3e-3, dropout=0.3, weight_drop=0.5
    ),
    # ... and random windows besides (the SimpleRNN: dropout 0.1 only, its recurrence whole).
    "gru_512_wd25_rw": dict(cell="gru", learning_rate=5e-3, **_WD25_RW),
    "lstm_512_wd25_rw": dict(cell="lstm", learning_rate=5e-3, **_WD25_RW),
    "ln_lstm_512_wd25_rw": dict(cell="ln_lstm", learning_rate=3e-3, **_WD25_RW),
    "simple_rnn_512_rw": dict(
        cell="simple_rnn", units=512, learning_rate=4e-3, dropout=0.1, random_windows=True
    ),
    # minGRU has no recurrent kernel to drop: depth, dropout 0.3 between its layers.
    "min_gru_3x512_rw": dict(
        cell="min_gru", units=512, layers=3, learning_rate=3e-3, dropout=0.3, random_windows=True
    ),
}
# Every contender's optimiser and schedule (decay_steps comes from the calibration).
COMMON = dict(
    optimizer="adamw",
    beta2=0.99,
    weight_decay=0.1,
    warmup_steps=100,
    clip_norm=1.0,
    batch_size=64,
    bptt=64,
    reset_carry=True,
)
# nanoGPT's documented numbers (README of karpathy/nanoGPT and its config files), in nats.
REFERENCES = {
    "nanoGPT CPU recipe (0.8M params; 1.886 at 175 s on one core of this machine)": 1.886,
    "nanoGPT GPU recipe (10.7M params, one A100, about 3 min)": 1.4697,
}

_TEXT = flags.DEFINE_string("text", None, "tiny_shakespeare.txt (checked by sha256).")
_BUDGET = flags.DEFINE_float("budget", 175.0, "Training seconds per contender.")
_CONTENDERS = flags.DEFINE_list("contenders", list(CONTENDERS), "Contenders to run.")
_SET = flags.DEFINE_multi_string(
    "set", [], "name:flag=value, a change to a contender's flags (searching), e.g. gru:units=384."
)
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved rounds.")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Round r runs every contender with char_lm --seed=SEED+r (unless --set gives one)."
)
_EVALS = flags.DEFINE_integer("evals", 10, "Held-out evaluations along a run.")
_CALIBRATION = flags.DEFINE_float(
    "calibration",
    20.0,
    "Least training seconds of a calibration run (it ends at the first epoch's end past them).",
)
_CORE = flags.DEFINE_integer("core", 0, "The core every child is pinned to.")
_OUT = flags.DEFINE_string(
    "out", None, "Results file (default benchmarks/shakespeare_<budget>.json)."
)
_PLOT = flags.DEFINE_string("plot", None, "Figure (default docs/figures/shakespeare_<budget>.png).")
_FROM_JSON = flags.DEFINE_list(
    "from_json",
    [],
    "Run nothing: the table and the figure from these results files, their runs merged into "
    "one (written to --out when given): contenders run apart, e.g. one per core, side by side.",
)


def _value(text: str):
    """A ``--set`` value as the number or bool it spells (else the text)."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _flags(settings: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in settings.items()]


def _child(settings: dict, workdir: str, log_path: str) -> tuple[float, float]:
    """Runs char_lm with ``settings`` pinned; ``(wall seconds, peak RSS in MB)``."""
    command = ["taskset", "-c", str(_CORE.value), sys.executable, "-m", "experiments.char_lm"]
    command += _flags(settings) + [f"--workdir={workdir}", "--compilation_cache=none"]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    tic = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=pinned_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"char_lm failed ({proc.returncode}), {log_path}:\n{tail}")
    return time.perf_counter() - tic, usage.ru_maxrss / 1024


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _protocol(text: str) -> dict:
    return dict(
        corpus="tiny_shakespeare",
        text=text,
        mode="stateful",
        val_block=64,
        num_preds=1,
        progress_seconds="none",
        checkpoint_every="none",
        iterations=100000,
    )


def _parameters(settings: dict) -> int:
    import jax  # only here: the parent stays small, its RSS is not the children's

    from experiments import char_lm

    fields = {k: v for k, v in settings.items() if k in ("cell", "units", "layers", "mode")}
    config = char_lm.Config(**fields)
    shapes = jax.eval_shape(char_lm.make_model(config, 65)[1].init, jax.random.PRNGKey(0))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def schedule(contenders: dict, rounds: int, seed: int) -> list[tuple[int, str, dict]]:
    """``(round, name, settings)`` in running order: round by round, every contender once per
    round (interleaved, so a slow spell of the machine falls on all of them), round ``r`` with
    ``seed + r`` unless the contender's settings name a seed of their own."""
    return [
        (r, name, {"seed": seed + r, **settings})
        for r in range(rounds)
        for name, settings in contenders.items()
    ]


def run_contender(name: str, settings: dict, budget: float, scratch: str) -> dict:
    """Calibrates, then trains ``name`` for ``budget`` training seconds; its row."""
    base = {**_protocol(_TEXT.value), **COMMON, **settings}
    cal_dir = os.path.join(scratch, f"{name}_calibration")
    # char_lm checks its budget between compiled calls, here whole epochs (246 updates of
    # 64 x 64): the calibration is at least --calibration seconds, and at least one epoch.
    cal = {**base, "max_train_seconds": _CALIBRATION.value, "steps_per_iteration": 100000}
    _child(cal, cal_dir, cal_dir + ".log")
    cal_rows = _rows(cal_dir)
    rate = cal_rows[-1]["step"] / sum(r["seconds"] for r in cal_rows)
    decay = max(int(rate * budget), base["warmup_steps"] + 1)
    every = max(decay // _EVALS.value, 1)
    workdir = os.path.join(scratch, name)
    settings = {
        **base,
        "decay_steps": decay,
        "steps_per_iteration": every,
        "steps_per_call": max(min(every, int(rate * 2)), 1),
        "max_train_seconds": budget,
        "keep_best": True,
        "sample_chars": 500,
        "sample_temperatures": 0.8,
    }
    wall, rss = _child(settings, workdir, workdir + ".log")
    rows, seconds = _rows(workdir), 0.0
    curve = []
    for row in rows:
        seconds += row["seconds"]
        curve.append((seconds, row["step"], row["val_block_loss"], row["val_loss"], row["loss"]))
    best = min(rows, key=lambda r: r["val_block_loss"])
    with open(os.path.join(workdir, "final_samples.txt")) as f:
        sample = f.read()
    return {
        "name": name,
        "flags": {k: v for k, v in settings.items() if k != "text"},
        "parameters": _parameters(settings),
        "updates_per_second": rate,
        "chars_per_second": sum(r["examples"] for r in rows) / seconds,
        "train_seconds": seconds,
        "wall_seconds": wall,
        "peak_rss_mb": rss,
        "final_block": rows[-1]["val_block_loss"],
        "final_stream": rows[-1]["val_loss"],
        "best_block": best["val_block_loss"],
        "best_stream": best["val_loss"],
        "best_step": best["step"],
        "curve": curve,  # (training seconds, step, block, stream, training loss)
        "sample": sample,
    }


def _summary(results: list[dict]) -> list[dict]:
    """Per contender: min and median over rounds of the best block and stream scores."""
    names = list(dict.fromkeys(r["name"] for r in results))
    out = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        out.append(
            {
                "name": name,
                "rounds": len(runs),
                "parameters": runs[0]["parameters"],
                "chars_per_second": statistics.median(r["chars_per_second"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "train_seconds": statistics.median(r["train_seconds"] for r in runs),
                **{
                    f"{stat}_{key}": fn(r[key] for r in runs)
                    for key in ("best_block", "best_stream", "final_block", "final_stream")
                    for stat, fn in (("min", min), ("median", statistics.median))
                },
            }
        )
    return out


def table(results: dict) -> str:
    rounds = results["rounds"]
    spread = "" if rounds == 1 else " (min / median over the contender's runs)"
    lines = [
        f"Budget {results['budget']:g} training seconds, each contender on one core of "
        f"{results['cpu']} (core {results['core']}), single-threaded XLA; nats per character: "
        f"the run's best held-out block score and the stream score of the same state{spread}.",
        "",
        "| contender | runs | params | chars/s | peak RSS MB | block nats | stream nats | "
        "final block |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["summary"]:

        def both(key, s=s):
            if s["rounds"] == 1:
                return f"{s['min_' + key]:.4f}"
            return f"{s['min_' + key]:.4f} / {s['median_' + key]:.4f}"

        lines.append(
            f"| {s['name']} | {s['rounds']} | {s['parameters'] / 1e6:.2f}M | "
            f"{s['chars_per_second']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {both('best_block')} | {both('best_stream')} | "
            f"{both('final_block')} |"
        )
    for label, value in REFERENCES.items():
        lines.append(f"| {label} | | | | | {value:.4f} | | |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    # One colour per contender, its runs (rounds, seeds) drawn alike and labelled once.
    names = list(dict.fromkeys(run["name"] for run in results["runs"]))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    labelled = set()
    for run in results["runs"]:
        name, seconds = run["name"], [c[0] for c in run["curve"]]
        label = None if name in labelled else f"{name} block"
        labelled.add(name)
        ax.plot(seconds, [c[2] for c in run["curve"]], color=colors[name], label=label)
        ax.plot(seconds, [c[3] for c in run["curve"]], ls="--", color=colors[name], lw=1)
    for (label, value), style in zip(REFERENCES.items(), (":", "-."), strict=True):
        ax.axhline(value, color="k", ls=style, lw=1, label=label)
    ax.set_xlabel("training seconds (one core)")
    ax.set_ylabel("held-out nats per character (solid: block 64, dashed: stream)")
    ax.set_ylim(1.3, 2.4 if results["budget"] < 600 else 1.95)  # long runs: the low end
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"tiny Shakespeare, {results['budget']:g} s of training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(parts: list[dict]) -> dict:
    """Results files of one budget as one: every run, the summary over them all, each file's
    command (and core) kept."""
    budgets = {part["budget"] for part in parts}
    if len(budgets) != 1:
        raise app.UsageError(f"--from_json: the files' budgets differ ({sorted(budgets)})")
    if len(parts) == 1:
        return parts[0]
    runs, commands = [], []
    for part in parts:
        runs += [{"core": part["core"], **run} for run in part["runs"]]
        # A merged file's command is already the list of its parts': merged again, flat.
        command = part["command"]
        commands += command if isinstance(command, list) else [command]
    cores = sorted({str(run["core"]) for run in runs})
    summary = _summary(runs)
    return {
        **parts[0],
        "core": cores[0] if len(cores) == 1 else " and ".join(cores),
        "rounds": max(s["rounds"] for s in summary),
        "command": commands,
        "runs": runs,
        "summary": summary,
    }


def main(argv):
    del argv
    if _FROM_JSON.value:
        parts = []
        for path in _FROM_JSON.value:
            with open(path) as f:
                parts.append(json.load(f))
        results = merge(parts)
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(results, f, indent=1)
    else:
        if _TEXT.value is None:
            raise app.UsageError("--text=PATH of tiny_shakespeare.txt is needed")
        contenders = {}
        for name in _CONTENDERS.value:
            if name not in CONTENDERS:
                raise app.UsageError(f"--contenders: {name!r} is not one of {list(CONTENDERS)}")
            contenders[name] = dict(CONTENDERS[name])
        for change in _SET.value:
            name, assignment = change.split(":", 1)
            key, value = assignment.split("=", 1)
            contenders[name][key] = _value(value)
        runs = []
        with tempfile.TemporaryDirectory() as scratch:
            for r, name, settings in schedule(contenders, _ROUNDS.value, _SEED.value):
                row = run_contender(name, settings, _BUDGET.value, os.path.join(scratch, str(r)))
                row["round"], row["core"], row["seed"] = r, _CORE.value, settings["seed"]
                runs.append(row)
                print(
                    f"round {r} {name}: best block {row['best_block']:.4f}, stream "
                    f"{row['best_stream']:.4f} ({row['train_seconds']:.0f} s training, "
                    f"{row['wall_seconds']:.0f} s wall)",
                    flush=True,
                )
        results = {
            "budget": _BUDGET.value,
            "cpu": cpu_name(),
            "core": _CORE.value,
            "rounds": _ROUNDS.value,
            "common": COMMON,
            "command": shlex.join([sys.executable, "-m", "benchmarks.shakespeare", *sys.argv[1:]]),
            "runs": runs,
            "summary": _summary(runs),
        }
        out = _OUT.value or f"benchmarks/shakespeare_{_BUDGET.value:g}.json"
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    best = min(results["runs"], key=lambda r: r["best_block"])
    print(f"\n500 characters from {best['name']} (best block {best['best_block']:.4f}):")
    print(best["sample"])
    plot(results, _PLOT.value or f"docs/figures/shakespeare_{results['budget']:g}.png")


if __name__ == "__main__":
    app.run(main)
