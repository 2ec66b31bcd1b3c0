"""Long-range tasks: cell × T × seeds, with and without gradient clipping, seeds vmapped.

Run: python -m experiments.long_range --workdir=runs/long_range
(--task=adding, --lengths=10,50,100,200; the copy task: --task=copy --lengths=10,50
--workdir=runs/long_range_copy). --cells takes any of ``rnn_jax.registry.NAMES``; each cell is
``registry.named_cell(name, units, L)`` with L the task's sequence length (T for adding,
T + 20 for copy), so chrono initialisation and IndRNN's bound are set up for the sequences it
trains on. Every (cell, T) trains all seeds and every clip setting in one compiled program:
``jax.vmap`` over seeds inside ``jax.vmap`` over the clip setting, each a ``lax.scan`` over the
steps (on this CPU at batch 32 that costs ~1.5x the CPU of a loop over seeds; see
benchmarks/GRADIENTS.md). The clip settings are --clip_norm and, with --compare_unclipped (the
default), an unclipped twin sharing its initialisation and batches; with --clip_norm unset only
the unclipped runs. Optimiser: Adam, lr 1e-2 (in a trial at T = 100, lr 1e-3 left LSTM on the
baseline for 2000 steps in 7 of 8 runs), a fresh batch of 32 per step, 32 units, 4 seeds, a
fixed test set of 512 sequences.

--lr_factors=nu_log=0.5,theta_log=0.5 trains the named parameters at that fraction of the
learning rate (the LRU paper's recipe for ``ν, θ``; an ``optax.multi_transform`` over the
parameters' names, :func:`make_optimizer`), in the cells that have them; --lru_r_min moves
LRU's ring of initial moduli (:func:`build_cell`). Neither changes any other cell.

With --budget_s every (cell, T) trains for about that many seconds instead of --steps steps
(at most --steps): each cell's time per step is measured once, on --calibration_steps steps at
the longest T, and scaled by the sequence length (an overestimate at short T, where a step
costs less than its share: the runs there train for less than the budget; results.json has
each run's ``timings``). Compilation (~5-15 s per program here) is not counted.

Writes ``results.json`` (per-seed test curves, steps, timings and gradient-norm statistics;
with --save_grad_norms every step's pre-clip norm; rewritten after every (cell, T)),
``results.csv`` (the printed table), ``curves_<task>.png`` (every seed, a panel per (T, cell)),
``summary_<task>.png`` (seed medians, a panel per T; :func:`replot` redraws both) and every
(cell, T)'s trained params (axes: clip setting, seed), an orbax checkpoint with a sha256
digest, ``params/<cell>_T<T>/<steps>/`` (:func:`load_params`; a damaged one is named and
refused), to --workdir.

Measured here (2 CPU cores shared with other jobs; tables and plots in docs/gradients.md), with
an earlier version of the trainer (its batches now come from another split of the key, so a
rerun gives slightly different numbers):
- adding: 12 min wall (4.5 min of CPU). GRU solves every T up to 200 (4/4 seeds, test MSE
  < 0.05 by step 100-400, final ~2e-4); LSTM solves T = 10 and 50, T = 100 only with clipping
  (4/4 vs 0/4), not T = 200; SimpleRNN only T = 10. Baseline 1/6.
- copy, T = 10 and 50: 3.6 min wall (1.7 min of CPU). Nothing solved in 1000 steps; GRU ends
  ~10-17 % below the memoryless baseline (T = 50: 0.248 vs 0.297), SimpleRNN on it.
The comparison of every registry cell at T = 100-1000 (a ~25 s budget per (cell, T),
then 3000-4000 equal steps for the promising cells at T = 500 and 1000) is in
docs/gradients.md, "Who carries memory how far"; :func:`comparison_table` and
:func:`plot_merged` merge the sweeps' workdirs.
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
import optax

from experiments import cli
from rnn_jax import registry
from rnn_jax.checkpoint import CheckpointError, Checkpoints, save_checkpoint
from rnn_jax.linear import lru
from rnn_jax.optim import rmsprop
from rnn_jax.rundir import open_run
from rnn_jax.sweep import make_task_trainer
from rnn_jax.synthetic import TASKS
from rnn_jax.trees import leaf_name, named_leaves

# rnn_jax.linear.lru's default largest initial modulus.
_LRU_R_MAX = 0.999


def build_cell(config, name: str, length: int):
    """``registry.named_cell(name, config.units, length)``, but LRU with ``config.lru_r_min``
    when that is set (its ring of initial moduli ``[lru_r_min, 0.999]``)."""
    if name == "lru" and config.lru_r_min is not None:
        return lru(config.units, r_min=config.lru_r_min, r_max=_LRU_R_MAX)
    return registry.named_cell(name, config.units, length)


def _non_empty(values) -> str | None:
    return None if values else "must not be empty"


_FACTOR_FORM = "must each be name=factor, a new name and a finite factor >= 0"


def _malformed_factor(values) -> str | None:
    """The first entry of ``values`` that is not ``name=factor`` (or repeats a name)."""
    names = set()
    for value in values:
        name, sep, factor = value.partition("=")
        try:
            number = float(factor)
        except ValueError:
            number = math.nan
        if not sep or not name or not (math.isfinite(number) and number >= 0) or name in names:
            return value
        names.add(name)
    return None


def parse_lr_factors(values) -> dict[str, float]:
    """``("nu_log=0.5", ...)`` -> ``{"nu_log": 0.5, ...}`` (ValueError when malformed)."""
    bad = _malformed_factor(values)
    if bad is not None:
        raise ValueError(f"lr_factors={','.join(values)} {_FACTOR_FORM}: {bad!r} is not")
    return {name: float(factor) for name, _, factor in (v.partition("=") for v in values)}


def _factor_problem(values) -> str | None:
    bad = _malformed_factor(values)
    return None if bad is None else f"{_FACTOR_FORM}: {bad!r} is not"


def param_names(cell, input_dim: int) -> set[str]:
    """The names (:func:`rnn_jax.trees.leaf_name`) of ``cell``'s parameters, from their shapes
    alone."""
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    return {names[-1] for names, _ in named_leaves(shapes)}


def cell_lr_factors(config, cell, input_dim: int) -> dict[str, float]:
    """The config's learning-rate factors for the parameters ``cell`` has."""
    names = param_names(cell, input_dim)
    return {k: v for k, v in parse_lr_factors(config.lr_factors).items() if k in names}


