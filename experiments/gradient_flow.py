"""Gradient flow through time: cells × initialisations × T, at init and after training, many seeds.

Run: python -m experiments.gradient_flow --workdir=runs/gradient_flow

For each configuration (SimpleRNN with recurrent gain 0.5/1/1.5/3, IRNN, LSTM with forget bias
1 and 0, GRU) and each T (default 50 and 200), the loss is the adding problem's MSE on the last
output (a Dense(1) head), and the probes of :mod:`rnn_jax.gradients` measure, per seed:
``‖∂L/∂h_t‖`` for every t (float64, so that vanishing gradients do not underflow), the step
Jacobians' largest singular values and ``‖J_{T-1} ⋯ J_{t+1}‖₂``, and gate/tanh saturation (as
the cell names its units: the relu IRNN has neither, shown as ``-``); at initialisation and
again after --train_steps steps of Adam (lr 1e-2, --clip_norm 1.0; unset: no clipping) on the
adding problem of that T. Configurations that differ only in their initialisation (the four
SimpleRNN gains; LSTM forget bias 1 and 0) train and are probed together: one compiled program,
vmapped over configurations × seeds. Reported: median over seeds and the spread between the
10th and 90th percentiles.

Any name of ``rnn_jax.registry`` is a configuration too (its default initialisation, built by
``registry.named_cell(name, units, T)``; a group of its own). With --trained_from=WORKDIR, a
workdir of ``experiments.long_range`` on the adding or the copy task, nothing trains here: the
probes take the sweep's own models (its initial params, rebuilt from its config, and its trained
params of the clipped runs, its seeds) at each T, and the table its test losses and pre-clip
gradient norms. For LRU, whose carry is the real and imaginary halves of a complex state,
``‖∂L/∂h_t‖`` is the norm over both halves (``cell.hidden`` of the per-part norms).

A copy sweep (``rnn_jax.synthetic.copy_task(delay)``, --lengths its delays, as long_range's):
T in the table is the delay, the probed sequences are copy sequences of ``delay + 2·10`` steps
(10 symbols, the wait, the cue, the recall), drawn as the adding ones are, and the probed loss
L is the part that needs memory: the mean cross-entropy of the Dense head on the last 10 outputs
(the recall after the cue; :func:`probed_loss`), so ``‖∂L/∂h_t‖`` at t < 10 shows how much of
the recall's gradient reaches the steps that read the symbols. Its test-loss column is
``test_xent``, the sweep's test cross-entropy per step over every step (the adding task's is
``test_mse``; :data:`TEST_LOSS_COLUMN`). Training here (--train_steps) is on the adding problem
only.

Writes ``results.json`` (per-config median/spread curves), ``results.csv`` (the printed table),
``grad_norms.png`` and ``jacobians.png`` to --workdir.

Measured here (2 CPU cores shared with other jobs): 4.3 min wall (2.1 min of CPU); table and
plots in docs/gradients.md. (Measured with an earlier version of the trainer; its batches now
come from another split of the key, so the trained rows of a rerun differ slightly.) At
initialisation, over T = 200, log10 ‖∂L/∂h_0‖/‖∂L/∂h_{T-1}‖ is about -6 for SimpleRNN (gain
1), -15 for LSTM (forget bias 1), -42 (forget bias 0), -39 for GRU: with Keras initialisers the
gated cells' gradients decay faster than SimpleRNN's. Gains 0.5 / 3 give -62 / +22. After 200
steps GRU's ratio rises to about -3 (T = 200) and -1 (T = 50); the gain-3 RNN at T = 200 did
not move at all then (its float32 gradient norm overflowed and optax's clip_by_global_norm
zeroed every update); the library's clip_by_global_norm, used now, clips it instead.
"""

import csv
import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, long_range
from rnn_jax import cells, gradients, registry
from rnn_jax.losses import sequence_cross_entropy
from rnn_jax.models import dense, sequence_classifier
from rnn_jax.rundir import open_run
from rnn_jax.sweep import make_task_trainer
from rnn_jax.synthetic import TASKS

