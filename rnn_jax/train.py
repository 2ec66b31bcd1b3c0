"""TrainState, the Keras-default RMSprop, and the jitted train step and fused epoch."""

import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from rnn_jax import parallel

Params = Any
Batch = Any
# loss_fn(params, batch) -> (per-example loss (B,), {name: per-example value (B,)})
LossFn = Callable[[Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    """Everything a run needs to continue bit for bit: params, optimiser state, step, PRNG key."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array


def create_train_state(params: Params, optimizer: optax.GradientTransformation, key) -> TrainState:
    """A fresh state at step 0; ``key`` drives the per-epoch shuffles."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key)


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
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt)


def _weighted(loss_fn: LossFn, params, batch, weights):
    losses, stats = loss_fn(params, batch)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(losses * weights) / total
    sums = {name: jnp.sum(value * weights) for name, value in stats.items()}
    sums["loss"] = jnp.sum(losses * weights)
    return loss, sums


def _apply_update(loss_fn, optimizer, state: TrainState, batch, weights):
    (_, sums), grads = jax.value_and_grad(_weighted, argnums=1, has_aux=True)(
        loss_fn, state.params, batch, weights
    )
    sums["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), sums


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
    mark padding); ``metrics`` holds that mean and the means of ``loss_fn``'s statistics.
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
        state, sums = _apply_update(loss_fn, optimizer, _replicated(state, mesh), batch, weights)
        grad_norm = sums.pop("grad_norm")
        count = jnp.maximum(jnp.sum(weights), 1.0)
        metrics = {**{k: v / count for k, v in sums.items()}, "grad_norm": grad_norm}
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
    """Batch ``b``'s ``(indices (size,), weights (size,))``, as row ``b`` of _batch_indices.

    Rows ``j >= batch_size`` (padding to a multiple of the device count) and positions past
    the data (the last partial batch) get example 0 and weight 0.
    """
    j = jnp.arange(size)
    positions = b * batch_size + j
    valid = (j < batch_size) & (positions < num_examples)
    indices = jnp.where(valid, order(jnp.minimum(positions, num_examples - 1)), 0)
    return indices, valid.astype(jnp.float32)


def _batch_indices(key, num_examples: int, batch_size: int, shuffle: bool):
    """All of an epoch's batches at once: ``(indices, weights)``, each ``(batches, batch_size)``."""
    order = _epoch_order(key, num_examples) if shuffle else (lambda positions: positions)
    batches = jnp.arange(math.ceil(num_examples / batch_size))
    return jax.vmap(lambda b: _batch_at(order, b, num_examples, batch_size, batch_size))(batches)


def _gather(get_batch, data, indices, weights, mesh: Mesh | None):
    if mesh is None:
        return get_batch(data, indices), weights
    indices, weights = parallel.constrain_batch(indices, weights, mesh)
    return parallel.constrain_batch(get_batch(data, indices), weights, mesh)


def make_epoch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    get_batch: Callable[[Any, jax.Array], Batch],
    num_examples: int,
    batch_size: int,
    *,
    mesh: Mesh | None = None,
    num_batches: int | None = None,
):
    """One shuffled epoch as one compiled call: a ``lax.scan`` over the batches, on device.

    Args:
      loss_fn: ``(params, batch) -> (per-example loss, {name: per-example statistic})``.
      optimizer: an optax transformation.
      get_batch: ``(data, indices (batch_size,)) -> batch``, gathering examples on device.
      num_examples: how many examples ``data`` holds (indices ``0 .. num_examples - 1``).
      batch_size: examples per update; the last partial batch is kept and its loss averaged
        over its real examples only, as Keras does.
      mesh: optional :func:`rnn_jax.parallel.make_mesh` mesh: each batch is split along its
        'data' axis (padded with weight-0 rows to a multiple of the device count, which
        changes nothing), params, optimiser state and ``data`` are replicated. Same updates
        as on one device, up to the order of float32 sums.
      num_batches: run only the first ``num_batches`` batches of each shuffled epoch (Keras's
        ``steps_per_epoch``; benchmarks); default all.

    Returns:
      jitted ``epoch(state, data) -> (state, metrics)``: a new shuffle key is split from
      ``state.key``; ``metrics`` are example-weighted means over the epoch plus
      ``grad_norm_max`` (the largest pre-clip global gradient norm) and ``finite`` (false when a
      loss or gradient was NaN or infinite). Up to ``2**20`` examples the shuffle is
      ``jax.random.permutation``; beyond, a keyed pseudo-random permutation computed batch by
      batch, so that memory does not grow with the number of examples.
    """
    if num_examples < 1:
        raise ValueError("the data holds no examples")
    total = math.ceil(num_examples / batch_size)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be positive or None, got {num_batches}")
    num_batches = total if num_batches is None else min(num_batches, total)
    seen = min(num_batches * batch_size, num_examples)
    size = parallel.padded_size(batch_size, mesh)

    @jax.jit
    def epoch(state: TrainState, data):
        key, shuffle_key = jax.random.split(state.key)
        order = _epoch_order(shuffle_key, num_examples)

        def body(state, b):
            indices, weights = _batch_at(order, b, num_examples, batch_size, size)
            batch, weights = _gather(get_batch, data, indices, weights, mesh)
            return _apply_update(loss_fn, optimizer, state, batch, weights)

        state = _replicated(state._replace(key=key), mesh)
        state, sums = jax.lax.scan(body, state, jnp.arange(num_batches))
        grad_norms = sums.pop("grad_norm")
        metrics = {k: jnp.sum(v) / seen for k, v in sums.items()}
        metrics["grad_norm_max"] = jnp.max(grad_norms)
        metrics["finite"] = jnp.all(jnp.isfinite(grad_norms)) & jnp.isfinite(metrics["loss"])
        return _replicated(state, mesh), metrics

    return _on_mesh(epoch, mesh)