def make_optimizer(
    name: str, learning_rate: float, lr_factors: dict[str, float] | None = None
) -> optax.GradientTransformation:
    """The sweep's optimiser: ``"adam"`` (``optax.adam``, default betas) or ``"rmsprop"`` (the
    Keras 3 defaults of :func:`rnn_jax.optim.rmsprop`) at ``learning_rate``.

    ``lr_factors``: ``{param name: factor}``: every parameter whose name
    (:func:`rnn_jax.trees.leaf_name`, the last key of its path, e.g. ``"nu_log"``) is listed
    learns at ``factor × learning_rate``, its optimiser update scaled by ``factor`` (with Adam
    exactly a smaller learning rate); the rest at ``learning_rate``. An
    ``optax.multi_transform`` labels each parameter with its factor.
    """
    if name not in ("adam", "rmsprop"):
        raise ValueError(f"optimizer={name!r} must be 'adam' or 'rmsprop'")
    base = optax.adam(learning_rate) if name == "adam" else rmsprop(learning_rate)
    factors = dict(lr_factors or {})
    if not factors:
        return base

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: repr(factors.get(leaf_name(path), 1.0)), params
        )

    scaled = {
        repr(f): base if f == 1.0 else optax.chain(base, optax.scale(f))
        for f in {*factors.values(), 1.0}
    }
    return optax.multi_transform(scaled, labels)


