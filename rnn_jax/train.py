"""TrainState, the Keras-default RMSprop, clipping, the one update engine (a jitted scan of
updates, its metric sums), fit."""

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from rnn_jax import parallel
from rnn_jax.batches import Batches
from rnn_jax.gradients import global_norm
from rnn_jax.rundir import Interrupted, Position, RunDir

Params = Any
Carry = Any
# loss_fn(params, batch) -> (per-example loss (B,), {name: per-example value (B,)}); a stateful
# loss (TrainState.carry set) also takes and returns the carry:
# loss_fn(params, batch, carry) -> (loss (B,), {name: value (B,)}, carry).
LossFn = Callable[..., tuple]


class TrainState(NamedTuple):
    """Everything a run needs to continue bit for bit: params, optimiser state, step, PRNG key
    and, for stateful training, the carry that the next batch starts from.

    ``carry=None`` (the default) is an empty pytree: a state without one has the leaves, the
    checkpoints and the digests it had before stateful training existed.
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    carry: Carry = None


def create_train_state(
    params: Params, optimizer: optax.GradientTransformation, key, carry: Carry = None
) -> TrainState:
    """A fresh state at step 0; ``key`` drives the per-epoch shuffles.

    With a ``carry`` (e.g. ``cell.initial_carry(batch_size)``) training is stateful: each
    update's loss starts from the carry the previous update ended with, and the carry is reset
    to zeros at the start of every pass (see :func:`apply_update`,
    :func:`rnn_jax.batches.in_order`).
    """
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key, carry)


def rmsprop(
    learning_rate: float = 1e-3,
    rho: float = 0.9,
    epsilon: float = 1e-7,
    eps_in_sqrt: bool = True,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """RMSprop with the Keras 3 defaults, optionally after global-norm clipping.

    ``v ← ρ v + (1-ρ) g²``; ``θ ← θ - lr · g / sqrt(v + ε)`` with ``v₀ = 0``, no momentum, not
    centred. ``eps_in_sqrt=True`` is Keras 3 (and optax's default placement);
    ``eps_in_sqrt=False`` gives ``g / (sqrt(v) + ε)``, the standalone Keras 2 of the tutorial's
    era and PyTorch (whose own defaults are lr 1e-2, α 0.99, ε 1e-8). Note optax's own
    ``rmsprop`` default ``eps=1e-8`` differs from Keras's ``1e-7``.
    """
    opt = optax.rmsprop(learning_rate, decay=rho, eps=epsilon, eps_in_sqrt=eps_in_sqrt)
    return clipped(opt, clip_norm)


def clipped(
    transformation: optax.GradientTransformation, clip_norm: float | jax.Array | None
) -> optax.GradientTransformation:
    """``transformation`` after :func:`clip_by_global_norm` at ``clip_norm``: every optimiser
    with clipping here is built by this function.

    Args:
      transformation: the optimiser, e.g. ``optax.adam(1e-3)`` or :func:`rmsprop`.
      clip_norm: None: no clipping, ``transformation`` alone. A Python number must be finite
        and > 0. An array is used as is, so it may be traced (vmapped over clipping settings);
        ``inf`` then passes every finite gradient unchanged.
    """
    if clip_norm is None:
        return transformation
    if isinstance(clip_norm, (int, float)) and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm={clip_norm} must be finite and > 0 (None: no clipping)")
    return optax.chain(clip_by_global_norm(clip_norm), transformation)


def clip_by_global_norm(max_norm: float | jax.Array) -> optax.GradientTransformation:
    """Scales the updates to global norm ``max_norm`` when theirs is larger (Pascanu et al. 2013).

    ``optax.clip_by_global_norm`` squares float32 entries: a gradient whose entries pass ~1.8e19
    has an infinite norm there, and every update is scaled by ``max_norm / inf = 0``: training
    freezes without a sign. Here the norm is :func:`rnn_jax.gradients.global_norm` (scaled before
    squaring), so a gradient of norm 1e25 is clipped to ``max_norm``, not zeroed. ``max_norm``
    may be traced (vmapped over settings); ``inf`` passes every finite gradient unchanged.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        g_norm = global_norm(updates)
        scale = jnp.where(g_norm > max_norm, max_norm / g_norm, 1.0)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _weighted(loss_fn: LossFn, params, batch, weights, carry=None):
    """The weighted mean loss and ``(sums, carry)``: the carry after the batch (stateful
    losses) or None, never differentiated through (truncated backpropagation)."""
    if carry is None:
        losses, stats = loss_fn(params, batch)
    else:
        losses, stats, carry = loss_fn(params, batch, carry)
        carry = jax.lax.stop_gradient(carry)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(losses * weights) / total
    sums = {name: jnp.sum(value * weights) for name, value in stats.items()}
    sums["loss"] = jnp.sum(losses * weights)
    sums["examples"] = jnp.sum(weights)
    return loss, (sums, carry)


def apply_update(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState, batch, weights
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on ``batch``: the pure function every trainer scans.

    The loss is the ``weights``-weighted mean of ``loss_fn``'s per-example losses (weight 0
    marks padding).

    Stateful training (``state.carry`` set): the loss is ``loss_fn(params, batch, carry)``,
    which also returns the carry after the batch; that carry, under ``stop_gradient``, is the
    next state's. Gradients reach back to the start of this batch only: truncated
    backpropagation through time, cut at the batch's edge (DESIGN.md §7).

    Returns:
      ``(state, sums)``: the updated state (``step + 1``) and, over the batch's examples, the
      weighted sums of the loss and of ``loss_fn``'s statistics, ``examples`` (the sum of the
      weights) and ``grad_norm``, the global norm of the gradient before the optimiser
      (:func:`rnn_jax.gradients.global_norm`: finite for any finite gradient).
    """
    (_, (sums, carry)), grads = jax.value_and_grad(_weighted, argnums=1, has_aux=True)(
        loss_fn, state.params, batch, weights, state.carry
    )
    sums["grad_norm"] = global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(params=params, opt_state=opt_state, step=state.step + 1, carry=carry)
    return new, sums


def _on_mesh(fn, mesh: Mesh | None):
    """``fn(state, data, ...)`` with both first placed whole on every device of ``mesh``.

    ``jax.device_put`` is a no-op for arrays already there, so placing them once up front
    (:func:`rnn_jax.parallel.replicate`) costs nothing per call; arrays committed to one device
    (a restored checkpoint, say) are copied instead of failing inside ``jit``.
    """
    if mesh is None:
        return fn

    def placed(state, data, *args):
        return fn(parallel.replicate(state, mesh), parallel.replicate(data, mesh), *args)

    return placed


def _replicated(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, parallel.replicated(mesh))


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None
):
    """A jitted ``step(state, batch, weights=None) -> (state, metrics)``: one update, on one
    batch (:func:`make_trainer` compiles a scan of many).

    The loss is the ``weights``-weighted mean of ``loss_fn``'s per-example losses (weights 0
    mark padding); ``metrics`` holds that mean, the means of ``loss_fn``'s statistics,
    ``grad_norm`` and ``finite`` (false when the loss or the gradient is NaN or infinite).
    With a ``mesh`` (:func:`rnn_jax.parallel.make_mesh`) the batch is split along its 'data'
    axis, padded with weight-0 rows when its size is not a multiple of the device count, and
    params and optimiser state are replicated: the same update as on one device.
    """

    @jax.jit
    def step(state, batch, weights=None):
        if weights is None:
            weights = jnp.ones(jax.tree.leaves(batch)[0].shape[0])
        if mesh is not None:
            batch, weights = parallel.constrain_batch(batch, weights, mesh)
        state, sums = apply_update(loss_fn, optimizer, _replicated(state, mesh), batch, weights)
        grad_norm = sums.pop("grad_norm")
        count = jnp.maximum(sums.pop("examples"), 1.0)
        metrics = {**{k: v / count for k, v in sums.items()}, "grad_norm": grad_norm}
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        return _replicated(state, mesh), metrics

    if mesh is None:
        return step
    return lambda state, batch, weights=None: step(parallel.replicate(state, mesh), batch, weights)


class Sums(NamedTuple):
    """What a run of updates reports, as sums that add up over consecutive runs of one pass.

    The one home of a run's metrics: :func:`scan_updates` reports its :meth:`means`,
    :meth:`Trainer.run` the sums themselves, which :func:`fit` joins (:meth:`merge`) across
    the calls of an epoch and stores in mid-epoch checkpoints (:meth:`as_dict`). A pytree:
    ``jit`` returns it, ``vmap`` maps it, ``jax.device_get`` fetches it.

    Attributes:
      totals: ``{name: sum}``: ``loss`` and each statistic of the loss function, weighted sums
        over the examples seen.
      examples: the sum of the weights (the examples seen).
      grad_norm_max: the largest pre-clip global gradient norm.
      nonfinite_step: ``state.step`` after the first update whose loss or gradient was NaN or
        infinite; -1 when all were finite.
      nonfinite_loss: that update's loss was NaN or infinite (False when all were finite).
      nonfinite_gradient: that update's gradient was.
      step_loss: with ``trace`` only (else None): ``(steps,)``, each step's mean loss over
        its real examples, before its update.
      step_grad_norm: with ``trace`` only: ``(steps,)``, each step's pre-clip gradient norm.
    """

    totals: dict[str, jax.Array]
    examples: jax.Array
    grad_norm_max: jax.Array
    nonfinite_step: jax.Array
    nonfinite_loss: jax.Array
    nonfinite_gradient: jax.Array
    step_loss: jax.Array | None = None
    step_grad_norm: jax.Array | None = None

    # The entries of means() that say whether the run stayed finite; fit reports the others.
    STATUS = ("finite", "nonfinite_step", "nonfinite_loss", "nonfinite_gradient")

    @classmethod
    def of_updates(cls, per_step: dict, first_step, trace: bool) -> "Sums":
        """The sums of a scan of :func:`apply_update`, whose per-step sums are ``per_step``
        (leading axis: the steps) and whose state started at step ``first_step``."""
        totals = dict(per_step)
        grad_norms, examples = totals.pop("grad_norm"), totals.pop("examples")
        loss_ok, grad_ok = jnp.isfinite(totals["loss"]), jnp.isfinite(grad_norms)
        bad = jnp.argmin(loss_ok & grad_ok)  # the first False; 0 when there is none
        return cls(
            totals={k: jnp.sum(v) for k, v in totals.items()},
            examples=jnp.sum(examples),
            grad_norm_max=jnp.max(grad_norms),
            nonfinite_step=jnp.where(jnp.all(loss_ok & grad_ok), -1, first_step + bad + 1),
            nonfinite_loss=~loss_ok[bad],
            nonfinite_gradient=~grad_ok[bad],
            step_loss=totals["loss"] / jnp.maximum(examples, 1.0) if trace else None,
            step_grad_norm=grad_norms if trace else None,
        )

    @property
    def finite(self):
        """False when a loss or gradient was NaN or infinite."""
        return self.nonfinite_step < 0

    def merge(self, later: "Sums") -> "Sums":
        """These sums followed by ``later``'s, the next run of the same pass (host NumPy
        values; float32 sums are added in float32). The first non-finite step is kept."""

        def add(a, b):
            return np.add(a, b, dtype=np.asarray(b).dtype)

        bad = later if self.finite else self
        traced = later.step_loss is not None
        return Sums(
            totals={k: add(self.totals[k], v) for k, v in later.totals.items()},
            examples=add(self.examples, later.examples),
            grad_norm_max=np.maximum(self.grad_norm_max, later.grad_norm_max),
            nonfinite_step=bad.nonfinite_step,
            nonfinite_loss=bad.nonfinite_loss,
            nonfinite_gradient=bad.nonfinite_gradient,
            step_loss=np.concatenate([self.step_loss, later.step_loss]) if traced else None,
            step_grad_norm=(
                np.concatenate([self.step_grad_norm, later.step_grad_norm]) if traced else None
            ),
        )

    def means(self) -> dict:
        """The metrics: each total as a mean over the examples seen, ``grad_norm_max``, the
        :attr:`STATUS` entries and, with ``trace``, ``step_loss`` and ``step_grad_norm``.
        Sorted by name, the order ``jit`` returns a dict in, wherever it is computed (inside
        ``jit`` or on host values)."""
        metrics = {**self.as_dict(), **{k: v / self.examples for k, v in self.totals.items()}}
        del metrics["examples"]
        return dict(sorted(metrics.items()))

    def as_dict(self) -> dict:
        """``{name: value}``, the totals beside the other fields and ``finite``: the form a
        mid-epoch checkpoint's meta holds (:meth:`from_dict` reads it back)."""
        rest = {k: v for k, v in self._asdict().items() if k != "totals" and v is not None}
        return {**self.totals, **rest, "finite": self.finite}

    @classmethod
    def from_dict(cls, flat: dict) -> "Sums":
        """The sums of :meth:`as_dict`'s form (``finite`` is read from ``nonfinite_step``)."""
        named = set(cls._fields) | {"finite"}
        return cls(
            totals={k: v for k, v in flat.items() if k not in named},
            **{k: flat.get(k) for k in cls._fields if k != "totals"},
        )