# name -> (cell, structural kwargs, initialisation kwargs). Configs with the same cell and
# structural kwargs run the same functions on differently initialised params: one program.
CONFIGS = {
    "rnn_g0.5": ("simple_rnn", {}, {"recurrent_gain": 0.5}),
    "rnn_g1": ("simple_rnn", {}, {"recurrent_gain": 1.0}),
    "rnn_g1.5": ("simple_rnn", {}, {"recurrent_gain": 1.5}),
    "rnn_g3": ("simple_rnn", {}, {"recurrent_gain": 3.0}),
    "irnn": ("simple_rnn", {"activation": "relu"}, {"recurrent_init": "identity"}),
    "lstm_fb1": ("lstm", {}, {"forget_bias": 1.0}),
    "lstm_fb0": ("lstm", {}, {"forget_bias": 0.0}),
    "lstm_g3": ("lstm", {}, {"recurrent_gain": 3.0}),
    "gru": ("gru", {}, {}),
    "gru_g3": ("gru", {}, {"recurrent_gain": 3.0}),
}
# Every other name of rnn_jax.registry is a configuration too: that cell as
# registry.named_cell(name, units, T) builds it (its default initialisation, set up for T).
CHOICES = tuple(CONFIGS) + tuple(n for n in registry.NAMES if n not in CONFIGS)
_DEFAULT_CONFIGS = (
    "rnn_g0.5",
    "rnn_g1",
    "rnn_g1.5",
    "rnn_g3",
    "irnn",
    "lstm_fb1",
    "lstm_fb0",
    "gru",
)


def _non_empty(values) -> str | None:
    return None if values else "must not be empty"


@dataclasses.dataclass(frozen=True)
class Config:
    """Which configurations to probe at which lengths, and the training between the probes."""

    configs: tuple[str, ...] = cli.field(
        _DEFAULT_CONFIGS,
        "Configurations to probe: initialisations of the tutorial's cells, or any "
        "rnn_jax.registry name.",
        choices=CHOICES,
        check=_non_empty,
    )
    lengths: tuple[int, ...] = cli.field(
        (50, 200),
        "Sequence lengths T (>= 2); with trained_from, T as the sweep has it (copy: the delay).",
        check=cli.all_positive,
    )
    seeds: int = cli.field(8, "Seeds per configuration (vmapped).", check=cli.positive)
    units: int = cli.field(32, "Hidden units.", check=cli.positive)
    train_steps: int = cli.field(
        200,
        "Adam steps on the adding problem before the second probe (0: none). Training here "
        "is on the adding problem only; probe copy models with trained_from.",
        check=cli.non_negative,
    )
    batch_size: int = cli.field(32, "Training batch.", check=cli.positive)
    test_size: int = cli.field(256, "Test sequences (fixed) for the test MSE.", check=cli.positive)
    probe_batch: int = cli.field(16, "Sequences probed per seed.", check=cli.positive)
    jacobian_batch: int = cli.field(
        4, "Of those, sequences whose Jacobians are taken.", check=cli.positive
    )
    learning_rate: float = cli.field(1e-2, "Adam learning rate.", check=cli.positive)
    clip_norm: float | None = cli.clip_norm(1.0)
    trained_from: str | None = cli.field(
        None,
        "A workdir of experiments.long_range on the adding or the copy task: probe the models "
        "it trained (its initial and final params, its seeds; every config a registry name it "
        "trained at every T) instead of training here. Copy: the probed loss is the "
        "cross-entropy of the recall (the last 10 outputs), test_xent the sweep's test "
        "cross-entropy. Unset: train train_steps steps here (adding).",
    )
    seed: int = cli.field(0, "PRNG seed.")

    def __post_init__(self):
        cli.validate(self)
        for name in ("configs", "lengths"):
            values = getattr(self, name)
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{name}={values!r} lists {twice[0]!r} more than once")
        # With trained_from the lengths are the sweep's (a copy delay may be 1): run checks them.
        if self.trained_from is None and min(self.lengths) < 2:
            raise ValueError(f"lengths={self.lengths!r}: the adding problem needs T >= 2")
        if self.trained_from is not None:
            bad = [n for n in self.configs if n not in registry.NAMES]
            if bad:
                raise ValueError(
                    f"configs={self.configs!r}: {bad[0]!r} is not a cell that "
                    "experiments.long_range trains (trained_from needs rnn_jax.registry names)"
                )
        if self.jacobian_batch > self.probe_batch:
            raise ValueError(
                f"jacobian_batch={self.jacobian_batch} must not exceed "
                f"probe_batch={self.probe_batch}"
            )


