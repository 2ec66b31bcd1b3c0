"""Time to quality: held-out bits per char against training seconds, the tutorial's recipe vs the
stateful truncated-BPTT mode, side by side in one run on one pinned core.

Run: .venv/bin/python -m benchmarks.time_to_quality
       (about 25-30 min on a quiet core; writes benchmarks/time_to_quality.json and
       docs/figures/time_to_quality.png, prints the table of benchmarks/TIME_TO_QUALITY.md)
     .venv/bin/python -m benchmarks.time_to_quality --cells=simple_rnn \
         --out=benchmarks/time_to_quality_dropout.json \
         --plot=docs/figures/time_to_quality_dropout.png
       (the SimpleRNN pair and the best configurations, with dropout, two rounds: about 9 min;
       TIME_TO_QUALITY.md's headline table)
     .venv/bin/python -m benchmarks.time_to_quality --cells=simple_rnn --rounds=1 --out= --plot=
       (the SimpleRNN contenders only, one round, about 5 min; writes nothing)
     .venv/bin/python -m benchmarks.time_to_quality --from_json=benchmarks/time_to_quality.json
       (runs nothing: the table again and the figure redrawn from a results file)

Contenders, each a child ``python -m experiments.char_lm ... --compilation_cache=none`` in a fresh
temporary workdir, pinned (``taskset -c 0``, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``):

- ``recipe/<cell>``: the tutorial's recipe (mode=windowed: shuffled 10-char windows, step 1,
  batch 128, RMSprop lr 1e-3, 25 epochs), 128 units, for each cell of ``--cells``;
- ``stateful/<cell>``: the same cell and width in stateful mode with one fixed recipe
  (``--stateful``: 32 streams, bptt 10, RMSprop lr 3e-3, clip_norm 5);
- ``best/<name>``: the best stateful configurations the exploration found (``--best``),
  scored against the SimpleRNN recipe, the tutorial's.

Every stateful contender gets the training-time budget of its recipe in the same round: it is
stopped at the end of the first iteration (one epoch) whose cumulative training seconds reach the
recipe's total. Rounds are interleaved (round r runs every contender once, recipe before its
stateful contenders), because the core is shared with other processes; ``--rounds`` applies to
the SimpleRNN contenders, ``--other_rounds`` to the LSTM and GRU pairs (each LSTM or GRU recipe
alone trains for several minutes). Numbers are min / median over rounds.

Time axis: training seconds, the sum of the ``seconds`` column of the run's metrics.jsonl (the
compiled epochs alone: compilation, held-out evaluation, generation and checkpoints excluded);
compile seconds, the process's wall time and its CPU time (CPU / wall < 1: the core was shared)
are reported beside it. Generation is cut to 1 character per iteration (``--num_preds=1``) and
progress lines are off, to keep the process's wall time down; neither is in training seconds.

Columns: *to recipe best* is the training seconds at the end of the first epoch whose held-out
bpc is at or below the best held-out bpc of the paired recipe in the same round (no
interpolation), and *ratio* divides it by the recipe's training seconds (target ≤ 0.2; beside
it, the stricter ratio to the seconds the recipe took to reach its best); *Δ at equal time* is
the stateful curve, linearly interpolated in time at the recipe's total training seconds, minus
the recipe's final held-out bpc (target ≤ -0.2); *Δ best so far* takes instead the lowest
held-out bpc the stateful run reached by then (what early stopping on it would keep).
"""