def _scan_part(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    state: TrainState,
    data: Any,
    first,
    count: int,
    mesh: Mesh | None,
    trace: bool,
) -> tuple[TrainState, Sums]:
    """Steps ``first .. first + count - 1`` of the pass keyed by ``state.key``, and their sums.

    The pass's plan (its shuffle, its draws) comes from ``state.key`` alone, so a pass run as
    several calls takes the same batches as one call; ``state.key`` moves on once the pass's
    last step has run. ``first`` may be traced (one compilation serves every call of a size).
    A stateful state's carry is zero before the pass's step 0 (DESIGN.md §7) and otherwise
    comes from the previous step, in this call or, through the state, an earlier one.
    """
    key, plan_key = jax.random.split(state.key)
    plan = batches.plan(plan_key, data)
    first_step = state.step

    def body(state, i):
        batch, weights = batches.take(plan, data, i)
        if state.carry is None:
            return apply_update(loss_fn, optimizer, state, batch, weights)
        carry = jax.tree.map(lambda c: jnp.where(i == 0, jnp.zeros_like(c), c), state.carry)
        # The state keeps a carry row per stream whatever the device count, so that its
        # checkpoints resume on any number of devices; the batch's weight-0 padding rows (to a
        # multiple of the devices, parallel.constrain_batch) get zero rows for this step only.
        rows, size = jax.tree.leaves(carry)[0].shape[0], weights.shape[0]
        if size > rows:
            carry = jax.tree.map(
                lambda c: jnp.concatenate([c, jnp.zeros((size - rows, *c.shape[1:]), c.dtype)]),
                carry,
            )
        if mesh is not None:  # row b of the carry lives with row b of the batch
            carry = jax.lax.with_sharding_constraint(carry, parallel.batch_sharding(mesh))
        state, sums = apply_update(loss_fn, optimizer, state._replace(carry=carry), batch, weights)
        return state._replace(carry=jax.tree.map(lambda c: c[:rows], state.carry)), sums

    state = _replicated(state, mesh)
    state, per_step = jax.lax.scan(body, state, first + jnp.arange(count))
    if isinstance(first, int) and first + count >= batches.num_steps:
        state = state._replace(key=key)
    elif not isinstance(first, int):
        state = state._replace(key=jnp.where(first + count >= batches.num_steps, key, state.key))
    return _replicated(state, mesh), Sums.of_updates(per_step, first_step, trace)