@dataclasses.dataclass(frozen=True)
class Config:
    """One sweep: every cell at every length, ``seeds`` runs per clip setting."""

    task: str = cli.field("adding", "Which task.", choices=tuple(sorted(TASKS)))
    cells: tuple[str, ...] = cli.field(
        ("simple_rnn", "lstm", "gru"),
        "Cells to compare (rnn_jax.registry.NAMES).",
        choices=registry.NAMES,
        check=_non_empty,
    )
    lengths: tuple[int, ...] = cli.field(
        (10, 50, 100, 200),
        "T: sequence length (adding, >= 2) or delay (copy).",
        check=cli.all_positive,
    )
    seeds: int = cli.field(4, "Seeds per configuration (vmapped).", check=cli.positive)
    steps: int = cli.field(
        1000,
        "Training steps (with budget_s: at most this many); a multiple of eval_every.",
        check=cli.positive,
    )
    budget_s: float | None = cli.field(
        None,
        "Training seconds per (cell, T), all seeds and clip settings together: each trains as "
        "many steps as fit (a multiple of eval_every, at least one eval_every, at most steps), "
        "timed on calibration_steps steps at the longest T and scaled by T. Unset: steps.",
        check=cli.optional_positive,
    )
    calibration_steps: int = cli.field(
        4, "Steps timed per cell to size budget_s's runs.", check=cli.positive
    )
    eval_every: int = cli.field(50, "Steps between test evaluations.", check=cli.positive)
    batch_size: int = cli.field(32, "Sequences per step.", check=cli.positive)
    test_size: int = cli.field(512, "Test sequences (fixed).", check=cli.positive)
    units: int = cli.field(32, "Hidden units.", check=cli.positive)
    learning_rate: float = cli.field(1e-2, "Learning rate.", check=cli.positive)
    optimizer: str = cli.field("adam", "Optimiser.", choices=("adam", "rmsprop"))
    lr_factors: tuple[str, ...] = cli.field(
        (),
        "Per-parameter learning-rate factors, name=factor (e.g. nu_log=0.5,theta_log=0.5, the "
        "LRU paper's): a parameter of that name learns at factor x learning_rate, in every "
        "cell that has one; each name must belong to at least one of the cells.",
        check=_factor_problem,
    )
    clip_norm: float | None = cli.clip_norm(1.0)
    compare_unclipped: bool = cli.field(
        True, "Also train an unclipped twin of every clipped run (same init and batches)."
    )
    save_grad_norms: bool = cli.field(
        False, "Also write every step's pre-clip gradient norm to results.json."
    )
    lru_r_min: float | None = cli.field(
        None,
        "LRU's smallest initial |lambda|, in [0, 0.999) (unset: the registry's 0.9). At T = 500 "
        "only ~1 of 32 default modes keeps a tenth of a symbol; r_min=0.99 keeps ~12.",
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
        if self.lru_r_min is not None and not 0.0 <= self.lru_r_min < _LRU_R_MAX:
            raise ValueError(f"lru_r_min={self.lru_r_min} must be in [0, {_LRU_R_MAX})")
        task = TASKS[self.task](max(self.lengths))
        names = set()
        for name in self.cells:
            names |= param_names(build_cell(self, name, task.length), task.input_dim)
        unused = [k for k in parse_lr_factors(self.lr_factors) if k not in names]
        if unused:
            raise ValueError(
                f"lr_factors={','.join(self.lr_factors)}: none of the cells has a parameter "
                f"called {unused[0]!r}"
            )

    def clip_norms(self) -> list[float]:
        """The clip settings every (cell, T) trains, ``inf`` for none: ``[inf, clip]``,
        ``[clip]`` without the unclipped twin, ``[inf]`` with ``clip_norm`` unset."""
        if self.clip_norm is None:
            return [math.inf]
        return [math.inf, self.clip_norm] if self.compare_unclipped else [self.clip_norm]


def prepare(task, cell, config: Config, steps: int | None = None, eval_every: int | None = None):
    """One (cell, T)'s trainer and what its runs start from, shared by every clip setting.

    ``steps`` and ``eval_every`` default to the config's.

    Returns:
      ``(model, train, params, keys, test)``: :func:`rnn_jax.sweep.make_task_trainer`'s model
      and pure ``train``, the initial params and the batch keys of every seed (leading axis
      ``seeds``) and the fixed test set ``(xs, targets)``.
    """
    optimizer = make_optimizer(
        config.optimizer, config.learning_rate, cell_lr_factors(config, cell, task.input_dim)
    )
    model, train = make_task_trainer(
        cell,
        task,
        optimizer=optimizer,
        num_steps=config.steps if steps is None else steps,
        eval_every=config.eval_every if eval_every is None else eval_every,
        batch_size=config.batch_size,
    )
    k_init, k_data, k_test = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    params = jax.vmap(model.init)(jax.random.split(k_init, config.seeds))
    keys = jax.random.split(k_data, config.seeds)
    return model, train, params, keys, task.sample(k_test, config.test_size)


def _compiled(train, params, keys, clips, test_xs, test_targets):
    """The vmapped (clip settings × seeds) trainer, compiled ahead of time.

    Raises:
      ValueError: the compiled program needs more memory than the device has free (XLA's own
        estimate, before anything is allocated), naming the lengths and what to lower.
    """
    over_seeds = jax.vmap(train, in_axes=(0, 0, None, None, None))
    over_clips = jax.vmap(over_seeds, in_axes=(None, None, 0, None, None))
    program = jax.jit(over_clips).lower(params, keys, clips, test_xs, test_targets).compile()
    stats = program.memory_analysis()
    if stats is not None:
        needed = stats.temp_size_in_bytes + stats.argument_size_in_bytes
        needed += stats.output_size_in_bytes
        free = _free_memory()
        if free is not None and needed > free:
            raise ValueError(
                f"lengths: at sequences of {test_xs.shape[1]} steps the sweep's program needs "
                f"about {needed / 1e9:.1f} GB (XLA's estimate) and {free / 1e9:.1f} GB are "
                "free; shorten lengths, or lower seeds, batch_size, test_size or units"
            )
    return program


def _free_memory() -> int | None:
    """Bytes the default device can still allocate: the accelerator's own count, or the host's
    available memory (/proc/meminfo) for the CPU; None where neither is known."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def train_seeds(task, cell, config: Config, steps: int | None = None, timings=None):
    """Trains ``config.seeds`` models for every clip setting in one compiled program.

    ``steps`` defaults to ``config.steps``; ``timings``, a dict, receives ``compile_s`` and
    ``train_s`` (the compiled program's run).

    Returns:
      ``(params, curves)`` with leading axes ``(len(config.clip_norms()), seeds)``:
      :class:`rnn_jax.sweep.TrainCurves`.
    """
    _, train, params, keys, (test_xs, test_targets) = prepare(task, cell, config, steps)
    # The trainer's clip_norm is an array, inf for no clipping.
    clips = jnp.asarray(config.clip_norms(), jnp.float32)
    tic = time.perf_counter()
    program = _compiled(train, params, keys, clips, test_xs, test_targets)
    toc = time.perf_counter()
    out = jax.block_until_ready(program(params, keys, clips, test_xs, test_targets))
    if timings is not None:
        timings["compile_s"] = toc - tic
        timings["train_s"] = time.perf_counter() - toc
    return out


def seconds_per_step(task, cell, config: Config) -> float:
    """Seconds one training step of every seed and clip setting takes at ``task``'s length:
    ``config.calibration_steps`` steps, timed on the compiled program's second run. An
    evaluation on a test set ``calibration_steps / eval_every`` times the config's closes them,
    so that the evaluations' share of the time is the real run's."""
    n = config.calibration_steps
    test_size = max(1, round(config.test_size * n / config.eval_every))
    small = dataclasses.replace(config, test_size=test_size)
    _, train, params, keys, test = prepare(task, cell, small, steps=n, eval_every=n)
    clips = jnp.asarray(config.clip_norms(), jnp.float32)
    program = _compiled(train, params, keys, clips, *test)
    jax.block_until_ready(program(params, keys, clips, *test))  # the first run warms up
    tic = time.perf_counter()
    jax.block_until_ready(program(params, keys, clips, *test))
    return (time.perf_counter() - tic) / n


def budget_steps(config: Config, seconds_per_step: float) -> int:
    """Steps that fit ``config.budget_s``: a multiple of ``eval_every`` in
    ``[eval_every, steps]``."""
    chunks = math.floor(config.budget_s / (seconds_per_step * config.eval_every))
    return config.eval_every * min(max(chunks, 1), config.steps // config.eval_every)


def params_path(workdir, cell_name, length) -> str:
    """The checkpoint directory where :func:`run` saves a (cell, T)'s trained params."""
    return os.path.join(workdir, "params", f"{cell_name}_T{length}")


def save_params(directory, steps: int, params, clip_norms) -> None:
    """Writes a (cell, T)'s trained ``params`` (axes: clip setting, seed) as checkpoint
    ``steps`` of ``directory`` (:func:`rnn_jax.checkpoint.save_checkpoint`: atomic, with a
    sha256 digest), the ``clip_norms`` in its meta. Every step is kept: a rerun's params of as
    many steps set the earlier ones aside as ``<steps>.replaced``."""
    meta = {"clip_norms": [None if math.isinf(c) else c for c in clip_norms]}
    save_checkpoint(directory, steps, params, meta, max_to_keep=None)


def load_params(directory, like, step: int | None = None):
    """The params :func:`save_params` wrote to ``directory``, checked against their digest.

    Args:
      directory: :func:`params_path`.
      like: params in the structure of the saved ones without their clip-setting axis, e.g.
        the initial params of :func:`prepare` (axis: seed).
      step: the checkpoint, the run's steps; None: the most steps saved there.

    Returns:
      ``like``'s structure, each leaf ``(clip settings, *like's shape)``.

    Raises:
      CheckpointError: there are no params in ``directory`` (or only the ``.npz`` of an earlier
        version of this script), or they are another model's.
      DamagedCheckpointError: their files are missing, unreadable or differ from the digest.
    """
    if not os.path.isdir(directory) and os.path.isfile(f"{directory}.npz"):
        raise CheckpointError(
            f"{directory}.npz holds params saved as .npz by an earlier version of "
            "experiments.long_range, which are no longer read; rerun its sweep (the same "
            "command) to save them as checkpoints"
        )
    with Checkpoints(directory, writable=False) as checkpoints:
        steps = checkpoints.steps()
        if not steps:
            raise CheckpointError(
                f"there are no saved params in {directory!r}; pass the workdir of a finished "
                "experiments.long_range sweep"
            )
        step = steps[0] if step is None else step
        clips = len(checkpoints.read_meta(step)[0]["clip_norms"])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((clips, *x.shape), x.dtype), like)
        return checkpoints.restore(step, abstract)[0]


def first_solved(test_loss: np.ndarray, threshold: float, eval_every: int):
    """Per run, the first evaluated step with test loss below ``threshold`` (None if never)."""
    steps = []
    for curve in test_loss:
        below = np.flatnonzero(curve < threshold)
        steps.append(int(below[0]) * eval_every if below.size else None)
    return steps


def summarize(task, cell_name, length, clip_norms, curves, eval_every, seconds, steps=None):
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
                "steps": steps if steps is not None else (test.shape[1] - 1) * eval_every,
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
    ("steps", "{}"),
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


def plot_summary(path, task_name, results, eval_every):
    """Test loss against step, one panel per T, one line per cell (the median over seeds of
    the last clip setting's runs), the baseline dashed and the solved threshold dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["T"] for r in results})
    names = list(dict.fromkeys(r["cell"] for r in results))
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths), 3.2), squeeze=False)
    # A registry cell keeps its colour across plots; a labelled variant of one ("lru r_min=0.99",
    # see comparison_table's labels) is drawn in a darker shade of its cell's colour (the first
    # variant 45 % black, the next 75 %); any other name in black and greys.
    palette = matplotlib.colormaps["tab20"]
    extras = [n for n in names if n not in registry.NAMES]
    for r in results:
        ax = axes[0, lengths.index(r["T"])]
        curves = np.asarray(r["test_loss"][-1])
        steps = np.arange(curves.shape[1]) * r.get("eval_every", eval_every)
        base = r["cell"].split(" ")[0]
        if base in registry.NAMES:
            colour = np.asarray(palette(registry.NAMES.index(base) % 20 / 20 + 0.025)[:3])
            if r["cell"] != base:
                variants = [n for n in extras if n.split(" ")[0] == base]
                colour = colour * (0.55, 0.25)[variants.index(r["cell"]) % 2]
            colour = tuple(colour)
        else:
            colour = str(0.45 * (extras.index(r["cell"]) % 3) / 2)  # grey levels 0, 0.22, 0.45
        ax.plot(steps, np.median(curves, axis=0), color=colour, lw=1.1, label=r["cell"])
    for j, length in enumerate(lengths):
        ax = axes[0, j]
        r = next(r for r in results if r["T"] == length)
        ax.axhline(r["baseline"], color="k", ls="--", lw=0.8)
        ax.axhline(r["solved_below"], color="gray", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{task_name}, T={length}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("test loss (median over seeds)", fontsize=8)
    # One legend for every cell of every panel.
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    axes[0, -1].legend(handles.values(), handles.keys(), fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def replot(workdir):
    """Redraws ``curves_<task>.png`` and ``summary_<task>.png`` from ``workdir/results.json``."""
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    task, eval_every = saved["config"]["task"], saved["config"]["eval_every"]
    results = [
        {**r, "clip_norms": [math.inf if c is None else c for c in r["clip_norms"]]}
        for r in saved["results"]
    ]
    plot_curves(os.path.join(workdir, f"curves_{task}.png"), task, results, eval_every)
    plot_summary(os.path.join(workdir, f"summary_{task}.png"), task, results, eval_every)


def _labelled_sweeps(workdirs, labels: dict[str, str] | None):
    """``(config, results)`` of each workdir's ``results.json``, in order; with ``labels``, a
    workdir's label is appended to its results' cell names (``"lru"`` and ``"no clip"``:
    ``"lru no clip"``), so that a rerun with another recipe gets a row of its own in merged
    tables and plots instead of replacing the cell's entry."""
    unknown = sorted(set(labels or {}) - set(map(str, workdirs)))
    if unknown:
        raise ValueError(f"labels name {unknown[0]!r}, which is not one of the workdirs")
    for workdir in workdirs:
        with open(os.path.join(workdir, "results.json")) as f:
            saved = json.load(f)
        label = (labels or {}).get(str(workdir))
        results = saved["results"]
        if label:
            results = [{**r, "cell": f"{r['cell']} {label}"} for r in results]
        yield saved["config"], results


def merged_results(workdirs, task_name: str, labels: dict[str, str] | None = None) -> list[dict]:
    """The results of ``task_name`` in ``workdirs`` (``results.json`` of :func:`run`), each with
    its sweep's ``eval_every``; a (cell, T) that a later workdir also ran is the later one's.
    ``labels``: as in :func:`comparison_table`."""
    merged = {}
    for config, results in _labelled_sweeps(workdirs, labels):
        if config["task"] != task_name:
            continue
        for r in results:
            merged[(r["cell"], r["T"])] = {**r, "eval_every": config["eval_every"]}
    return list(merged.values())


def plot_merged(path, task_name: str, workdirs, labels: dict[str, str] | None = None) -> None:
    """:func:`plot_summary` of :func:`merged_results`: a panel per T, a line per cell."""
    results = sorted(
        merged_results(workdirs, task_name, labels),
        key=lambda r: (
            r["T"],
            registry.NAMES.index(r["cell"]) if r["cell"] in registry.NAMES else 0,
        ),
    )
    plot_summary(path, task_name, results, eval_every=None)


def comparison_table(workdirs, seconds: bool = False, labels: dict[str, str] | None = None) -> str:
    """A Markdown table of sweeps: a row per cell, a column per (task, T), each entry
    ``solved/seeds @ first solved step (median) · final test loss (median) · steps``, for the
    last clip setting; with ``seconds``, ``· steps / training seconds`` (the compiled
    program's run, ``timings["train_s"]``). ``workdirs``: directories :func:`run` wrote
    ``results.json`` to, any number per task; a (cell, task, T) that a later one also ran is
    its entry (a longer rerun replaces a sweep's entry, the others stay). ``labels``:
    ``{workdir: label}``, appended to that workdir's cell names, a row of their own (e.g. the
    same cell trained with another recipe); a label for a path not in ``workdirs`` raises."""
    columns, entries, cells_seen = [], {}, []
    for config, results in _labelled_sweeps(workdirs, labels):
        task = config["task"]
        for r in results:
            row = r["rows"][-1]
            if (task, r["T"]) not in columns:
                columns.append((task, r["T"]))
            if r["cell"] not in cells_seen:
                cells_seen.append(r["cell"])
            first = row["first_solved_median"]
            solved = row["solved"]
            text = f"{solved}" + ("" if first is None else f" @{first:.0f}")
            text += f" · {row['final_test_median']:.3g} · {r['steps']}"
            if seconds and "train_s" in r.get("timings", {}):
                text += f" / {r['timings']['train_s']:.0f} s"
            entries[(r["cell"], task, r["T"])] = f"**{text}**" if solved[0] != "0" else text
    head = "| cell | " + " | ".join(f"{task} T={t}" for task, t in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for name in cells_seen:
        values = [entries.get((name, task, t), "") for task, t in columns]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def run(config: Config, workdir: str, out=print) -> list[dict]:
    """Trains every (cell, T); prints the table; writes results.json, results.csv, a PNG and
    every (cell, T)'s trained params (:func:`params_path`). A workdir that holds another
    experiment's or configuration's results is refused (:func:`rnn_jax.rundir.open_run`).

    Returns:
      The table's rows, one per (T, cell, clip setting), in that order.
    """
    meta = {"experiment": "long_range", "config": cli.resume_key(config, ())}
    with open_run(workdir, meta, checkpoints=False, files=("results.json", "results.csv")) as run:
        return _sweep(config, workdir, run, out)


def _sweep(config: Config, workdir: str, run, out) -> list[dict]:
    clip_norms = config.clip_norms()
    longest = TASKS[config.task](max(config.lengths))
    per_step = {}  # cell -> seconds per step at the longest T (with budget_s)
    rows, results = [], []
    for length in config.lengths:
        task = TASKS[config.task](length)
        for name in config.cells:
            tic = time.perf_counter()
            # Length-dependent initialisations (chrono, IndRNN) span the whole sequence.
            cell = build_cell(config, name, task.length)
            steps = config.steps
            if config.budget_s is not None:
                if name not in per_step:
                    long_cell = build_cell(config, name, longest.length)
                    per_step[name] = seconds_per_step(longest, long_cell, config)
                    out(f"{name}: {per_step[name]:.3f} s per step at T={longest.length}")
                steps = budget_steps(config, per_step[name] * task.length / longest.length)
            timings = {}
            params, curves = train_seeds(task, cell, config, steps, timings)
            curves = jax.tree.map(np.asarray, curves)
            run.record()  # whose results these are, before the first of them
            save_params(params_path(workdir, name, length), steps, params, clip_norms)
            seconds = time.perf_counter() - tic
            new = summarize(
                task, name, length, clip_norms, curves, config.eval_every, seconds, steps
            )
            for row in new:
                out(
                    f"{config.task} {name} T={length} clip={row['clip']}: {steps} steps, final "
                    f"test loss {row['final_test_median']:.4f} (baseline {task.baseline:.4f}), "
                    f"solved {row['solved']}, {seconds:.0f} s "
                    f"(compile {timings['compile_s']:.0f} s, train {timings['train_s']:.0f} s)"
                )
            rows += new
            results.append(
                {
                    "cell": name,
                    "T": length,
                    "steps": steps,
                    "baseline": task.baseline,
                    "solved_below": task.solved_below,
                    # JSON has no inf: the unclipped setting is written as null.
                    "clip_norms": [None if math.isinf(c) else c for c in clip_norms],
                    "test_loss": curves.test_loss.tolist(),
                    "grad_norm": curves.grad_norm.tolist() if config.save_grad_norms else None,
                    "timings": timings,
                    "rows": new,
                }
            )
            # Written after every (cell, T): a long sweep can be read while it runs.
            record = {"config": dataclasses.asdict(config), "results": results}
            run.write("results.json", json.dumps(record).encode())
    out(format_table(rows))
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, [name for name, _ in _COLUMNS])
        writer.writeheader()
        writer.writerows({name: row[name] for name, _ in _COLUMNS} for row in rows)
    plotted = [{**r, "clip_norms": clip_norms} for r in results]
    plot_curves(
        os.path.join(workdir, f"curves_{config.task}.png"), config.task, plotted, config.eval_every
    )
    plot_summary(
        os.path.join(workdir, f"summary_{config.task}.png"), config.task, plotted, config.eval_every
    )
    return rows


if __name__ == "__main__":
    cli.main(Config, run, workdir="runs/long_range")
