"""TrainState, the Keras-default RMSprop, the one update engine (a jitted scan of steps), fit."""

import contextlib
import json
import math
import os
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
from rnn_jax.checkpoint import (
    CheckpointError,
    newest_intact,
    restore_checkpoint,
    restore_meta,
    save_checkpoint,
)
from rnn_jax.gradients import global_norm
from rnn_jax.models import sequence_classifier, sequence_tagger
from rnn_jax.workdir import append_log, lock_workdir, read_log, rewrite_log

Params = Any
Batch = Any
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
    to zeros at the start of every pass (see :func:`apply_update`, :func:`in_order`).
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
    if clip_norm is None:
        return opt
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm={clip_norm} must be finite and > 0 (None: no clipping)")
    return optax.chain(clip_by_global_norm(clip_norm), opt)


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
    """A jitted ``step(state, batch, weights=None) -> (state, metrics)`` on one batch.

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


# Up to this many examples an epoch's shuffle is jax.random.permutation, an exact uniform
# shuffle. Beyond, XLA's CPU sort behind it costs seconds and several times the index array in
# memory (measured here: 1e7 examples 10 s and 0.6 GB, 1e8 examples 110 s and 5 GB), so each
# batch's indices come from _index_shuffle instead, computed on the fly: no array of size N.
_PERMUTATION_MAX = 1 << 20


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _index_shuffle(key, positions: jax.Array, num_examples: int, rounds: int = 6) -> jax.Array:
    """Entries ``positions`` of a keyed pseudo-random permutation of ``0 .. num_examples - 1``.

    A balanced Feistel network is a bijection of ``[0, 4**half)`` whatever its round function;
    re-applying it while the value is ``>= num_examples`` ("cycle walking", Black & Rogaway,
    2002) restricts it to a bijection of ``[0, num_examples)``, in fewer than 4 walks on average.
    O(len(positions)) work and memory, whatever ``num_examples``.
    """
    half = max(1, -(-(num_examples - 1).bit_length() // 2))
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (rounds,), jnp.uint32)

    def permute(x):
        left, right = x >> half, x & mask
        for i in range(rounds):
            left, right = right, left ^ (_mix32(right ^ round_keys[i]) & mask)
        return (left << half) | right

    n = jnp.uint32(num_examples)
    x = permute(positions.astype(jnp.uint32))
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n), lambda x: jnp.where(x >= n, permute(x), x), x)
    return x.astype(jnp.int32)


def _epoch_order(key, num_examples: int) -> Callable[[jax.Array], jax.Array]:
    """``order(positions) -> example indices``: one epoch's shuffle (see _PERMUTATION_MAX)."""
    if num_examples <= _PERMUTATION_MAX:
        permutation = jax.random.permutation(key, num_examples)
        return lambda positions: permutation[positions]
    return lambda positions: _index_shuffle(key, positions, num_examples)


def _batch_at(order, b, num_examples: int, batch_size: int, size: int):
    """Batch ``b``'s ``(indices (size,), weights (size,))`` in an epoch of ``order``.

    Rows ``j >= batch_size`` (padding to a multiple of the device count) and positions past
    the data (the last partial batch) get example 0 and weight 0.
    """
    j = jnp.arange(size)
    positions = b * batch_size + j
    valid = (j < batch_size) & (positions < num_examples)
    indices = jnp.where(valid, order(jnp.minimum(positions, num_examples - 1)), 0)
    return indices, valid.astype(jnp.float32)


def _gather(get_batch, data, indices, weights, mesh: Mesh | None):
    if mesh is None:
        return get_batch(data, indices), weights
    indices, weights = parallel.constrain_batch(indices, weights, mesh)
    return parallel.constrain_batch(get_batch(data, indices), weights, mesh)


class Batches(NamedTuple):
    """Where a scan of steps (:func:`train_steps`) gets its batches.

    Attributes:
      plan: ``(key, data) -> plan``, once per call: the epoch's shuffle, the draws with
        replacement, the keys of generated batches. ``key`` is split from ``state.key``.
      take: ``(plan, data, i) -> (batch, weights)`` for step ``i``; ``weights (size,)`` are 1
        for real examples and 0 for padding.
      num_steps: steps per call.
    """

    plan: Callable[[jax.Array, Any], Any]
    take: Callable[[Any, Any, jax.Array], tuple[Batch, jax.Array]]
    num_steps: int