def scan_updates(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    state: TrainState,
    data: Any,
    *,
    mesh: Mesh | None = None,
    trace: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``batches.num_steps`` updates (:func:`apply_update`) as one ``lax.scan``: the pure
    function the compiled calls run (:func:`make_trainer`); it vmaps (over seeds, or a traced
    clipping norm: :func:`rnn_jax.sweep.make_task_trainer`).

    Returns:
      ``(state, metrics)``, the :meth:`Sums.means` of the updates: ``loss`` and every statistic
      of ``loss_fn`` as means over the examples seen, ``grad_norm_max``, ``finite`` and the
      first non-finite step's ``nonfinite_*`` entries; with ``trace`` also ``step_loss`` and
      ``step_grad_norm``, ``(num_steps,)`` each (see :class:`Sums`).
    """
    state, sums = _scan_part(
        loss_fn, optimizer, batches, state, data, 0, batches.num_steps, mesh, trace
    )
    return state, sums.means()


class Trainer:
    """Compiled calls of :func:`scan_updates`' updates; what :func:`make_trainer` returns.

    ``trainer(state, data) -> (state, metrics)`` runs one whole pass (an epoch) as one
    compiled call. :func:`fit` instead runs a pass as several calls of at most
    ``steps_per_call`` steps (:meth:`run`), to report progress and checkpoint inside long
    epochs; the updates are the same either way (the pass's batches come from ``state.key``,
    tests/test_train.py pins the states bit-identical). :meth:`compile` compiles ahead of the
    first call, so that its time is reported apart from training time.

    Attributes:
      num_steps: updates per pass.
    """

    def __init__(self, loss_fn, optimizer, batches: Batches, mesh: Mesh | None, trace: bool):
        self.num_steps = batches.num_steps
        self._mesh = mesh

        def run(state, data, first, count):
            return _scan_part(loss_fn, optimizer, batches, state, data, first, count, mesh, trace)

        def whole(state, data):
            return scan_updates(loss_fn, optimizer, batches, state, data, mesh=mesh, trace=trace)

        self._run = jax.jit(run, static_argnums=3)
        self._whole = _on_mesh(jax.jit(whole), mesh)
        self._compiled: dict[int, Any] = {}

    def __call__(self, state: TrainState, data) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._whole(state, data)

    def _placed(self, state, data):
        if self._mesh is None:
            return state, data
        return parallel.replicate(state, self._mesh), parallel.replicate(data, self._mesh)

    def compile(self, state: TrainState, data, counts) -> float:
        """Compiles :meth:`run` for each size in ``counts`` ahead of time; the seconds taken."""
        tic = time.perf_counter()
        state, data = self._placed(state, data)
        first = jnp.zeros((), jnp.int32)
        for count in sorted(set(counts) - set(self._compiled)):
            self._compiled[count] = self._run.lower(state, data, first, count).compile()
        return time.perf_counter() - tic

    def run(self, state: TrainState, data, first: int, count: int) -> tuple[TrainState, Sums]:
        """Steps ``first .. first + count - 1`` of the pass keyed by ``state.key``:
        ``(state, sums)``, the :class:`Sums` of these steps."""
        state, data = self._placed(state, data)
        first = jnp.asarray(first, jnp.int32)
        compiled = self._compiled.get(count)
        if compiled is not None:
            return compiled(state, data, first)
        return self._run(state, data, first, count)


def make_trainer(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    *,
    mesh: Mesh | None = None,
    trace: bool = False,
) -> Trainer:
    """``trainer(state, data) -> (state, metrics)``: :func:`scan_updates` as one compiled call.

    With :func:`rnn_jax.batches.shuffled_epoch` batches, one call is an epoch, fused on
    device. With a ``mesh`` (:func:`rnn_jax.parallel.make_mesh`; give the batches the same
    mesh) params, optimiser state and ``data`` are replicated and each batch is split over the
    devices: the same updates as on one device, up to the order of float32 sums. The result is
    a :class:`Trainer`, which :func:`fit` also runs in parts of an epoch.
    """
    return Trainer(loss_fn, optimizer, batches, mesh, trace)


def make_evaluate(
    loss_fn: LossFn, batches: Batches, *, mesh: Mesh | None = None, carry: Carry = None
):
    """Jitted ``evaluate(params, data) -> metrics``: example-weighted means, one call.

    ``batches`` is usually ``rnn_jax.batches.shuffled_epoch(..., shuffle=False)``: every
    example once, in order. With a ``mesh`` the batches are split over its devices as in
    training. With a ``carry`` (the initial one, e.g. zeros) the loss is stateful, as in
    training, and the carry is passed from each batch to the next:
    :func:`rnn_jax.batches.in_order` windows of one held-out stream are then scored as one
    long sequence.
    """

    @jax.jit
    def evaluate(params, data):
        params = _replicated(params, mesh)
        plan = batches.plan(jax.random.PRNGKey(0), data)

        def body(carry, i):
            batch, weights = batches.take(plan, data, i)
            _, (sums, carry) = _weighted(loss_fn, params, batch, weights, carry)
            return carry, sums

        _, sums = jax.lax.scan(body, carry, jnp.arange(batches.num_steps))
        seen = jnp.sum(sums.pop("examples"))
        return {k: jnp.sum(v) / seen for k, v in sums.items()}

    return _on_mesh(evaluate, mesh)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def fit(
    state: TrainState,
    trainer: Trainer,
    data: Any,
    run: RunDir,
    *,
    iterations: int,
    epochs_per_iteration: int = 1,
    on_iteration: Callable[[int, TrainState, dict], dict] | None = None,
    stop: Callable[[dict], bool] | None = None,
    steps_per_call: int | None = None,
    checkpoint_every: int | None = None,
    progress_seconds: float | None = None,
    interrupted: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """The training loop over an opened run directory: resume, train, report, save.

    ``run`` (:func:`rnn_jax.rundir.open_run`) holds the lock, the resumed checkpoint and the
    metrics so far. Each iteration runs ``epochs_per_iteration`` epochs of ``trainer``
    (:func:`make_trainer`) as compiled calls of at most ``steps_per_call`` updates, then
    ``on_iteration(iteration, state, metrics)`` (evaluation, samples), whose dict joins the
    iteration's metrics; the row is logged and the state checkpointed (indexed by
    ``state.step``). Everything random is drawn from ``state.key``, so a resumed run ends
    bit-identical to an uninterrupted one.

    Between calls inside an epoch: a progress line (steps, examples/s, loss so far, ETA) once
    ``progress_seconds`` have passed since the last; a checkpoint of the position inside the
    epoch (with its metric sums so far) once ``checkpoint_every`` updates have passed since
    the last checkpoint; and, once ``interrupted()`` is true, a checkpoint and
    :class:`~rnn_jax.rundir.Interrupted`. The calls are compiled first
    (:meth:`Trainer.compile`): the first row gets ``compile_seconds``, and its ``seconds`` are
    training alone. An iteration whose updates left every parameter as it was (each update
    underflowed in float32) is said so in a line.

    Args:
      stop: ``metrics -> bool``, asked after every iteration (and of the last one a resumed
        run finds): true ends training there, e.g. once a target is met.
      steps_per_call: the most updates per compiled call (None: a whole epoch per call).
      checkpoint_every: updates between checkpoints inside an epoch (None: at iteration ends
        only), counted at call boundaries.
      progress_seconds: seconds between progress lines inside an epoch (None: none).
      interrupted: asked at every call boundary (e.g. the command line's Ctrl-C and SIGTERM).
      log: where the resume, compile, progress and warning lines go (default absl logging).

    Raises:
      NonFiniteLossError: a loss or gradient was NaN or infinite; nothing after the last
        checkpoint is saved, so the last good checkpoint stays the latest.
      Interrupted: ``interrupted()`` became true; the position is checkpointed.

    Returns:
      ``(state, history)``: the final state and one dict per iteration, those of an earlier
      run that this one resumed included.
    """
    for name, value in (("steps_per_call", steps_per_call), ("checkpoint_every", checkpoint_every)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of steps, or None")
    log = logging.info if log is None else log
    asked = interrupted or (lambda: False)
    state, position = run.restore(state), run.position
    if run.history and stop is not None and stop(run.history[-1]):
        log(f"the stop condition holds at iteration {position.iteration}: nothing to do")
        return state, run.history
    if position.iteration >= iterations:
        if run.resumed is not None:
            log(
                f"all {iterations} iterations are done (the checkpoint in {run.checkpoint_dir} "
                f"is at iteration {position.iteration}): nothing to do; raise iterations to "
                "train further"
            )
        return state, run.history
    epoch_steps = trainer.num_steps
    call = min(steps_per_call or epoch_steps, epoch_steps)
    if run.resumed is not None:
        log(_resume_line(position, run, epoch_steps, iterations))
    counts = {call, epoch_steps % call or call, min(call, epoch_steps - position.steps)}
    compile_seconds = trainer.compile(state, data, counts)
    log(f"compiled the training steps in {compile_seconds:.1f} s")

    for iteration in range(position.iteration + 1, iterations + 1):
        before = state.params
        for epoch in range(position.epoch, epochs_per_iteration):
            sums = None if position.sums is None else Sums.from_dict(position.sums)
            done, seconds, last_line = position.steps, position.seconds, time.perf_counter()
            while done < epoch_steps:
                count = min(call, epoch_steps - done)
                tic = time.perf_counter()
                state, part = trainer.run(state, data, done, count)
                part = jax.device_get(part)
                seconds += time.perf_counter() - tic
                if not part.finite:
                    raise NonFiniteLossError(_nonfinite_message(iteration, part, run))
                sums, done = part if sums is None else sums.merge(part), done + count
                if done == epoch_steps:
                    break
                position = Position(iteration - 1, epoch, done, sums.as_dict(), seconds)
                stopping = asked()  # asked once a boundary
                if stopping or (
                    checkpoint_every is not None
                    and int(state.step) - (run.last_saved or 0) >= checkpoint_every
                ):
                    run.save(state, position)
                if stopping:
                    raise Interrupted(run.last_saved if run.path is not None else None)
                if progress_seconds is not None and time.perf_counter() - last_line >= (
                    progress_seconds
                ):
                    log(_progress_line(position, sums, epoch_steps, epochs_per_iteration))
                    last_line = time.perf_counter()
            position = Position(iteration - 1, epoch + 1)
        metrics = {k: v.tolist() for k, v in sums.means().items() if k not in Sums.STATUS}
        metrics = {"iteration": iteration, "step": int(state.step), **metrics, "seconds": seconds}
        if compile_seconds is not None:
            metrics["compile_seconds"], compile_seconds = compile_seconds, None
        if _unchanged(before, state.params):
            updates = epochs_per_iteration * epoch_steps
            log(
                f"iteration {iteration}: no parameter changed in its {updates} updates: each "
                "update underflowed in float32 (a learning rate or clip_norm too small for "
                "float32?)"
            )
        if on_iteration is not None:
            metrics.update(on_iteration(iteration, state, metrics))
        row = run.log(metrics)
        position = Position(iteration)
        run.save(state, position)
        if stop is not None and stop(row):
            break
        if asked() and iteration < iterations:
            raise Interrupted(run.last_saved if run.path is not None else None)
    return state, run.history


@jax.jit
def _unchanged(before, after) -> jax.Array:
    """True when no entry of any array differs."""
    same = [jnp.all(a == b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    return jnp.all(jnp.stack(same))


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _resume_line(position: Position, run: RunDir, epoch_steps: int, iterations: int) -> str:
    where = f"iteration {position.iteration} done"
    if position.steps:
        where += f", {position.steps} of {epoch_steps} steps into the next epoch"
    return (
        f"resuming from step {run.resumed} in {run.checkpoint_dir} ({where}); training up to "
        f"iteration {iterations}"
    )


def _progress_line(position: Position, sums: Sums, epoch_steps: int, epochs: int) -> str:
    rate = float(sums.examples) / max(position.seconds, 1e-9)
    left = (epoch_steps - position.steps) * position.seconds / max(position.steps, 1)
    epoch = f", epoch {position.epoch + 1}/{epochs}" if epochs > 1 else ""
    return (
        f"iteration {position.iteration + 1}{epoch}: {position.steps}/{epoch_steps} steps "
        f"({100 * position.steps / epoch_steps:.0f}%), {rate:.0f} examples/s, loss so far "
        f"{float(sums.totals['loss']) / float(sums.examples):.4f}, epoch ETA {_duration(left)}"
    )


def _nonfinite_message(iteration: int, sums: Sums, run: RunDir) -> str:
    """What happened (which quantity, which step), what is kept, and what helps."""
    step = int(sums.nonfinite_step)
    at = f"at step {step}" if step >= 0 else "in this epoch"
    if bool(sums.nonfinite_loss):
        what = f"the loss became NaN or infinite {at} (the parameters diverged)"
        advice = "lower the learning rate"
    else:
        what = f"the gradient became NaN or infinite {at} while the loss was finite"
        advice = "clip the gradient norm (clip_norm), or lower the learning rate"
    if run.path is None:
        kept = "nothing is saved without a workdir"
    elif run.last_saved is not None:
        kept = f"the last good checkpoint, step {run.last_saved} in {run.checkpoint_dir}, is kept"
    else:
        kept = "no checkpoint had been written yet"
    return (
        f"iteration {iteration}: {what}; stopped without saving after it, {kept}. "
        f"To go on, {advice}."
    )