import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks._common import XLA_SINGLE_THREAD, cpu_name, pinned_env, pinned_module

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CELLS = flags.DEFINE_list("cells", ["simple_rnn", "lstm", "gru"], "Cells of the recipe pairs.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "Interleaved rounds of the SimpleRNN contenders.", lower_bound=1
)
_OTHER_ROUNDS = flags.DEFINE_integer(
    "other_rounds", 1, "Rounds of the LSTM and GRU pairs (the first rounds).", lower_bound=0
)
_STATEFUL = flags.DEFINE_string(
    "stateful",
    "--mode=stateful --batch_size=32 --bptt=10 --learning_rate=3e-3 --clip_norm=5",
    "experiments.char_lm flags of stateful/<cell> (the cell and 128 units are added).",
)
_BEST = flags.DEFINE_multi_string(
    "best",
    [
        "gru128_dropout:--mode=stateful --cell=gru --units=128 --batch_size=32 --bptt=10 "
        "--learning_rate=5e-3 --clip_norm=5 --dropout=0.3",
        "gru256_dropout:--mode=stateful --cell=gru --units=256 --batch_size=32 --bptt=10 "
        "--learning_rate=3e-3 --clip_norm=5 --dropout=0.5",
    ],
    "NAME:FLAGS, repeatable: the best stateful configurations (experiments.char_lm flags), "
    "contenders best/NAME scored against recipe/simple_rnn.",
)
_MAX_ITERATIONS = flags.DEFINE_integer(
    "max_iterations", 2000, "Cap on a stateful contender's iterations (epochs).", lower_bound=1
)
_DEADLINE = flags.DEFINE_string(
    "deadline",
    None,
    "HH:MM (UTC): start no contender after it; report what ran (rounds left are said so).",
)
_OUT = flags.DEFINE_string(
    "out",
    os.path.join(_ROOT, "benchmarks", "time_to_quality.json"),
    "Results JSON, rewritten after every contender ('' for none).",
)
_FROM_JSON = flags.DEFINE_string(
    "from_json",
    None,
    "Run nothing: rescore the runs of this results JSON, print the table and redraw --plot.",
)
_PLOT = flags.DEFINE_string(
    "plot",
    os.path.join(_ROOT, "docs", "figures", "time_to_quality.png"),
    "Figure: held-out bpc against training seconds ('' for none).",
)

_COMMON = ["--num_preds=1", "--progress_seconds=none", "--compilation_cache=none"]
_LINE = re.compile(r"^loss \S+\s+acc \S+\s+bpc \S+\s+(\S+) s\s")


def _contenders() -> list[dict]:
    """Name, flags, the recipe it is scored against, and which rounds it runs in."""
    out = []
    for cell in _CELLS.value:
        rounds = _ROUNDS.value if cell == "simple_rnn" else _OTHER_ROUNDS.value
        out.append(
            {
                "name": f"recipe/{cell}",
                "flags": [f"--cell={cell}"],
                "recipe": None,
                "rounds": rounds,
            }
        )
        out.append(
            {
                "name": f"stateful/{cell}",
                "flags": [f"--cell={cell}", "--units=128", *shlex.split(_STATEFUL.value)],
                "recipe": f"recipe/{cell}",
                "rounds": rounds,
            }
        )
        if cell == "simple_rnn":
            for spec in _BEST.value:
                name, _, best_flags = spec.partition(":")
                out.append(
                    {
                        "name": f"best/{name}",
                        "flags": shlex.split(best_flags),
                        "recipe": "recipe/simple_rnn",
                        "rounds": rounds,
                    }
                )
    return out


def _read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line (the run was stopped)
                    break
    return rows