def shuffled_epoch(
    get_batch: Callable[[Any, jax.Array], Batch],
    num_examples: int,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_batches: int | None = None,
    mesh: Mesh | None = None,
) -> Batches:
    """One pass over ``num_examples`` examples in batches (Keras ``fit`` for one epoch).

    Args:
      get_batch: ``(data, indices (size,)) -> batch``, gathering examples on device.
      num_examples: how many examples ``data`` holds (indices ``0 .. num_examples - 1``).
      batch_size: examples per update; the last partial batch is kept and its loss averaged
        over its real examples only, as Keras does.
      shuffle: a new order every call (False: in order, for evaluation). Up to ``2**20``
        examples the shuffle is ``jax.random.permutation``; beyond, a keyed pseudo-random
        permutation computed batch by batch, so that memory does not grow with the data.
      num_batches: only the first ``num_batches`` batches of each pass (Keras's
        ``steps_per_epoch``; benchmarks); default all.
      mesh: each batch is padded with weight-0 rows to a multiple of the devices along its
        'data' axis and split over them (:mod:`rnn_jax.parallel`).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples}: the data holds no examples")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    total = math.ceil(num_examples / batch_size)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be positive or None")
    num_batches = total if num_batches is None else min(num_batches, total)
    size = parallel.padded_size(batch_size, mesh)

    def plan(key, data):
        del data
        return _epoch_order(key, num_examples) if shuffle else (lambda positions: positions)

    def take(order, data, b):
        indices, weights = _batch_at(order, b, num_examples, batch_size, size)
        return _gather(get_batch, data, indices, weights, mesh)

    return Batches(plan, take, num_batches)


def with_replacement(
    get_batch: Callable[[Any, jax.Array], Batch],
    num_examples: int,
    batch_size: int,
    num_steps: int,
) -> Batches:
    """``num_steps`` batches of examples drawn uniformly with replacement."""
    if num_examples < 1 or batch_size < 1 or num_steps < 1:
        raise ValueError(
            f"num_examples={num_examples}, batch_size={batch_size} and num_steps={num_steps} "
            "must be positive"
        )

    def plan(key, data):
        del data
        return jax.random.randint(key, (num_steps, batch_size), 0, num_examples)

    def take(indices, data, i):
        return get_batch(data, indices[i]), jnp.ones((batch_size,))

    return Batches(plan, take, num_steps)


def in_order(
    get_batch: Callable[[Any, jax.Array], tuple[Batch, jax.Array]],
    num_steps: int,
    *,
    mesh: Mesh | None = None,
    with_keys: bool = False,
) -> Batches:
    """Batches ``0 .. num_steps - 1`` in order, the same every pass: stateful training's
    windows of contiguous streams (``get_batch = partial(rnn_jax.data.stream_batch,
    bptt=...)``), where batch ``k + 1`` continues batch ``k`` row by row.

    Args:
      get_batch: ``(data, k) -> (batch, weights (size,))``; ``k`` is traced.
      num_steps: batches per pass.
      mesh: each batch (and the carry) is split along the 'data' axis; a batch size that is
        not a multiple of the device count is padded with weight-0 rows, and the carry with
        zero rows, within each step (the state's carry keeps one row per stream).
      with_keys: the loss gets ``(batch, key)``, ``key`` folded from the pass's key (drawn
        from ``state.key``) with ``k``: per-step randomness such as dropout, the same in a
        pass run as several calls and in a resumed run.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be positive")

    def plan(key, data):
        del data
        return key

    def take(pass_key, data, k):
        batch, weights = get_batch(data, k)
        if mesh is not None:
            batch, weights = parallel.constrain_batch(batch, weights, mesh)
        if with_keys:
            batch = (batch, jax.random.fold_in(pass_key, k))
        return batch, weights

    return Batches(plan, take, num_steps)


def generated(
    sample: Callable[[jax.Array, int], Batch], batch_size: int, num_steps: int
) -> Batches:
    """``num_steps`` fresh batches of ``sample(key, batch_size)`` (synthetic tasks); no data."""
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"batch_size={batch_size} and num_steps={num_steps} must be positive")

    def plan(key, data):
        del data
        return jax.random.split(key, num_steps)

    def take(keys, data, i):
        del data
        return sample(keys[i], batch_size), jnp.ones((batch_size,))

    return Batches(plan, take, num_steps)


