"""Long-range tasks: cell × T × seeds, with and without gradient clipping, seeds vmapped.

Run: python -m experiments.long_range --workdir=runs/long_range
(--task=adding, --lengths=10,50,100,200; the copy task: --task=copy --lengths=10,50
--workdir=runs/long_range_copy). Every (cell, T) trains all seeds and every clip setting in one
compiled program: ``jax.vmap`` over seeds inside ``jax.vmap`` over the clip setting, each a
``lax.scan`` over the steps (on this CPU at batch 32 that costs ~1.5x the CPU of a loop over
seeds; see benchmarks/GRADIENTS.md). The clip settings are --clip_norm and, with
--compare_unclipped (the default), an unclipped twin sharing its initialisation and batches;
with --clip_norm unset only the unclipped runs. Optimiser: Adam, lr 1e-2 (in a trial at
T = 100, lr 1e-3 left LSTM on the baseline for 2000 steps in 7 of 8 runs), a fresh batch of 32
per step, 32 units, 4 seeds, a fixed test set of 512 sequences.

Writes ``results.json`` (per-seed test curves and gradient-norm statistics), ``results.csv``
(the printed table) and ``curves_<task>.png`` to --workdir.

Measured here (2 CPU cores shared with other jobs; tables and plots in docs/gradients.md), with
the trainer as it was before issue 8 (its batches now come from another split of the key, so a
rerun gives slightly different numbers):
- adding: 12 min wall (4.5 min of CPU). GRU solves every T up to 200 (4/4 seeds, test MSE
  < 0.05 by step 100-400, final ~2e-4); LSTM solves T = 10 and 50, T = 100 only with clipping
  (4/4 vs 0/4), not T = 200; SimpleRNN only T = 10. Baseline 1/6.
- copy, T = 10 and 50: 3.6 min wall (1.7 min of CPU). Nothing solved in 1000 steps; GRU ends
  ~10-17 % below the memoryless baseline (T = 50: 0.248 vs 0.297), SimpleRNN on it.
"""

import csv
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from rnn_jax.cells import CELLS
from rnn_jax.synthetic import TASKS
from rnn_jax.train import make_task_trainer


def _non_empty(values) -> str | None:
    return None if values else "must not be empty"


@dataclasses.dataclass(frozen=True)
class Config:
    """One sweep: every cell at every length, ``seeds`` runs per clip setting."""

    task: str = cli.field("adding", "Which task.", choices=tuple(sorted(TASKS)))
    cells: tuple[str, ...] = cli.field(
        ("simple_rnn", "lstm", "gru"), "Cells to compare.", choices=tuple(CELLS), check=_non_empty
    )
    lengths: tuple[int, ...] = cli.field(
        (10, 50, 100, 200),
        "T: sequence length (adding, >= 2) or delay (copy).",
        check=cli.all_positive,
    )
    seeds: int = cli.field(4, "Seeds per configuration (vmapped).", check=cli.positive)
    steps: int = cli.field(1000, "Training steps; a multiple of eval_every.", check=cli.positive)
    eval_every: int = cli.field(50, "Steps between test evaluations.", check=cli.positive)
    batch_size: int = cli.field(32, "Sequences per step.", check=cli.positive)
    test_size: int = cli.field(512, "Test sequences (fixed).", check=cli.positive)
    units: int = cli.field(32, "Hidden units.", check=cli.positive)
    learning_rate: float = cli.field(1e-2, "Learning rate.", check=cli.positive)
    optimizer: str = cli.field("adam", "Optimiser.", choices=("adam", "rmsprop"))
    clip_norm: float | None = cli.clip_norm(1.0)
    compare_unclipped: bool = cli.field(
        True, "Also train an unclipped twin of every clipped run (same init and batches)."
    )
    seed: int = cli.field(0, "PRNG seed.")

    def __post_init__(self):
        cli.validate(self)
        for name in ("cells", "lengths"):
            values = getattr(self, name)
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{name}={values!r} lists {twice[0]!r} more than once")
        if self.task == "adding" and min(self.lengths) < 2:
            raise ValueError(f"lengths={self.lengths!r}: the adding problem needs T >= 2")
        if self.steps % self.eval_every:
            raise ValueError(
                f"steps={self.steps} must be a multiple of eval_every={self.eval_every}"
            )

    def clip_norms(self) -> list[float]:
        """The clip settings every (cell, T) trains, ``inf`` for none: ``[inf, clip]``,
        ``[clip]`` without the unclipped twin, ``[inf]`` with ``clip_norm`` unset."""
        if self.clip_norm is None:
            return [math.inf]
        return [math.inf, self.clip_norm] if self.compare_unclipped else [self.clip_norm]


def prepare(task, cell, config: Config):
    """One (cell, T)'s trainer and what its runs start from, shared by every clip setting.

    Returns:
      ``(model, train, params, keys, test)``: :func:`rnn_jax.train.make_task_trainer`'s model
      and pure ``train``, the initial params and the batch keys of every seed (leading axis
      ``seeds``) and the fixed test set ``(xs, targets)``.
    """
    model, train = make_task_trainer(
        cell,
        task,
        num_steps=config.steps,
        eval_every=config.eval_every,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
    )
    k_init, k_data, k_test = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    params = jax.vmap(model.init)(jax.random.split(k_init, config.seeds))
    keys = jax.random.split(k_data, config.seeds)
    return model, train, params, keys, task.sample(k_test, config.test_size)


