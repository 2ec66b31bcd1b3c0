"""Where a scan of updates gets its batches: shuffled epochs, draws with replacement, windows in
order, generated batches; each a :class:`Batches` of a per-call plan and a per-step take."""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rnn_jax import parallel

Batch = Any

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
    """Where a scan of updates (:func:`rnn_jax.train.scan_updates`) gets its batches.

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
    get_batch: Callable[[Any, jax.Array], Any],
    num_examples: int,
    batch_size: int,
    num_steps: int,
    *,
    weighted: bool = False,
    with_keys: bool = False,
) -> Batches:
    """``num_steps`` batches of examples drawn uniformly with replacement.

    Args:
      get_batch: ``(data, indices (batch_size,)) -> batch``, or with ``weighted`` ``-> (batch,
        weights (batch_size,))`` (e.g. :func:`rnn_jax.data.block_batch`, whose weights count
        the characters each row scores); unweighted rows weigh 1.
      num_examples: indices are drawn from ``0 .. num_examples - 1``.
      batch_size: examples per step.
      num_steps: steps per pass.
      weighted: whether ``get_batch`` returns the weights.
      with_keys: the loss gets ``(batch, key)`` (as :func:`in_order`'s): per-step randomness
        such as dropout, the same in a pass run as several calls.
    """
    if num_examples < 1 or batch_size < 1 or num_steps < 1:
        raise ValueError(
            f"num_examples={num_examples}, batch_size={batch_size} and num_steps={num_steps} "
            "must be positive"
        )

    def draw(key):
        return jax.random.randint(key, (num_steps, batch_size), 0, num_examples)

    def plan(key, data):
        del data
        if not with_keys:
            return draw(key), None
        draw_key, step_key = jax.random.split(key)
        return draw(draw_key), step_key

    def take(plan, data, i):
        indices, step_key = plan
        batch = get_batch(data, indices[i])
        batch, weights = batch if weighted else (batch, jnp.ones((batch_size,)))
        if with_keys:
            batch = (batch, jax.random.fold_in(step_key, i))
        return batch, weights

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