def _run_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    state: TrainState,
    data: Any,
    first,
    count: int,
    mesh: Mesh | None,
    trace: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
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
    grad_norms, examples = per_step.pop("grad_norm"), per_step.pop("examples")
    sums = {k: jnp.sum(v) for k, v in per_step.items()}
    sums["examples"] = jnp.sum(examples)
    sums["grad_norm_max"] = jnp.max(grad_norms)
    loss_ok, grad_ok = jnp.isfinite(per_step["loss"]), jnp.isfinite(grad_norms)
    sums["finite"] = jnp.all(loss_ok & grad_ok)
    bad = jnp.argmin(loss_ok & grad_ok)  # the first False; 0 when there is none
    sums["nonfinite_step"] = jnp.where(sums["finite"], -1, first_step + bad + 1)
    sums["nonfinite_loss"] = ~loss_ok[bad]
    sums["nonfinite_gradient"] = ~grad_ok[bad]
    if trace:
        sums["step_loss"] = per_step["loss"] / jnp.maximum(examples, 1.0)
        sums["step_grad_norm"] = grad_norms
    return _replicated(state, mesh), sums


# Entries of a run of steps' sums that are not per-example sums (see summarize).
_NOT_SUMMED = (
    "examples",
    "grad_norm_max",
    "finite",
    "nonfinite_step",
    "nonfinite_loss",
    "nonfinite_gradient",
    "step_loss",
    "step_grad_norm",
)


def summarize(sums: dict) -> dict:
    """The metrics of a run of steps from its sums: per-example sums become means over the
    examples seen; the rest (``grad_norm_max``, ``finite``, ``nonfinite_*``, traces) is kept.
    Works on device arrays (inside ``jit``) and on NumPy values."""
    seen = sums["examples"]
    return {k: (v if k in _NOT_SUMMED else v / seen) for k, v in sums.items() if k != "examples"}


def merge_sums(before: dict | None, after: dict) -> dict:
    """The sums of two consecutive runs of steps of one pass (host NumPy values), in order."""
    if before is None:
        return dict(after)
    merged = {}
    for k, v in after.items():
        if k == "grad_norm_max":
            merged[k] = np.maximum(before[k], v)
        elif k == "finite":
            merged[k] = np.logical_and(before[k], v)
        elif k.startswith("nonfinite_"):
            merged[k] = before[k] if not before["finite"] else v
        elif k in ("step_loss", "step_grad_norm"):
            merged[k] = np.concatenate([before[k], v])
        else:
            merged[k] = np.add(before[k], v, dtype=np.asarray(v).dtype)
    return merged


