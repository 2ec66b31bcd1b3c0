"""Long-range tasks: cell × T × seeds, with and without gradient clipping, seeds vmapped.

Run: python -m experiments.long_range --workdir=runs/long_range
(--task=adding, --lengths=10,50,100,200; the copy task: --task=copy --lengths=10,50
--workdir=runs/long_range_copy). Every (cell, T) trains all seeds and both clipping settings
(none, and --clip_norm) in one compiled program: ``jax.vmap`` over seeds inside ``jax.vmap``
over the clip setting, each a ``lax.scan`` over the steps (on this CPU at batch 32 that costs
~1.5x the CPU of a loop over seeds; see benchmarks/GRADIENTS.md). Optimiser: Adam, lr 1e-2 (in
a trial at T = 100, lr 1e-3 left LSTM on the baseline for 2000 steps in 7 of 8 runs), a fresh
batch of 32 per step, 32 units, 4 seeds, a fixed test set of 512 sequences.

Writes ``results.json`` (per-seed test curves and gradient-norm statistics), ``results.csv``
(the printed table) and ``curves_<task>.png`` to --workdir.

Measured here (2 CPU cores shared with other jobs; tables and plots in docs/gradients.md):
- adding: 12 min wall (4.5 min of CPU). GRU solves every T up to 200 (4/4 seeds, test MSE
  < 0.05 by step 100-400, final ~2e-4); LSTM solves T = 10 and 50, T = 100 only with clipping
  (4/4 vs 0/4), not T = 200; SimpleRNN only T = 10. Baseline 1/6.
- copy, T = 10 and 50: 3.6 min wall (1.7 min of CPU). Nothing solved in 1000 steps; GRU ends
  ~10-17 % below the memoryless baseline (T = 50: 0.248 vs 0.297), SimpleRNN on it.
"""

import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import cells, tasks