_LN10 = math.log(10.0)

# The tasks the probes know, each with the table's name for its test loss: the adding
# problem's MSE, the copy task's cross-entropy per step (over every step, as it trains).
TEST_LOSS_COLUMN = {"adding": "test_mse", "copy": "test_xent"}


def groups(names):
    """Configs that share a cell and its structure, in order: ``[(cell, structure, [names])]``.

    A registry name outside :data:`CONFIGS` is a group of its own, with structure None.
    """
    out = {}
    for name in names:
        if name in CONFIGS:
            cell_name, structure, _ = CONFIGS[name]
            key = (cell_name, tuple(sorted(structure.items())))
        else:
            key = (name, None)
        out.setdefault(key, []).append(name)
    return [
        (cell, None if structure is None else dict(structure), members)
        for (cell, structure), members in out.items()
    ]


def make_cell(cell_name, structure, units, length, init=None):
    """A group's cell: ``cells.CELLS[cell_name](units, **structure, **init)``, or with
    ``structure`` None the registry's ``named_cell(cell_name, units, length)``."""
    if structure is None:
        return registry.named_cell(cell_name, units, length)
    return cells.CELLS[cell_name](units, **structure, **(init or {}))


def read_sweep(workdir, units):
    """The config and results of the experiments.long_range sweep in ``workdir``, checked for
    the probes: ``(long_range.Config, results)``; ValueError (one line) when it has no
    results.json, trained a task the probes do not know or another number of units."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"trained_from={workdir!r} has no results.json: pass a workdir that "
            "experiments.long_range wrote"
        )
    with open(path) as f:
        saved = json.load(f)
    task, trained_units = saved["config"].get("task"), saved["config"].get("units")
    if task not in TEST_LOSS_COLUMN or trained_units != units:
        raise ValueError(
            f"trained_from={workdir!r} trained task={task!r}, units={trained_units}: the probes "
            f"need the {' or '.join(TEST_LOSS_COLUMN)} task and units={units}"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    return long_range.Config(**fields), saved["results"]


def sweep_task(config: Config) -> str:
    """The task the probes run: the adding problem, or the task of ``config.trained_from``,
    which must have trained every config at every T (else ValueError, one line)."""
    if config.trained_from is None:
        return "adding"
    sweep, results = read_sweep(config.trained_from, config.units)
    runs = {(r["cell"], r["T"]) for r in results}
    for length in config.lengths:
        for name in config.configs:
            if (name, length) not in runs:
                have = ", ".join(f"{c} T={t}" for c, t in sorted(runs)) or "none"
                raise ValueError(
                    f"trained_from={config.trained_from!r} has no run of {name} at T={length} "
                    f"(its {sweep.task} runs: {have})"
                )
    return sweep.task


def probed_task(task_name, length):
    """``(task, recall)``: the task's sequences at T = ``length`` (the delay for copy) and
    :func:`probed_loss`'s ``recall``: None for adding, the copy task's ``copy_length`` (its
    sequences are ``delay + 2·copy_length`` steps)."""
    task = TASKS[task_name](length)
    return task, (task.length - length) // 2 if task_name == "copy" else None


def load_sweep(workdir, name, length, units):
    """The models experiments.long_range trained for (``name``, T = ``length``) in
    ``workdir`` (adding or copy task): ``(initial params, trained params, test_loss,
    grad_norm)`` with leading axis seeds, the last clip setting's runs; ``test_loss (seeds,
    evals)`` (the task's loss: MSE, or copy's cross-entropy per step), ``grad_norm (seeds,
    steps)`` or None when the sweep did not save them. The trained params are the checkpoint
    of the steps its results record (:func:`experiments.long_range.load_params`: a damaged
    one is named and refused)."""
    sweep, results = read_sweep(workdir, units)
    (result,) = [r for r in results if r["cell"] == name and r["T"] == length] or [None]
    if result is None:
        raise ValueError(f"trained_from={workdir!r} has no run of {name} at T={length}")
    task = TASKS[sweep.task](length)
    cell = long_range.build_cell(sweep, name, task.length)  # the sweep's own (LRU: lru_r_min)
    _, _, initial, _, _ = long_range.prepare(task, cell, sweep, steps=sweep.eval_every)
    saved = long_range.params_path(workdir, name, length)
    trained = long_range.load_params(saved, initial, step=result["steps"])
    trained = jax.tree.map(lambda a: a[-1], trained)
    test_loss = np.asarray(result["test_loss"][-1])
    grad_norm = result.get("grad_norm")
    return initial, trained, test_loss, None if grad_norm is None else np.asarray(grad_norm[-1])


def probed_loss(head, ys, targets, recall=None):
    """The loss L the probes differentiate, per example, from the cell's outputs.

    ``recall`` None (adding): the MSE of the ``Dense(1)`` head on the last output, ``ys (batch,
    units)``. Else (copy): the mean cross-entropy of the head's logits on the last ``recall``
    outputs of ``ys (batch, time, units)`` against the last ``recall`` targets, the symbols
    recalled after the cue: the part of the copy task's loss that needs memory.
    """
    if recall is None:
        return (dense(head, ys)[:, 0] - targets) ** 2
    return sequence_cross_entropy(dense(head, ys[:, -recall:]), targets[:, -recall:])


def _probe(cell, params, xs, targets, jacobian_batch, recall):
    """One model's curves over t, each the median over the probed sequences."""

    def loss_fn(ys):
        return probed_loss(params["dense"], ys, targets, recall)

    losses, norms = gradients.carry_gradient_norms(
        cell, params["rnn"], xs, loss_fn, return_sequences=recall is not None
    )
    tiny = jnp.finfo(losses.dtype).tiny  # xs may be integer tokens (copy)
    out = {"loss": jnp.mean(losses)}
    # Exact zeros (dead relu units) are floored at the smallest normal float64.
    out["log10_grad_h"] = jnp.median(jnp.log10(jnp.maximum(cell.hidden(norms), tiny)), axis=0)
    if isinstance(norms, cells.LSTMCarry):
        out["log10_grad_c"] = jnp.median(jnp.log10(jnp.maximum(norms.c, tiny)), axis=0)
    jac = gradients.jacobian_norms(cell, params["rnn"], xs[:jacobian_batch])
    out["step_norm"] = jnp.median(jac["step_norm"], axis=0)
    log_product = jnp.maximum(jac["log_product_norm"], jnp.log(tiny))  # -inf: an exact zero
    out["log10_product"] = jnp.median(log_product, axis=0) / _LN10
    # The cell names its bounded units: a relu IRNN has neither gates nor tanh units.
    sat = gradients.saturation(cell, params["rnn"], xs)
    if "tanh_units" in sat:
        out["sat_tanh"] = jnp.mean(sat["tanh_units"], axis=0)
    if "gates" in sat:
        out["sat_gates"] = jnp.mean(sat["gates"], axis=0)
    return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _probe_stack(cell, params, xs, targets, jacobian_batch, recall):
    return jax.vmap(lambda p: _probe(cell, p, xs, targets, jacobian_batch, recall))(params)