def make_evaluate(
    loss_fn: LossFn,
    get_batch: Callable[[Any, jax.Array], Batch],
    num_examples: int,
    batch_size: int,
    *,
    mesh: Mesh | None = None,
):
    """Jitted ``evaluate(params, data) -> metrics``: example-weighted means, in order, one call.

    With a ``mesh`` the batches are split over its devices as in :func:`make_epoch`.
    """
    num_batches = math.ceil(num_examples / batch_size)
    size = parallel.padded_size(batch_size, mesh)

    @jax.jit
    def evaluate(params, data):
        params = _replicated(params, mesh)

        def body(_, b):
            indices, weights = _batch_at(lambda p: p, b, num_examples, batch_size, size)
            batch, weights = _gather(get_batch, data, indices, weights, mesh)
            return None, _weighted(loss_fn, params, batch, weights)[1]

        _, sums = jax.lax.scan(body, None, jnp.arange(num_batches))
        return {k: jnp.sum(v) / num_examples for k, v in sums.items()}

    return _on_mesh(evaluate, mesh)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def _check_resumable(directory: str, step: int, meta: dict):
    from rnn_jax.checkpoint import CheckpointError, restore_meta

    saved = restore_meta(directory, step)
    problems = []
    for key, value in meta.items():
        if key not in saved:
            problems.append(f"{key}: missing in the checkpoint")
        elif key == "config":
            for name in sorted(set(value) | set(saved[key])):
                old, new = saved[key].get(name), value.get(name)
                if old != new:
                    problems.append(f"--{name}: checkpoint has {old!r}, flags give {new!r}")
        elif saved[key] != value:
            problems.append(f"{key}: checkpoint has {saved[key]!r}, this run has {value!r}")
    if problems:
        raise CheckpointError(
            f"the checkpoint in {directory!r} (iteration {step}) was written by a different run:\n  "
            + "\n  ".join(problems)
            + "\nRerun with the flags it was written with to resume it, or pass a new --workdir."
        )


def _read_log(path: str, last_iteration: int) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return [line for line in lines if json.loads(line)["iteration"] <= last_iteration]


def fit(
    state: TrainState,
    epoch: Callable,
    data: Any,
    *,
    iterations: int,
    epochs_per_iteration: int = 1,
    workdir: str | None = None,
    meta: dict | None = None,
    on_iteration: Callable[[int, TrainState, dict], dict] | None = None,
    max_to_keep: int = 3,
) -> tuple[TrainState, list[dict]]:
    """The shared training loop: fused epochs, a checkpoint and a metrics line per iteration.

    Each iteration runs ``epochs_per_iteration`` calls of ``epoch(state, data)`` (see
    :func:`make_epoch`), then ``on_iteration(iteration, state, metrics)`` (evaluation, samples),
    whose dict is merged into the iteration's metrics; the metrics are appended to
    ``workdir/metrics.jsonl`` and an orbax checkpoint of ``state`` with ``meta`` is written to
    ``workdir/checkpoints``. With an existing checkpoint in ``workdir`` the loop resumes after
    its iteration, once ``meta`` is checked against the saved one (a mismatch raises a
    :class:`~rnn_jax.checkpoint.CheckpointError` naming what differs). Everything random is
    drawn from ``state.key``, so a resumed run ends bit-identical to an uninterrupted one.

    Raises:
      NonFiniteLossError: an epoch's loss or gradient was NaN or infinite; nothing of that
        iteration is saved, so the last good checkpoint stays the latest.

    Returns:
      ``(state, history)``: the final state and this call's metrics, one dict per iteration.
    """
    from rnn_jax.checkpoint import CheckpointError, latest_step, restore_checkpoint, save_checkpoint

    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(
            f"--workdir {workdir!r} is a file, not a directory; pass a directory (created if missing)"
        )

    meta = dict(meta or {})
    start, ckpt_dir, log_path = 0, None, None
    primary = jax.process_index() == 0  # multi-host: one process writes the shared log
    if workdir is not None:
        ckpt_dir = os.path.join(workdir, "checkpoints")
        log_path = os.path.join(workdir, "metrics.jsonl")
        found = latest_step(ckpt_dir)
        if found is not None:
            _check_resumable(ckpt_dir, found, meta)
            state, _ = restore_checkpoint(ckpt_dir, found, state)
            start = found
            logging.info("resuming from iteration %d in %s", found, ckpt_dir)
        kept = _read_log(log_path, start)
        if primary:
            _atomic_write(log_path, "".join(kept))

    history = []
    for iteration in range(start + 1, iterations + 1):
        for _ in range(epochs_per_iteration):
            tic = time.perf_counter()
            state, metrics = epoch(state, data)
            metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - tic
            if not metrics.pop("finite"):
                raise NonFiniteLossError(
                    f"iteration {iteration}: the loss or a gradient became NaN or infinite "
                    f"(epoch loss {metrics['loss']}); stopped without saving this iteration"
                    + (f", the last good checkpoint in {ckpt_dir} is kept" if ckpt_dir else "")
                    + ". Lower --learning_rate or set --clip_norm."
                )
        metrics = {"iteration": iteration, "step": int(state.step), **metrics, "seconds": seconds}
        if on_iteration is not None:
            metrics.update(on_iteration(iteration, state, metrics))
        history.append(metrics)
        if workdir is not None:
            if primary:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            save_checkpoint(ckpt_dir, iteration, state, meta, max_to_keep)
    return state, history


def _atomic_write(path: str, content: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)