_TASK = flags.DEFINE_enum("task", "adding", sorted(tasks.TASKS), "Which task.")
_CELLS = flags.DEFINE_list("cells", ["simple_rnn", "lstm", "gru"], "Cells to compare.")
_LENGTHS = flags.DEFINE_list(
    "lengths", ["10", "50", "100", "200"], "T: sequence length (adding) or delay (copy)."
)
_SEEDS = flags.DEFINE_integer("seeds", 4, "Seeds per configuration (vmapped).", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.", lower_bound=1)
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 50, "Steps between test evaluations.", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per step.", lower_bound=1)
_TEST_SIZE = flags.DEFINE_integer("test_size", 512, "Test sequences (fixed).", lower_bound=1)
_UNITS = flags.DEFINE_integer("units", 32, "Hidden units.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "Learning rate.", lower_bound=0.0)
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "rmsprop"], "Optimiser.")
_CLIP_NORM = flags.DEFINE_float(
    "clip_norm", 1.0, "Global-norm clip of the clipped runs (each config also runs unclipped)."
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/long_range", "Where results are written.")


def train_seeds(task, cell, *, seeds, clip_norms, steps, eval_every, batch_size, test_size,
                learning_rate, optimizer, seed):
    """Trains ``seeds`` models for every clip norm in one compiled program.

    Returns:
      ``(params, curves)`` with leading axes ``(len(clip_norms), seeds)``:
      :class:`rnn_jax.tasks.TrainCurves`.
    """
    model, train = tasks.make_task_trainer(
        cell, task, num_steps=steps, eval_every=eval_every, batch_size=batch_size,
        learning_rate=learning_rate, optimizer=optimizer,
    )
    k_init, k_data, k_test = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = jax.vmap(model.init)(jax.random.split(k_init, seeds))
    keys = jax.random.split(k_data, seeds)
    test_xs, test_targets = task.sample(k_test, test_size)
    over_seeds = jax.vmap(train, in_axes=(0, 0, None, None, None))
    over_clips = jax.vmap(over_seeds, in_axes=(None, None, 0, None, None))
    clips = jnp.asarray(clip_norms, jnp.float32)
    return jax.jit(over_clips)(params, keys, clips, test_xs, test_targets)


def first_solved(test_loss: np.ndarray, threshold: float, eval_every: int):
    """Per run, the first evaluated step with test loss below ``threshold`` (None if never)."""
    steps = []
    for curve in test_loss:
        below = np.flatnonzero(curve < threshold)
        steps.append(int(below[0]) * eval_every if below.size else None)
    return steps


def summarize(task, cell_name, length, clip_norms, curves, eval_every, seconds):
    """One table row per clip setting: medians and spreads over the seeds."""
    rows = []
    curves = jax.tree.map(np.asarray, curves)
    for i, clip in enumerate(clip_norms):
        test, norms = curves.test_loss[i], curves.grad_norm[i]
        final = test[:, -1]
        solved = first_solved(test, task.solved_below, eval_every)
        solved_steps = [s for s in solved if s is not None]
        rows.append({
            "task": task.name,
            "cell": cell_name,
            "T": length,
            "clip": "none" if np.isinf(clip) else clip,
            "baseline": task.baseline,
            "final_test_median": float(np.median(final)),
            "final_test_min": float(np.min(final)),
            "final_test_max": float(np.max(final)),
            "final_over_baseline": float(np.median(final) / task.baseline),
            "solved": f"{len(solved_steps)}/{len(solved)}",
            "first_solved_median": float(np.median(solved_steps)) if solved_steps else None,
            "first_solved": solved,
            "grad_norm_median": float(np.median(norms)),
            "grad_norm_p99": float(np.percentile(norms, 99)),
            "grad_norm_max": float(np.max(norms)),
            # For the unclipped runs: the fraction of steps the clipped setting would clip.
            "frac_above_clip": float(np.mean(norms > max(c for c in clip_norms if np.isfinite(c)))),
            "seconds": seconds,
        })
    return rows


_COLUMNS = [
    ("task", "{}"), ("cell", "{}"), ("T", "{}"), ("clip", "{}"), ("baseline", "{:.4f}"),
    ("final_test_median", "{:.4f}"), ("final_test_min", "{:.4f}"), ("final_test_max", "{:.4f}"),
    ("solved", "{}"), ("first_solved_median", "{}"), ("grad_norm_median", "{:.3f}"),
    ("grad_norm_p99", "{:.3f}"), ("grad_norm_max", "{:.3g}"), ("frac_above_clip", "{:.3f}"),
    ("seconds", "{:.0f}"),
]


def format_table(rows) -> str:
    """A Markdown table of the summary rows."""
    head = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        cells_ = [fmt.format(row[name]) if row[name] is not None else "-" for name, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def plot_curves(path, task_name, results, eval_every):
    """Test loss against step, one panel per (T, cell), seeds as thin lines, baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["T"] for r in results})
    names = list(dict.fromkeys(r["cell"] for r in results))
    fig, axes = plt.subplots(
        len(lengths), len(names), figsize=(3.2 * len(names), 2.4 * len(lengths)),
        squeeze=False, sharex=True,
    )
    colours = {"none": "tab:blue", "clip": "tab:orange"}
    for r in results:
        ax = axes[lengths.index(r["T"]), names.index(r["cell"])]
        for i, clip in enumerate(r["clip_norms"]):
            label = "none" if np.isinf(clip) else "clip"
            curves = np.asarray(r["test_loss"][i])
            steps = np.arange(curves.shape[1]) * eval_every
            name = f"clip {clip:g}" if label == "clip" else "no clip"
            for s, curve in enumerate(curves):
                ax.plot(steps, curve, color=colours[label], lw=0.8, alpha=0.8,
                        label=name if s == 0 else None)
        ax.axhline(r["baseline"], color="k", ls="--", lw=0.8, label="baseline")
        if task_name == "adding":
            ax.axhline(r["solved_below"], color="gray", ls=":", lw=0.8, label="solved")
        ax.set_yscale("log")
        ax.set_title(f"{r['cell']}, T={r['T']}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test loss", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"{task_name}: test loss per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sweep(task_name, cell_names, lengths, *, seeds, steps, eval_every, batch_size, test_size,
          units, learning_rate, optimizer, clip_norm, seed, workdir, out=print):
    """Runs every (cell, T); prints the table; writes results.json, results.csv and a PNG."""
    os.makedirs(workdir, exist_ok=True)
    clip_norms = [float("inf"), clip_norm]
    rows, results = [], []
    for length in lengths:
        task = tasks.TASKS[task_name](length)
        for name in cell_names:
            tic = time.perf_counter()
            _, curves = train_seeds(
                task, cells.CELLS[name](units), seeds=seeds, clip_norms=clip_norms, steps=steps,
                eval_every=eval_every, batch_size=batch_size, test_size=test_size,
                learning_rate=learning_rate, optimizer=optimizer, seed=seed,
            )
            curves = jax.tree.map(np.asarray, jax.block_until_ready(curves))
            seconds = time.perf_counter() - tic
            new = summarize(task, name, length, clip_norms, curves, eval_every, seconds)
            for row in new:
                out(f"{task_name} {name} T={length} clip={row['clip']}: final test loss "
                    f"{row['final_test_median']:.4f} (baseline {task.baseline:.4f}), solved "
                    f"{row['solved']}, {seconds:.0f} s")
            rows += new
            results.append({
                "cell": name, "T": length, "baseline": task.baseline,
                "solved_below": task.solved_below, "clip_norms": clip_norms,
                "test_loss": curves.test_loss.tolist(), "rows": new,
            })
    table = format_table(rows)
    out(table)
    config = dict(task=task_name, cells=cell_names, lengths=lengths, seeds=seeds, steps=steps,
                  eval_every=eval_every, batch_size=batch_size, test_size=test_size, units=units,
                  learning_rate=learning_rate, optimizer=optimizer, clip_norm=clip_norm, seed=seed)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"config": config, "results": results}, f)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, [name for name, _ in _COLUMNS])
        writer.writeheader()
        writer.writerows({name: row[name] for name, _ in _COLUMNS} for row in rows)
    plot_curves(os.path.join(workdir, f"curves_{task_name}.png"), task_name, results, eval_every)
    return rows


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    unknown = sorted(set(_CELLS.value) - set(cells.CELLS))
    if unknown:
        raise app.UsageError(f"--cells: unknown {unknown}; choose from {sorted(cells.CELLS)}")
    try:
        lengths = [int(t) for t in _LENGTHS.value]
    except ValueError:
        raise app.UsageError(f"--lengths must be integers, got {_LENGTHS.value}") from None
    if min(lengths) < (2 if _TASK.value == "adding" else 1):
        raise app.UsageError(f"--lengths must be >= 2 for adding, >= 1 for copy, got {lengths}")
    if _STEPS.value % _EVAL_EVERY.value:
        raise app.UsageError(f"--steps ({_STEPS.value}) must be a multiple of --eval_every")
    if not _CLIP_NORM.value > 0:
        raise app.UsageError(f"--clip_norm must be positive, got {_CLIP_NORM.value}")
    sweep(
        _TASK.value, _CELLS.value, lengths, seeds=_SEEDS.value, steps=_STEPS.value,
        eval_every=_EVAL_EVERY.value, batch_size=_BATCH_SIZE.value, test_size=_TEST_SIZE.value,
        units=_UNITS.value, learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
        clip_norm=_CLIP_NORM.value, seed=_SEED.value, workdir=_WORKDIR.value,
    )


if __name__ == "__main__":
    app.run(main)