def _float64(x):
    """``x`` as float64 if it is floating, else as it is (integer tokens and labels)."""
    x = jnp.asarray(x)
    return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x


def probe_models(cell, params, xs, targets, jacobian_batch, recall=None):
    """The probes for a stack of models (leading axis), in float64, in one compiled program;
    ``recall``: :func:`probed_loss`'s (None: the adding problem's loss)."""
    with jax.enable_x64(True):
        params = jax.tree.map(_float64, params)
        out = _probe_stack(cell, params, _float64(xs), _float64(targets), jacobian_batch, recall)
        return jax.tree.map(np.asarray, out)


def init_models(task, cell_name, structure, members, units, seeds, key):
    """Params for every (config, seed), stacked config-major: ``(len(members) * seeds, ...)``."""
    keys = jax.random.split(key, seeds)
    stacks = []
    for name in members:
        init = CONFIGS[name][2] if structure is not None else None
        cell = make_cell(cell_name, structure, units, task.length, init)
        model = sequence_classifier(cell, task.input_dim, task.output_dim)
        stacks.append(jax.vmap(model.init)(keys))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *stacks)


def summarize_curves(values):
    """Median and 10/90 % quantiles over the leading (seed) axis."""
    return {
        "median": np.median(values, axis=0),
        "p10": np.percentile(values, 10, axis=0),
        "p90": np.percentile(values, 90, axis=0),
    }