def train_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    state: TrainState,
    data: Any,
    *,
    mesh: Mesh | None = None,
    trace: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``batches.num_steps`` updates (:func:`apply_update`) as one ``lax.scan``: pure, so it
    jits (:func:`make_train_steps`) and vmaps (over seeds, or a traced clipping norm).

    Returns:
      ``(state, metrics)``: ``loss`` and every statistic of ``loss_fn`` as means over the
      examples seen, ``grad_norm_max`` (the largest pre-clip global gradient norm),
      ``finite`` (false when a loss or gradient was NaN or infinite) and, for the first step
      where one was, ``nonfinite_step`` (its ``state.step`` after the update; -1 when all were
      finite), ``nonfinite_loss`` and ``nonfinite_gradient`` (which was); with ``trace`` also
      ``step_loss`` and ``step_grad_norm``, ``(num_steps,)`` each (the loss of each step's
      batch, before its update).
    """
    state, sums = _run_steps(
        loss_fn, optimizer, batches, state, data, 0, batches.num_steps, mesh, trace
    )
    return state, summarize(sums)


class TrainSteps:
    """Jitted runs of :func:`train_steps`' updates; what :func:`make_train_steps` returns.

    ``steps(state, data) -> (state, metrics)`` runs one whole pass (an epoch) as one compiled
    call. :func:`fit` instead runs a pass as several calls of at most ``steps_per_call`` steps
    (:meth:`run`), to report progress and checkpoint inside long epochs; the updates are the
    same either way (the pass's batches come from ``state.key``, tests/test_train.py pins the
    states bit-identical). :meth:`compile` compiles ahead of the first call, so that its time
    is reported apart from training time.

    Attributes:
      num_steps: updates per pass.
    """

    def __init__(self, loss_fn, optimizer, batches: Batches, mesh: Mesh | None, trace: bool):
        self.num_steps = batches.num_steps
        self._mesh = mesh

        def run(state, data, first, count):
            return _run_steps(loss_fn, optimizer, batches, state, data, first, count, mesh, trace)

        def whole(state, data):
            return train_steps(loss_fn, optimizer, batches, state, data, mesh=mesh, trace=trace)

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

    def run(self, state: TrainState, data, first: int, count: int):
        """Steps ``first .. first + count - 1`` of the pass keyed by ``state.key``:
        ``(state, sums)`` (per-example sums; :func:`summarize`, :func:`merge_sums`)."""
        state, data = self._placed(state, data)
        first = jnp.asarray(first, jnp.int32)
        compiled = self._compiled.get(count)
        if compiled is not None:
            return compiled(state, data, first)
        return self._run(state, data, first, count)


def make_train_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batches: Batches,
    *,
    mesh: Mesh | None = None,
    trace: bool = False,
) -> TrainSteps:
    """Jitted ``run(state, data) -> (state, metrics)``: :func:`train_steps` as one compiled call.

    With :func:`shuffled_epoch` batches, one call is an epoch, fused on device. With a ``mesh``
    (:func:`rnn_jax.parallel.make_mesh`; give the batches the same mesh) params, optimiser
    state and ``data`` are replicated and each batch is split over the devices: the same
    updates as on one device, up to the order of float32 sums. The result is a
    :class:`TrainSteps`, which :func:`fit` also runs in parts of an epoch.
    """
    return TrainSteps(loss_fn, optimizer, batches, mesh, trace)


def make_evaluate(
    loss_fn: LossFn, batches: Batches, *, mesh: Mesh | None = None, carry: Carry = None
):
    """Jitted ``evaluate(params, data) -> metrics``: example-weighted means, one call.

    ``batches`` is usually ``shuffled_epoch(..., shuffle=False)``: every example once, in
    order. With a ``mesh`` the batches are split over its devices as in training. With a
    ``carry`` (the initial one, e.g. zeros) the loss is stateful, as in training, and the
    carry is passed from each batch to the next: :func:`in_order` windows of one held-out
    stream are then scored as one long sequence.
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


class TrainCurves(NamedTuple):
    """What :func:`make_task_trainer`'s ``train`` records.

    Attributes:
      train_loss: ``(num_steps,)`` mean loss of each step's batch (before its update).
      grad_norm: ``(num_steps,)`` global gradient norm before clipping.
      test_loss: ``(num_evals + 1,)`` mean test loss at steps ``0, eval_every, 2·eval_every, …``.
    """

    train_loss: jax.Array
    grad_norm: jax.Array
    test_loss: jax.Array


