"""The update engine: TrainState, one pure update, a jitted scan of updates over a pass's
batches (compiled as a :class:`Trainer`), and the held-out evaluation; :mod:`rnn_jax.loop`
runs it."""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rnn_jax import parallel
from rnn_jax.batches import Batches
from rnn_jax.gradients import global_norm
from rnn_jax.metrics import Sums

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
    compiled call. :func:`rnn_jax.loop.fit` instead runs a pass as several calls of at most
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
    a :class:`Trainer`, which :func:`rnn_jax.loop.fit` also runs in parts of an epoch.
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