def train_seeds(task, cell, config: Config):
    """Trains ``config.seeds`` models for every clip setting in one compiled program.

    Returns:
      ``(params, curves)`` with leading axes ``(len(config.clip_norms()), seeds)``:
      :class:`rnn_jax.train.TrainCurves`.
    """
    _, train, params, keys, (test_xs, test_targets) = prepare(task, cell, config)
    over_seeds = jax.vmap(train, in_axes=(0, 0, None, None, None))
    over_clips = jax.vmap(over_seeds, in_axes=(None, None, 0, None, None))
    # The trainer's clip_norm is an array, inf for no clipping.
    clips = jnp.asarray(config.clip_norms(), jnp.float32)
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
    finite_clips = [c for c in clip_norms if np.isfinite(c)]
    for i, clip in enumerate(clip_norms):
        test, norms = curves.test_loss[i], curves.grad_norm[i]
        final = test[:, -1]
        solved = first_solved(test, task.solved_below, eval_every)
        solved_steps = [s for s in solved if s is not None]
        rows.append(
            {
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
                # The fraction of steps whose pre-clip norm exceeds the clip; in the unclipped
                # runs, the steps clipping would have touched. None without a clip setting.
                "frac_above_clip": float(np.mean(norms > finite_clips[0]))
                if finite_clips
                else None,
                "seconds": seconds,
            }
        )
    return rows


_COLUMNS = [
    ("task", "{}"),
    ("cell", "{}"),
    ("T", "{}"),
    ("clip", "{}"),
    ("baseline", "{:.4f}"),
    ("final_test_median", "{:.4f}"),
    ("final_test_min", "{:.4f}"),
    ("final_test_max", "{:.4f}"),
    ("solved", "{}"),
    ("first_solved_median", "{}"),
    ("grad_norm_median", "{:.3f}"),
    ("grad_norm_p99", "{:.3f}"),
    ("grad_norm_max", "{:.3g}"),
    ("frac_above_clip", "{:.3f}"),
    ("seconds", "{:.0f}"),
]


def format_table(rows) -> str:
    """A Markdown table of the summary rows (None as ``-``)."""
    head = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        values = ["-" if row[name] is None else fmt.format(row[name]) for name, fmt in _COLUMNS]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot_curves(path, task_name, results, eval_every):
    """Test loss against step, one panel per (T, cell), seeds as thin lines, baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["T"] for r in results})
    names = list(dict.fromkeys(r["cell"] for r in results))
    fig, axes = plt.subplots(
        len(lengths),
        len(names),
        figsize=(3.2 * len(names), 2.4 * len(lengths)),
        squeeze=False,
        sharex=True,
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
                ax.plot(
                    steps,
                    curve,
                    color=colours[label],
                    lw=0.8,
                    alpha=0.8,
                    label=name if s == 0 else None,
                )
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


def run(config: Config, workdir: str, out=print) -> list[dict]:
    """Trains every (cell, T); prints the table; writes results.json, results.csv and a PNG.

    Returns:
      The table's rows, one per (T, cell, clip setting), in that order.
    """
    os.makedirs(workdir, exist_ok=True)
    clip_norms = config.clip_norms()
    rows, results = [], []
    for length in config.lengths:
        task = TASKS[config.task](length)
        for name in config.cells:
            tic = time.perf_counter()
            _, curves = train_seeds(task, CELLS[name](config.units), config)
            curves = jax.tree.map(np.asarray, jax.block_until_ready(curves))
            seconds = time.perf_counter() - tic
            new = summarize(task, name, length, clip_norms, curves, config.eval_every, seconds)
            for row in new:
                out(
                    f"{config.task} {name} T={length} clip={row['clip']}: final test loss "
                    f"{row['final_test_median']:.4f} (baseline {task.baseline:.4f}), solved "
                    f"{row['solved']}, {seconds:.0f} s"
                )
            rows += new
            results.append(
                {
                    "cell": name,
                    "T": length,
                    "baseline": task.baseline,
                    "solved_below": task.solved_below,
                    # JSON has no inf: the unclipped setting is written as null.
                    "clip_norms": [None if math.isinf(c) else c for c in clip_norms],
                    "test_loss": curves.test_loss.tolist(),
                    "rows": new,
                }
            )
    out(format_table(rows))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "results": results}, f)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, [name for name, _ in _COLUMNS])
        writer.writeheader()
        writer.writerows({name: row[name] for name, _ in _COLUMNS} for row in rows)
    plotted = [{**r, "clip_norms": clip_norms} for r in results]
    plot_curves(
        os.path.join(workdir, f"curves_{config.task}.png"), config.task, plotted, config.eval_every
    )
    return rows


if __name__ == "__main__":
    cli.main(Config, run, workdir="runs/long_range")