def run_one(flag_list: list[str], budget: float | None) -> dict:
    """One child run; stopped after the first iteration whose cumulative training seconds
    reach ``budget`` (None: runs its configured iterations). Its curve and timings."""
    with tempfile.TemporaryDirectory(prefix="rnn_jax_ttq_") as workdir:
        command = pinned_module(
            "experiments.char_lm",
            f"--workdir={workdir}",
            *_COMMON,
            *flag_list,
        )
        if budget is not None:
            command.append(f"--iterations={_MAX_ITERATIONS.value}")
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        tic = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=_ROOT,
            env=pinned_env(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tail, trained, iterations, stopped = [], 0.0, 0, False
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            m = _LINE.match(line)
            if not m:
                continue
            iterations += 1
            trained += float(m.group(1))
            if budget is not None and trained >= budget:
                # The row of this iteration is appended after its lines are printed.
                wait_until = time.perf_counter() + 60
                while (
                    len(_read_metrics(metrics_path)) < iterations
                    and time.perf_counter() < wait_until
                ):
                    time.sleep(0.05)
                proc.terminate()
                stopped = True
                break
        proc.stdout.close()
        proc.wait()
        wall = time.perf_counter() - tic
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0 and not stopped:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{''.join(tail)}")
        rows = _read_metrics(metrics_path)[:iterations] if stopped else _read_metrics(metrics_path)
    if not rows:
        raise RuntimeError(f"{shlex.join(command)} wrote no metrics:\n{''.join(tail)}")
    t, curve = 0.0, []
    for row in rows:
        t += row["seconds"]
        curve.append([t, row["val_bits_per_char"], row["bits_per_char"]])
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "command": shlex.join(["python", "-m", "experiments.char_lm", *_COMMON, *flag_list])
        + (f" --iterations={len(rows)}" if budget is not None else ""),
        "curve": curve,  # [cumulative training seconds, held-out bpc, training bpc] per epoch
        "iterations": len(rows),
        "train_seconds": t,
        "compile_seconds": rows[0].get("compile_seconds"),
        "process_wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "budget_seconds": budget,
    }


def _interpolate(curve, t):
    """Held-out bpc at training time ``t`` (linear between epochs; None past the curve's end)."""
    prev_t, prev_v = 0.0, None
    for ct, cv, _ in curve:
        if ct >= t:
            if prev_v is None:
                return cv
            return prev_v + (cv - prev_v) * (t - prev_t) / (ct - prev_t)
        prev_t, prev_v = ct, cv
    return None


def _scores(result: dict, recipe: dict | None) -> dict:
    vals = [v for _, v, _ in result["curve"]]
    best_i = min(range(len(vals)), key=vals.__getitem__)
    out = {
        "final": vals[-1],
        "best": vals[best_i],
        "seconds_to_best": result["curve"][best_i][0],
    }
    if recipe is not None:
        target = recipe["scores"]["best"]
        reach_epoch = next(
            (i + 1 for i, (_, v, _) in enumerate(result["curve"]) if v <= target), None
        )
        reach = None if reach_epoch is None else result["curve"][reach_epoch - 1][0]
        at_equal = _interpolate(result["curve"], recipe["train_seconds"])
        out.update(
            target=target,
            seconds_to_target=reach,
            epochs_to_target=reach_epoch,
            ratio_to_recipe=None if reach is None else reach / recipe["train_seconds"],
            ratio_to_recipe_best=(
                None if reach is None else reach / recipe["scores"]["seconds_to_best"]
            ),
            bpc_at_recipe_seconds=at_equal,
            delta_at_equal_time=(
                None if at_equal is None else at_equal - recipe["scores"]["final"]
            ),
            # With early stopping on the held-out bpc: the best so far at the recipe's time.
            delta_best_so_far_at_equal_time=(
                min(v for t, v, _ in result["curve"] if t <= recipe["train_seconds"])
                - recipe["scores"]["final"]
            ),
        )
    return out


def _machine() -> str:
    model = cpu_name()
    import jax  # only for its version; the children do the work

    return (
        f"{model}, {os.cpu_count()} cores ({platform.machine()}), Linux {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__}; children pinned to core 0 "
        f"(taskset -c 0), XLA_FLAGS={XLA_SINGLE_THREAD}"
    )


def _past_deadline() -> bool:
    if not _DEADLINE.value:
        return False
    hh, mm = (int(x) for x in _DEADLINE.value.split(":"))
    now = time.gmtime()
    return now.tm_hour * 60 + now.tm_min >= hh * 60 + mm