def make_task_trainer(
    cell,
    task,
    *,
    num_steps: int,
    eval_every: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
    lr_factors: dict[str, float] | None = None,
):
    """A model for a synthetic ``task`` and a pure, vmappable ``train`` on generated batches.

    The model is ``cell`` with a ``Dense(task.output_dim)`` head on its last output
    (:func:`rnn_jax.sequence_classifier`) or, for sequence tasks, on every output
    (:func:`rnn_jax.sequence_tagger`). The whole run is one ``lax.scan`` of
    :func:`train_steps` calls (``eval_every`` steps of fresh ``task.sample`` batches, then a
    test evaluation), so ``jax.vmap`` over ``params`` and ``key`` trains many seeds in one
    compiled program, and over ``clip_norm`` several clipping settings at once.

    Args:
      cell: the recurrence.
      task: a :class:`rnn_jax.synthetic.Task`.
      num_steps: updates; a multiple of ``eval_every``.
      eval_every: steps between test evaluations.
      batch_size: examples per update.
      learning_rate: of the optimiser.
      optimizer: ``"adam"`` (``optax.adam``, default betas) or ``"rmsprop"`` (the Keras 3
        defaults of :func:`rmsprop`).
      lr_factors: ``{param name: factor}``: every parameter whose own name (the last key of
        its path, e.g. ``"nu_log"``) is listed learns at ``factor × learning_rate`` (its
        optimiser update is scaled, after clipping and the optimiser: with Adam exactly a
        smaller learning rate); the rest at ``learning_rate``. The LRU paper trains ``ν, θ``
        at 0.5×. A name that no parameter has raises ``ValueError`` (at the first ``train``).
        The clip still sees the whole, unscaled gradient.

    Returns:
      ``(model, train)``. ``train(params, key, clip_norm, test_xs, test_targets)`` starts from
      ``params = model.init(...)``, draws the batches from ``key``, clips the global gradient
      norm to ``clip_norm`` (a float scalar, may be traced; ``jnp.inf`` for no clipping) and
      returns the final params and :class:`TrainCurves`.
    """
    if num_steps < 1 or eval_every < 1 or num_steps % eval_every:
        raise ValueError(
            f"num_steps={num_steps} must be a positive multiple of eval_every={eval_every}"
        )
    if optimizer not in ("adam", "rmsprop"):
        raise ValueError(f"optimizer={optimizer!r} must be 'adam' or 'rmsprop'")
    factors = dict(lr_factors or {})
    for name, factor in factors.items():
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"lr_factors={factors!r}: {name}'s factor must be finite and >= 0")
    head = sequence_tagger if task.return_sequences else sequence_classifier
    model = head(cell, task.input_dim, task.output_dim)
    batches = generated(task.sample, batch_size, eval_every)

    def loss_fn(params, batch):
        xs, targets = batch
        return task.loss(model.apply(params, xs), targets), {}

    def test_loss(params, test_xs, test_targets):
        return jnp.mean(task.loss(model.apply(params, test_xs), test_targets))

    def factor_of(path) -> float:
        last = path[-1]
        return factors.get(getattr(last, "key", getattr(last, "name", None)), 1.0)

    def scale_by_name() -> optax.GradientTransformation:
        """Multiplies each update by its parameter's factor (static: a Python float)."""

        def init_fn(params):
            names = {
                getattr(p[-1], "key", getattr(p[-1], "name", None))
                for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            }
            unknown = sorted(set(factors) - names)
            if unknown:
                raise ValueError(
                    f"lr_factors={factors!r}: no parameter is called {unknown[0]!r} "
                    f"(the params have {', '.join(sorted(map(str, names)))})"
                )
            return optax.EmptyState()

        def update_fn(updates, state, params=None):
            del params
            scaled = jax.tree_util.tree_map_with_path(
                lambda p, u: u if factor_of(p) == 1.0 else (u * factor_of(p)).astype(u.dtype),
                updates,
            )
            return scaled, state

        return optax.GradientTransformation(init_fn, update_fn)

    def train(params, key, clip_norm, test_xs, test_targets):
        base = optax.adam(learning_rate) if optimizer == "adam" else rmsprop(learning_rate)
        opt = optax.chain(clip_by_global_norm(clip_norm), base)
        if factors:
            opt = optax.chain(opt, scale_by_name())
        state = create_train_state(params, opt, key)

        def chunk(state, _):
            state, m = train_steps(loss_fn, opt, batches, state, None, trace=True)
            test = test_loss(state.params, test_xs, test_targets)
            return state, (m["step_loss"], m["step_grad_norm"], test)

        first = test_loss(params, test_xs, test_targets)
        state, (losses, norms, tests) = jax.lax.scan(
            chunk, state, None, length=num_steps // eval_every
        )
        curves = TrainCurves(
            losses.reshape(-1), norms.reshape(-1), jnp.concatenate([first[None], tests])
        )
        return state.params, curves

    return model, train


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def _check_resumable(directory: str, step: int, meta: dict) -> dict:
    """The saved meta of checkpoint ``step``, once every entry of ``meta`` matches it."""
    saved = restore_meta(directory, step)
    problems = []
    for key, value in meta.items():
        if key not in saved:
            problems.append(f"{key}: missing in the checkpoint")
        elif key == "config":
            for name in sorted(set(value) | set(saved[key])):
                old, new = saved[key].get(name), value.get(name)
                if isinstance(old, dict) and isinstance(new, dict):
                    # Compared entry by entry; an entry the checkpoint lacks (written before
                    # it existed) is not held against it.
                    problems += [
                        f"{name}=...: {k} {new[k]!r} differs from the checkpoint's {old[k]!r}"
                        for k in sorted(set(old) & set(new))
                        if old[k] != new[k]
                    ]
                    problems += [
                        f"{name}=...: {k} missing in this run" for k in sorted(set(old) - set(new))
                    ]
                elif old != new:
                    problems.append(f"{name}={new!r} differs from the checkpoint's {old!r}")
        elif saved[key] != value:
            problems.append(f"{key}: the checkpoint has {saved[key]!r}, this run {value!r}")
    if problems:
        raise CheckpointError(
            f"the checkpoint in {directory!r} (step {step}) was written by a different run: "
            + "; ".join(problems)
            + ". Resume it with the configuration it was written with, or use a new workdir."
        )
    return saved