def table_row(name, length, phase, probe, test_loss, grad_norm=None, task="adding"):
    """A row of the table: medians over seeds (``grad_norm``: pre-clip norms while training);
    the test loss under the task's name, :data:`TEST_LOSS_COLUMN` (adding: ``test_mse``)."""
    ratio = probe["log10_grad_h"][:, 0] - probe["log10_grad_h"][:, -1]
    finite = np.isfinite(test_loss)
    return {
        "config": name,
        "T": length,
        "phase": phase,
        TEST_LOSS_COLUMN[task]: float(np.median(test_loss[finite])) if finite.any() else None,
        "nonfinite_test": f"{np.sum(~finite)}/{len(finite)}",
        # Global norms that overflow float32 make clip_by_global_norm zero the whole update.
        "inf_grad_steps": None if grad_norm is None else float(np.mean(~np.isfinite(grad_norm))),
        "log10_g0_over_gT": float(np.median(ratio)),
        "log10_g0_over_gT_p10": float(np.percentile(ratio, 10)),
        "log10_g0_over_gT_p90": float(np.percentile(ratio, 90)),
        "log10_dhT_dh0": float(np.median(probe["log10_product"][:, 0])),
        "jacobian_norm": float(np.median(probe["step_norm"])),
        "sat_gates": _median_over_time(probe, "sat_gates"),
        "sat_tanh": _median_over_time(probe, "sat_tanh"),
    }


def _median_over_time(probe, name):
    """Median over seeds of the mean over t; None when the cell has no such units."""
    return float(np.median(np.mean(probe[name], axis=1))) if name in probe else None


_COLUMNS = [
    ("config", "{}"),
    ("T", "{}"),
    ("phase", "{}"),
    ("test_loss", "{:.3f}"),  # named for the task: TEST_LOSS_COLUMN
    ("nonfinite_test", "{}"),
    ("inf_grad_steps", "{:.2f}"),
    ("log10_g0_over_gT", "{:+.1f}"),
    ("log10_g0_over_gT_p10", "{:+.1f}"),
    ("log10_g0_over_gT_p90", "{:+.1f}"),
    ("log10_dhT_dh0", "{:+.1f}"),
    ("jacobian_norm", "{:.2f}"),
    ("sat_gates", "{:.2f}"),
    ("sat_tanh", "{:.2f}"),
]


def columns(task="adding"):
    """The table's columns, ``[(name, format)]``, the test loss named for ``task``."""
    return [(TEST_LOSS_COLUMN[task] if n == "test_loss" else n, f) for n, f in _COLUMNS]


