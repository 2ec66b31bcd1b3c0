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


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A jitted ``step(state, batch, weights=None) -> (state, metrics)`` on one batch.

    The loss is the ``weights``-weighted mean of ``loss_fn``'s per-example losses (weights 0
    mark padding); ``metrics`` holds that mean and the means of ``loss_fn``'s statistics.
    """

    @jax.jit
    def step(state, batch, weights=None):
        if weights is None:
            weights = jnp.ones(jax.tree.leaves(batch)[0].shape[0])
        state, sums = _apply_update(loss_fn, optimizer, state, batch, weights)
        grad_norm = sums.pop("grad_norm")
        count = jnp.maximum(jnp.sum(weights), 1.0)
        return state, {**{k: v / count for k, v in sums.items()}, "grad_norm": grad_norm}

    return step


def _batch_indices(key, num_examples: int, batch_size: int, shuffle: bool):
    num_batches = math.ceil(num_examples / batch_size)
    order = jax.random.permutation(key, num_examples) if shuffle else jnp.arange(num_examples)
    # The last partial batch is kept (as Keras does): pad it, and give padding weight 0.
    padded = jnp.full((num_batches * batch_size,), -1, jnp.int32).at[:num_examples].set(order)
    padded = padded.reshape(num_batches, batch_size)
    return jnp.maximum(padded, 0), (padded >= 0).astype(jnp.float32)


def make_epoch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    get_batch: Callable[[Any, jax.Array], Batch],
    num_examples: int,
    batch_size: int,
):
    """One shuffled epoch as one compiled call: a ``lax.scan`` over the batches, on device.

    Args:
      loss_fn: ``(params, batch) -> (per-example loss, {name: per-example statistic})``.
      optimizer: an optax transformation.
      get_batch: ``(data, indices (batch_size,)) -> batch``, gathering examples on device.
      num_examples: how many examples ``data`` holds (indices ``0 .. num_examples - 1``).
      batch_size: examples per update; the last partial batch is kept and its loss averaged
        over its real examples only, as Keras does.

    Returns:
      jitted ``epoch(state, data) -> (state, metrics)``: a new shuffle key is split from
      ``state.key``; ``metrics`` are example-weighted means over the epoch plus
      ``grad_norm_max`` (the largest pre-clip global gradient norm) and ``finite`` (false when a
      loss or gradient was NaN or infinite).
    """
    if num_examples < 1:
        raise ValueError("the data holds no examples")

    @jax.jit
    def epoch(state: TrainState, data):
        key, shuffle_key = jax.random.split(state.key)
        indices, weights = _batch_indices(shuffle_key, num_examples, batch_size, True)

        def body(state, inputs):
            idx, w = inputs
            return _apply_update(loss_fn, optimizer, state, get_batch(data, idx), w)

        state, sums = jax.lax.scan(body, state._replace(key=key), (indices, weights))
        grad_norms = sums.pop("grad_norm")
        metrics = {k: jnp.sum(v) / num_examples for k, v in sums.items()}
        metrics["grad_norm_max"] = jnp.max(grad_norms)
        metrics["finite"] = jnp.all(jnp.isfinite(grad_norms)) & jnp.isfinite(metrics["loss"])
        return state, metrics

    return epoch


def make_evaluate(
    loss_fn: LossFn, get_batch: Callable[[Any, jax.Array], Batch], num_examples: int, batch_size: int
):
    """Jitted ``evaluate(params, data) -> metrics``: example-weighted means, in order, one call."""

    @jax.jit
    def evaluate(params, data):
        indices, weights = _batch_indices(jax.random.PRNGKey(0), num_examples, batch_size, False)

        def body(_, inputs):
            idx, w = inputs
            return None, _weighted(loss_fn, params, get_batch(data, idx), w)[1]

        _, sums = jax.lax.scan(body, None, (indices, weights))
        return {k: jnp.sum(v) / num_examples for k, v in sums.items()}

    return evaluate


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
    from rnn_jax.checkpoint import latest_step, restore_checkpoint, save_checkpoint

    meta = dict(meta or {})
    start, ckpt_dir, log_path = 0, None, None
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