def read_history(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` that :func:`fit` wrote, one per iteration (read
    only: a torn last line is left out, not repaired; :func:`fit` repairs it under its lock)."""
    return read_log(os.path.join(workdir, "metrics.jsonl"), repair=False)


class _Position(NamedTuple):
    """Where a run stands: ``iteration`` iterations done, then ``epoch`` epochs and ``steps``
    steps of the next, with that epoch's ``sums`` so far (host values) and ``seconds``."""

    iteration: int
    epoch: int = 0
    steps: int = 0
    sums: dict | None = None
    seconds: float = 0.0


PROGRESS_KEY = "_progress"


def _progress_meta(position: _Position) -> dict:
    """The position as JSON, exactly: float32 sums are exact as Python floats."""
    sums = None
    if position.sums is not None:
        sums = {
            k: {"dtype": str(np.asarray(v).dtype), "value": np.asarray(v).tolist()}
            for k, v in position.sums.items()
        }
    return {**position._asdict(), "sums": sums}


def _position_from_meta(saved: dict, step: int) -> _Position:
    progress = saved.get(PROGRESS_KEY)
    if progress is None:  # written before mid-epoch checkpoints: indexed by iteration
        return _Position(iteration=step)
    sums = progress.get("sums")
    if sums is not None:
        sums = {k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in sums.items()}
    return _Position(
        progress["iteration"], progress["epoch"], progress["steps"], sums, progress["seconds"]
    )


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fit(
    state: TrainState,
    train_fn: Callable,
    data: Any,
    *,
    iterations: int,
    epochs_per_iteration: int = 1,
    workdir: str | None = None,
    meta: dict | None = None,
    on_iteration: Callable[[int, TrainState, dict], dict] | None = None,
    stop: Callable[[dict], bool] | None = None,
    max_to_keep: int = 3,
    steps_per_call: int | None = None,
    checkpoint_every: int | None = None,
    progress_seconds: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """The training loop: compiled runs of steps, a checkpoint and a metrics line per iteration.

    Each iteration runs ``epochs_per_iteration`` epochs of ``train_fn`` (a
    :class:`TrainSteps` from :func:`make_train_steps`; or any ``(state, data) -> (state,
    metrics)``, run whole), then ``on_iteration(iteration, state, metrics)`` (evaluation,
    samples), whose dict is merged into the iteration's metrics; the metrics are appended to
    ``workdir/metrics.jsonl`` and an orbax checkpoint of ``state`` with ``meta`` is written to
    ``workdir/checkpoints``, indexed by ``state.step``. With an existing checkpoint in
    ``workdir`` the loop resumes from it, once ``meta`` is checked against the saved one (a
    mismatch raises a :class:`~rnn_jax.checkpoint.CheckpointError` naming what differs).
    Everything random is drawn from ``state.key``, so a resumed run ends bit-identical to an
    uninterrupted one.

    Long epochs: a :class:`TrainSteps` epoch runs as calls of at most ``steps_per_call``
    steps; between calls, a progress line (steps, examples/s, loss so far, ETA) is logged
    once ``progress_seconds`` have passed since the last, and a checkpoint of the position
    inside the epoch (with the epoch's metric sums so far) is written once
    ``checkpoint_every`` steps have passed since the last checkpoint. A run resumed from it
    ends bit-identical to an uninterrupted one, metrics included. The calls are compiled
    before the first (:meth:`TrainSteps.compile`): the first iteration's row gets
    ``compile_seconds``, and its ``seconds`` are training alone.

    Only one run at a time may use a ``workdir``: :func:`rnn_jax.workdir.lock_workdir` is
    held for the whole call (a second run is refused at once, naming the holder's PID; the
    lock of a killed run is taken over). A torn last line of ``metrics.jsonl`` (a kill during
    its write) is repaired. Every checkpoint carries a digest: a damaged newest step is named
    (absl warning) and the run resumes from the newest intact one.

    Args:
      stop: ``metrics -> bool``, asked after every iteration (and of the last one a resumed
        run finds): true ends training there, e.g. once a target is met.
      steps_per_call: the most steps per compiled call (None: a whole epoch per call).
      checkpoint_every: steps between checkpoints inside an epoch (None: at iteration ends
        only). Counted at call boundaries.
      progress_seconds: seconds between progress lines inside an epoch (None: none).
      log: where the resume, compile and progress lines go (default ``absl.logging.info``).

    Raises:
      NonFiniteLossError: a loss or gradient was NaN or infinite; nothing after the last
        checkpoint is saved, so the last good checkpoint stays the latest.

    Returns:
      ``(state, history)``: the final state and one dict per iteration, those of an earlier
      run that this one resumed included.
    """
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(
            f"workdir={workdir!r} is a file, not a directory; pass a directory (created if missing)"
        )
    for name, value in (("steps_per_call", steps_per_call), ("checkpoint_every", checkpoint_every)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be a positive number of steps, or None")
    log = logging.info if log is None else log

    primary = jax.process_index() == 0  # multi-host: one process writes the shared log
    meta = dict(meta or {})
    # One run per workdir: the lock comes before anything is read or written there.
    holding = workdir is not None and primary
    with lock_workdir(workdir) if holding else contextlib.nullcontext():
        position, ckpt_dir, log_path, history, found = _Position(0), None, None, [], None
        if workdir is not None:
            ckpt_dir = os.path.join(workdir, "checkpoints")
            log_path = os.path.join(workdir, "metrics.jsonl")
            # The newest step that reads back and matches its digest; damaged newer ones are named.
            intact = newest_intact(ckpt_dir)
            if intact.step is None and intact.skipped:
                raise CheckpointError(
                    f"no intact checkpoint in {ckpt_dir!r}: all {len(intact.skipped)} are damaged, "
                    f"the newest as follows: {intact.skipped[0]}. Delete them to start afresh, or "
                    "use a new workdir"
                )
            for line in intact.skipped:
                logging.warning(line)
            found = intact.step
            if found is not None:
                saved = _check_resumable(ckpt_dir, found, meta)
                state, _ = restore_checkpoint(ckpt_dir, found, state)
                position = _position_from_meta(saved, found)
                if position.iteration < iterations:
                    log(_resume_line(position, found, ckpt_dir, train_fn, iterations))
            # The last row of each iteration up to the checkpoint's: rows of iterations that were
            # logged but not checkpointed are trained again.
            rows = read_log(log_path, repair=primary)
            history = sorted(
                {
                    row["iteration"]: row for row in rows if row["iteration"] <= position.iteration
                }.values(),
                key=lambda row: row["iteration"],
            )
            if primary and rows != history:
                rewrite_log(log_path, history)
        if history and stop is not None and stop(history[-1]):
            log(f"the stop condition holds at iteration {position.iteration}: nothing to do")
            return state, history
        if position.iteration >= iterations:
            if found is not None:
                log(
                    f"all {iterations} iterations are done (the checkpoint in {ckpt_dir} is at "
                    f"iteration {position.iteration}): nothing to do; raise iterations to "
                    "train further"
                )
            return state, history

        chunked = isinstance(train_fn, TrainSteps)
        epoch_steps = train_fn.num_steps if chunked else None
        call = min(steps_per_call or epoch_steps, epoch_steps) if chunked else None
        compile_seconds = None
        if chunked:
            counts = {call} | ({epoch_steps % call} if epoch_steps % call else set())
            counts |= {min(call, epoch_steps - position.steps)} if position.steps else set()
            compile_seconds = train_fn.compile(state, data, counts)
            log(f"compiled the training steps in {compile_seconds:.1f} s")
        last_saved = int(state.step) if found is not None else None

        def save(step_position: _Position):
            nonlocal last_saved
            if workdir is not None:
                saved_meta = {**meta, PROGRESS_KEY: _progress_meta(step_position)}
                last_saved = int(state.step)
                save_checkpoint(ckpt_dir, last_saved, state, saved_meta, max_to_keep)

        def failed(iteration, metrics):
            return NonFiniteLossError(_nonfinite_message(iteration, metrics, ckpt_dir, last_saved))

        for iteration in range(position.iteration + 1, iterations + 1):
            for epoch in range(position.epoch, epochs_per_iteration):
                if not chunked:
                    tic = time.perf_counter()
                    state, metrics = train_fn(state, data)
                    metrics = {k: v.tolist() for k, v in jax.device_get(metrics).items()}
                    seconds = time.perf_counter() - tic
                    if not metrics.pop("finite"):
                        raise failed(iteration, metrics)
                else:
                    done, sums, seconds = position.steps, position.sums, position.seconds
                    last_line = time.perf_counter()
                    while done < epoch_steps:
                        count = min(call, epoch_steps - done)
                        tic = time.perf_counter()
                        state, part = train_fn.run(state, data, done, count)
                        part = jax.device_get(part)
                        seconds += time.perf_counter() - tic
                        if not part["finite"]:
                            raise failed(iteration, {k: v.tolist() for k, v in part.items()})
                        sums, done = merge_sums(sums, part), done + count
                        if done == epoch_steps:
                            break
                        position = _Position(iteration - 1, epoch, done, sums, seconds)
                        if (
                            checkpoint_every is not None
                            and int(state.step) - (last_saved or 0) >= checkpoint_every
                        ):
                            save(position)
                        now = time.perf_counter()
                        if progress_seconds is not None and now - last_line >= progress_seconds:
                            log(_progress_line(position, epoch_steps, epochs_per_iteration))
                            last_line = now
                    metrics = {k: v.tolist() for k, v in summarize(sums).items()}
                    metrics.pop("finite")
                for name in _NONFINITE_KEYS:
                    metrics.pop(name, None)
                position = _Position(iteration - 1, epoch + 1)
            metrics = {
                "iteration": iteration,
                "step": int(state.step),
                **metrics,
                "seconds": seconds,
            }
            if compile_seconds is not None:
                metrics["compile_seconds"], compile_seconds = compile_seconds, None
            if on_iteration is not None:
                metrics.update(on_iteration(iteration, state, metrics))
            # The form a resumed run reads back from metrics.jsonl: string keys, lists.
            metrics = json.loads(json.dumps(metrics))
            history.append(metrics)
            position = _Position(iteration)
            if workdir is not None:
                if primary:
                    append_log(log_path, metrics)
                save(position)
            if stop is not None and stop(metrics):
                break
        return state, history


def _resume_line(position: _Position, step: int, ckpt_dir: str, train_fn, iterations: int) -> str:
    where = f"iteration {position.iteration} done"
    if position.steps:
        of = f" of {train_fn.num_steps}" if isinstance(train_fn, TrainSteps) else ""
        where += f", {position.steps}{of} steps into the next epoch"
    return (
        f"resuming from step {step} in {ckpt_dir} ({where}); training up to iteration {iterations}"
    )


def _progress_line(position: _Position, epoch_steps: int, epochs_per_iteration: int) -> str:
    sums, seconds = position.sums, position.seconds
    rate = float(sums["examples"]) / max(seconds, 1e-9)
    left = (epoch_steps - position.steps) * seconds / max(position.steps, 1)
    epoch = (
        f", epoch {position.epoch + 1}/{epochs_per_iteration}" if epochs_per_iteration > 1 else ""
    )
    return (
        f"iteration {position.iteration + 1}{epoch}: {position.steps}/{epoch_steps} steps "
        f"({100 * position.steps / epoch_steps:.0f}%), {rate:.0f} examples/s, loss so far "
        f"{float(sums['loss']) / float(sums['examples']):.4f}, epoch ETA {_duration(left)}"
    )


_NONFINITE_KEYS = ("nonfinite_step", "nonfinite_loss", "nonfinite_gradient")


def _nonfinite_message(
    iteration: int, metrics: dict, ckpt_dir: str | None, saved: int | None
) -> str:
    """What happened (which quantity, which step), what is kept, and what helps."""
    step = metrics.get("nonfinite_step", -1)
    at = f"at step {step}" if step >= 0 else "in this epoch"
    if metrics.get("nonfinite_loss", True):
        what = f"the loss became NaN or infinite {at} (the parameters diverged)"
        advice = "lower the learning rate"
    else:
        what = f"the gradient became NaN or infinite {at} while the loss was finite"
        advice = "clip the gradient norm (clip_norm), or lower the learning rate"
    if ckpt_dir is None:
        kept = "nothing is saved without a workdir"
    elif saved is not None:
        kept = f"the last good checkpoint, step {saved} in {ckpt_dir}, is kept"
    else:
        kept = "no checkpoint had been written yet"
    return (
        f"iteration {iteration}: {what}; stopped without saving after it, {kept}. "
        f"To go on, {advice}."
    )