def format_table(rows, task="adding"):
    """A Markdown table of the summary rows (of ``task``: its test-loss column)."""
    cols = columns(task)
    lines = ["| " + " | ".join(n for n, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append(
            "| " + " | ".join("-" if row[n] is None else f.format(row[n]) for n, f in cols) + " |"
        )
    return "\n".join(lines)


def _colour(name, members_order):
    import matplotlib

    if any(n not in CONFIGS for n in members_order):  # registry cells: one colour each
        return matplotlib.colormaps["tab20"](CHOICES.index(name) % 20 / 20 + 0.025)
    families = {"rnn": "Blues", "irnn": "Purples", "lstm": "Greens", "gru": "Reds"}
    family = name.split("_")[0]
    same = [n for n in members_order if n.split("_")[0] == family]
    shade = 0.45 + 0.5 * same.index(name) / max(len(same) - 1, 1)
    return matplotlib.colormaps[families.get(family, "Greys")](shade)


def _floor(ax, summaries):
    """Keep the y axis near the medians: a dead-relu band floored at 1e-308 would flatten it."""
    low = min(np.min(s["median"]) for s in summaries)
    ax.set_ylim(bottom=10.0 ** (low - 6))


def plot(workdir, curves, names, lengths, phases):
    """grad_norms.png: ‖∂L/∂h_t‖/‖∂L/∂h_{T-1}‖ against t; jacobians.png for the longest T.

    t runs over the probed sequences' steps: T for adding, the delay + 20 for copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(phases), len(lengths), figsize=(4.6 * len(lengths), 3.2 * len(phases)), squeeze=False
    )
    for i, phase in enumerate(phases):
        for j, length in enumerate(lengths):
            ax = axes[i, j]
            for name in names:
                c = curves[(name, length, phase)]["log10_grad_rel"]
                t = np.arange(len(c["median"]))  # the steps: delay + 20 for copy
                ax.plot(t, 10.0 ** c["median"], color=_colour(name, names), lw=1.2, label=name)
                ax.fill_between(
                    t,
                    10.0 ** c["p10"],
                    10.0 ** c["p90"],
                    color=_colour(name, names),
                    alpha=0.15,
                    lw=0,
                )
            ax.set_yscale("log")
            _floor(ax, [curves[(n, length, phase)]["log10_grad_rel"] for n in names])
            ax.set_title(f"T={length}, {phase}", fontsize=9)
            ax.set_xlabel("t", fontsize=8)
            ax.set_ylabel("‖∂L/∂h_t‖ / ‖∂L/∂h_T‖", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "grad_norms.png"), dpi=80)
    plt.close(fig)

    length = max(lengths)
    fig, axes = plt.subplots(len(phases), 2, figsize=(9.2, 3.2 * len(phases)), squeeze=False)
    for i, phase in enumerate(phases):
        for name in names:
            c = curves[(name, length, phase)]
            t = np.arange(len(c["step_norm"]["median"]))
            colour = _colour(name, names)
            axes[i, 0].plot(t, c["step_norm"]["median"], color=colour, lw=1, label=name)
            product = c["log10_product"]
            axes[i, 1].plot(t, 10.0 ** product["median"], color=colour, lw=1.2)
            axes[i, 1].fill_between(
                t, 10.0 ** product["p10"], 10.0 ** product["p90"], color=colour, alpha=0.15, lw=0
            )
        axes[i, 0].set_yscale("log")
        axes[i, 0].set_title(f"‖J_t‖₂, T={length}, {phase}", fontsize=9)
        axes[i, 1].set_yscale("log")
        _floor(axes[i, 1], [curves[(n, length, phase)]["log10_product"] for n in names])
        axes[i, 1].set_title(f"‖J_T ⋯ J_(t+1)‖₂, T={length}, {phase}", fontsize=9)
        for ax in axes[i]:
            ax.set_xlabel("t", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "jacobians.png"), dpi=80)
    plt.close(fig)


def run(config: Config, workdir: str, out=print) -> list[dict]:
    """Probes (and trains) every config at every T; prints the table; writes JSON, CSV, PNGs.

    The probed task is the adding problem, or with ``trained_from`` the sweep's (adding or copy;
    :func:`sweep_task` checks the workdir before anything runs).

    Returns:
      The table's rows, one per (config, T, phase), ordered by T, phase, then config; the test
      loss under ``TEST_LOSS_COLUMN[task]``.
    """
    task_name = sweep_task(config)
    meta = {"experiment": "gradient_flow", "config": cli.resume_key(config, ())}
    with open_run(workdir, meta, checkpoints=False, files=("results.json", "results.csv")) as run:
        return _probe_all(config, task_name, workdir, run, out)


def _probe_all(config: Config, task_name: str, workdir: str, run, out) -> list[dict]:
    if task_name == "copy":
        _, recall = probed_task(task_name, config.lengths[0])
        out(
            f"copy task (trained_from={config.trained_from}): T is the delay, sequences of T + "
            f"{2 * recall} steps; the probed loss is the cross-entropy of the last {recall} "
            "outputs (the recall), test_xent the sweep's test cross-entropy per step"
        )
    names, lengths, seeds = config.configs, config.lengths, config.seeds
    has_trained = config.train_steps or config.trained_from is not None
    phases = ["init", "trained"] if has_trained else ["init"]
    # The trainer's clip_norm is an array, inf for no clipping.
    clip = jnp.float32(math.inf if config.clip_norm is None else config.clip_norm)
    rows, curves, timings = [], {}, {}
    for length in lengths:
        task, recall = probed_task(task_name, length)
        k_init, k_train, k_probe, k_test = jax.random.split(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), length), 4
        )
        xs, targets = task.sample(k_probe, config.probe_batch)
        if config.trained_from is None and config.train_steps:  # trains here: adding
            test_xs, test_targets = task.sample(k_test, config.test_size)
        for cell_name, structure, members in groups(names):
            tic = time.perf_counter()
            cell = make_cell(cell_name, structure, config.units, task.length)
            seeds = config.seeds
            if config.trained_from is not None:
                (name,) = members  # a registry name: a group of its own
                params, trained, test_loss, grad_norm = load_sweep(
                    config.trained_from, name, length, config.units
                )
                seeds = len(test_loss)
            else:
                params = init_models(
                    task, cell_name, structure, members, config.units, seeds, k_init
                )
            probe = functools.partial(
                probe_models,
                cell,
                xs=xs,
                targets=targets,
                jacobian_batch=config.jacobian_batch,
                recall=recall,
            )
            probes = {"init": probe(params)}
            losses = {"init": probes["init"]["loss"]}
            grad_norms = {"init": None}
            if config.trained_from is not None:
                probes["trained"] = probe(trained)
                losses = {"init": test_loss[:, 0], "trained": test_loss[:, -1]}
                grad_norms["trained"] = grad_norm
            elif config.train_steps:
                _, train = make_task_trainer(
                    cell,
                    task,
                    optimizer=optax.adam(config.learning_rate),
                    num_steps=config.train_steps,
                    eval_every=config.train_steps,
                    batch_size=config.batch_size,
                )
                keys = jnp.tile(jax.random.split(k_train, seeds), (len(members), 1))
                trained, c = jax.jit(jax.vmap(train, in_axes=(0, 0, None, None, None)))(
                    params, keys, clip, test_xs, test_targets
                )
                probes["trained"] = probe(trained)
                losses["init"] = np.asarray(c.test_loss[:, 0])
                losses["trained"] = np.asarray(c.test_loss[:, -1])
                grad_norms["trained"] = np.asarray(c.grad_norm)
            seconds = time.perf_counter() - tic
            timings[f"{cell_name}{structure or ''} T={length}"] = seconds
            for m, name in enumerate(members):
                part = slice(m * seeds, (m + 1) * seeds)
                for phase in phases:
                    p = {k: v[part] for k, v in probes[phase].items()}
                    p["log10_grad_rel"] = p["log10_grad_h"] - p["log10_grad_h"][:, -1:]
                    curves[(name, length, phase)] = {
                        k: summarize_curves(v) for k, v in p.items() if k != "loss"
                    }
                    norms = None if grad_norms[phase] is None else grad_norms[phase][part]
                    rows.append(
                        table_row(name, length, phase, p, losses[phase][part], norms, task_name)
                    )
            out(f"{cell_name} {members} T={length}: {seconds:.1f} s")
    order = {
        key: i for i, key in enumerate((n, t, p) for t in lengths for p in phases for n in names)
    }
    rows.sort(key=lambda r: order[(r["config"], r["T"], r["phase"])])
    out(format_table(rows, task_name))
    run.write(
        "results.json",
        json.dumps(
            {
                "config": dataclasses.asdict(config),
                "rows": rows,
                "seconds": timings,
                "curves": [
                    {
                        "config": n,
                        "T": t,
                        "phase": p,
                        **{k: {q: v.tolist() for q, v in s.items()} for k, s in c.items()},
                    }
                    for (n, t, p), c in curves.items()
                ],
            }
        ).encode(),
    )
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, [n for n, _ in columns(task_name)])
        writer.writeheader()
        writer.writerows(rows)
    plot(workdir, curves, names, lengths, phases)
    return rows


if __name__ == "__main__":
    cli.main(Config, run, workdir="runs/gradient_flow")