def _stat(values, fmt="{:.3f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, med = min(values), statistics.median(values)
    return fmt.format(lo) if len(values) == 1 else f"{fmt.format(lo)} / {fmt.format(med)}"


def _table(contenders, results) -> list[str]:
    lines = [
        "| contender | rounds | final held-out bpc | best held-out bpc | training s | compile s "
        "| process wall s (CPU s) | to recipe best, s | ratio to recipe time (≤ 0.2) "
        "| ratio to recipe's time to its best | Δ bpc at equal time (≤ -0.2) "
        "| Δ best so far at equal time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        runs = results.get(c["name"], [])
        if not runs:
            continue
        sc = [r["scores"] for r in runs]
        reached = sum(s.get("seconds_to_target") is not None for s in sc)
        to_target = _stat([s.get("seconds_to_target") for s in sc], "{:.1f}")
        epochs = sorted({s.get("epochs_to_target") for s in sc} - {None})
        if epochs:
            to_target += f" ({', '.join(map(str, epochs))} ep)"
        if c["recipe"] is not None and reached < len(runs):
            to_target += f" (reached in {reached} of {len(runs)})"
        lines.append(
            f"| {c['name']} | {len(runs)} | {_stat([s['final'] for s in sc])} | "
            f"{_stat([s['best'] for s in sc])} | "
            f"{_stat([r['train_seconds'] for r in runs], '{:.1f}')} | "
            f"{_stat([r['compile_seconds'] for r in runs], '{:.1f}')} | "
            f"{_stat([r['process_wall_seconds'] for r in runs], '{:.0f}')} "
            f"({_stat([r['process_cpu_seconds'] for r in runs], '{:.0f}')}) | "
            + (
                f"{to_target} | {_stat([s.get('ratio_to_recipe') for s in sc], '{:.2f}')} | "
                f"{_stat([s.get('ratio_to_recipe_best') for s in sc], '{:.2f}')} | "
                f"{_stat([s.get('delta_at_equal_time') for s in sc], '{:+.3f}')} | "
                f"{_stat([s.get('delta_best_so_far_at_equal_time') for s in sc], '{:+.3f}')} |"
                if c["recipe"] is not None
                else f"(its best at {_stat([s['seconds_to_best'] for s in sc], '{:.1f}')}) | "
                "- | - | - | - |"
            )
        )
    return lines


def _plot(contenders, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [
        c["name"].split("/")[1]
        for c in contenders
        if c["name"].startswith("recipe/") and c["name"] != "recipe/simple_rnn"
    ]
    panels = [
        ["recipe/simple_rnn", "stateful/simple_rnn"]
        + [c["name"] for c in contenders if c["name"].startswith("best/")]
    ]
    if others:
        panels.append([f"{kind}/{c}" for c in others for kind in ("recipe", "stateful")])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {c["name"]: colors[i % len(colors)] for i, c in enumerate(contenders)}
    for ax, names in zip(axes[0], panels):
        recipe = next((n for n in names if n.startswith("recipe/")), None)
        for name in names:
            for r, run in enumerate(results.get(name, [])):
                t = [p[0] for p in run["curve"]]
                v = [p[1] for p in run["curve"]]
                label = name
                if name.startswith("best/"):
                    flags_ = next(c["flags"] for c in contenders if c["name"] == name)
                    label += (
                        " ("
                        + ", ".join(
                            f.lstrip("-").replace("=", " ")
                            for f in flags_
                            if not f.startswith("--mode")
                        )
                        + ")"
                    )
                ax.plot(
                    t,
                    v,
                    color=color_of[name],
                    linestyle=("-", "--", ":", "-.")[r % 4],
                    marker="." if name.startswith("recipe/") else None,
                    label=f"{label}, round {r + 1}",
                    linewidth=1.2,
                )
        if recipe == "recipe/simple_rnn" and results.get(recipe):
            first = results[recipe][0]
            ax.axhline(first["scores"]["best"], color="black", linewidth=0.6)
            ax.axvline(first["train_seconds"] / 5, color="black", linewidth=0.6)
            ax.axhline(first["scores"]["final"] - 0.2, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(
                "SimpleRNN 128: tutorial recipe vs stateful\n(black: recipe best, 1/5 of its "
                "training time; dotted: recipe final - 0.2; round 1)",
                fontsize=10,
            )
        else:
            ax.set_title("LSTM and GRU 128: recipe vs stateful (same stateful recipe)", fontsize=10)
        ax.set_xlabel("training seconds (one pinned core; compile, eval excluded)")
        ax.set_ylabel("held-out bits per char")
        ax.set_ylim(2.0, 3.2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _from_json(path):
    with open(path) as f:
        payload = json.load(f)
    contenders, results = payload["contenders"], payload["results"]
    for c in contenders:
        for run in results.get(c["name"], []):
            recipe = None
            if c["recipe"] is not None:
                recipe = results[c["recipe"]][run["round"] - 1]
            run["scores"] = _scores(run, recipe)
    lines = [
        f"Command: `{payload['command']}` ({payload['elapsed_seconds'] / 60:.1f} min wall, "
        f"{payload['date']}).",
        f"Machine: {payload['machine']}.",
        f"Load average (1, 5, 15 min) before "
        f"{tuple(round(x, 2) for x in payload['load_average_before'])}, after "
        f"{tuple(round(x, 2) for x in payload['load_average_now'])}.",
        "",
        *_table(contenders, results),
    ]
    print("\n".join(lines))
    if _PLOT.value and results:
        _plot(contenders, results, _PLOT.value)
        print(f"figure: {_PLOT.value}")


def main(argv):
    del argv
    if _FROM_JSON.value:
        return _from_json(_FROM_JSON.value)
    record = "python -m benchmarks.time_to_quality " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    contenders = _contenders()
    results: dict[str, list[dict]] = {}
    skipped = []
    start = time.time()
    load_before = os.getloadavg()
    rounds = max(c["rounds"] for c in contenders)

    def save():
        if not _OUT.value:
            return
        payload = {
            "command": record,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
            "machine": _machine(),
            "load_average_before": load_before,
            "load_average_now": os.getloadavg(),
            "elapsed_seconds": time.time() - start,
            "contenders": contenders,
            "skipped_for_deadline": skipped,
            "results": results,
        }
        with open(_OUT.value, "w") as f:
            json.dump(payload, f, indent=1)

    for r in range(rounds):
        for c in contenders:
            if r >= c["rounds"]:
                continue
            if _past_deadline():
                skipped.append(f"{c['name']} round {r + 1}")
                continue
            recipe = None
            if c["recipe"] is not None:
                runs = results.get(c["recipe"], [])
                if len(runs) <= r:
                    skipped.append(f"{c['name']} round {r + 1} (no recipe run)")
                    continue
                recipe = runs[r]
            budget = None if recipe is None else recipe["train_seconds"]
            tic = time.time()
            result = run_one(c["flags"], budget)
            result["scores"] = _scores(result, recipe)
            result["round"] = r + 1
            results.setdefault(c["name"], []).append(result)
            s = result["scores"]
            extra = ""
            if recipe is not None:
                extra = (
                    f", to recipe best {s['seconds_to_target']}, "
                    f"Δ at equal time {s['delta_at_equal_time']}"
                )
            print(
                f"[{time.strftime('%H:%M:%S', time.gmtime())}] round {r + 1} {c['name']}: "
                f"{result['iterations']} epochs, {result['train_seconds']:.1f} s training, "
                f"final {s['final']:.3f}, best {s['best']:.3f}{extra} "
                f"({time.time() - tic:.0f} s wall)",
                flush=True,
            )
            save()
    elapsed = time.time() - start
    lines = [
        f"Command: `{record}` ({elapsed / 60:.1f} min wall, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}).",
        f"Machine: {_machine()}.",
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in os.getloadavg())}.",
        "",
        *_table(contenders, results),
    ]
    if skipped:
        lines += ["", "Not run (past --deadline): " + ", ".join(skipped) + "."]
    print("\n".join(lines))
    save()
    if _PLOT.value and results:
        _plot(contenders, results, _PLOT.value)
        print(f"figure: {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
