"""unroll: the one ``lax.scan`` that runs any cell over a sequence."""

import jax
import jax.numpy as jnp

from rnn_jax import _fast
from rnn_jax.cells import Carry, Cell, Params, Recurrence
from rnn_jax.linear import LinearRecurrence, associative_unroll


def unroll(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    carry: Carry | None = None,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    return_sequences: bool = False,
    unroll: int | bool = 1,
    fast: bool = True,
    parallel: bool | None = None,
) -> tuple[Carry, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs`` with one ``jax.lax.scan``.

    The input half of every step (``x W + b``) is computed for all steps before the scan, as one
    matrix product (float features) or one row gather (integer tokens); the scan below runs
    only the recurrent half, ``cell.recur``, step by step. Cells whose ``recur`` is a
    :class:`rnn_jax.cells.Recurrence` (the built-in ones) take, without ``lengths`` and unless
    ``fast=False``, :func:`rnn_jax._fast.unroll_recurrence`: the same arithmetic with no
    product on a zero initial carry and the recurrent kernel's gradient formed as one matrix
    product over all steps (forward mode, ``vmap`` and higher orders still work).

    A cell whose ``recur`` is a :class:`rnn_jax.LinearRecurrence` (``h_t = a_t ⊙ h_{t-1} +
    b_t``: :func:`rnn_jax.min_gru`, :func:`rnn_jax.min_lstm`, :func:`rnn_jax.lru`) can instead
    run as one ``jax.lax.associative_scan`` (:func:`rnn_jax.linear.associative_unroll`):
    O(log T) sequential depth, but about three times the arithmetic and a pass over ``(time,
    batch, state)`` arrays in memory at every level, where the scan does T multiply-adds on a
    carry in cache. ``parallel=None`` takes it where the depth is what costs, on GPU and TPU
    (``jax.default_backend()``): their thousands of lanes sit idle in a step of a small
    recurrence, and each sequential step costs a kernel launch. On CPU, with a few cores that
    the scan's steps already keep busy, the extra work makes it slower
    (benchmarks/PARALLEL_SCAN.md: 1.8-2.5× on one core), so the sequential scan runs there.

    Args:
      cell: a :class:`rnn_jax.Cell`.
      params: the cell's parameters.
      xs: ``(batch, time, input_dim)`` float features or ``(batch, time)`` integer tokens.
      carry: the initial carry; zeros (``cell.initial_carry``) when None.
      lengths: optional ``(batch,)`` int: steps at or past ``lengths[b]`` are padding. As with
        Keras masking, the carry stays frozen there and the output is zero. With ``reverse``
        the padding is met first, so each sequence's backward pass starts at its own end.
      reverse: scan from the last step to the first (outputs stay in input order).
      return_sequences: return every step's output instead of the last one.
      unroll: ``lax.scan``'s unroll factor (``True`` unrolls fully).
      fast: allow the fast path; False runs the readable scan (tests pin the two equal).
      parallel: for a :class:`rnn_jax.LinearRecurrence`, True runs the associative scan
        (``unroll`` is then unused), False the sequential ``lax.scan`` (the reference the
        tests pin it to), None picks by backend: sequential on CPU, parallel elsewhere. True
        for any other cell is a ValueError.

    Returns:
      ``(final_carry, ys)``: ``ys`` is ``(batch, time, units)`` with ``return_sequences``,
      else ``(batch, units)``, the output of the last step processed (for each sequence its
      last real step: ``lengths - 1`` forwards, 0 with ``reverse``).
    """
    batch, time = xs.shape[0], xs.shape[1]
    linear = isinstance(cell.recur, LinearRecurrence)
    if parallel is None:
        parallel = linear and jax.default_backend() != "cpu"
    elif parallel and not linear:
        raise ValueError(
            "parallel=True needs a cell that is linear in its carry (its recur a "
            "rnn_jax.LinearRecurrence: min_gru, min_lstm, lru); this cell's recur is "
            f"{type(cell.recur).__name__}: use parallel=None or False"
        )
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths of shape {lengths.shape} must have shape ({batch},)")
    # Time-major inside: project the transposed tokens/features so no copy of xs is made.
    zs = cell.project(params, jnp.swapaxes(xs, 0, 1))
    params = cell.prepare(params)
    if fast and lengths is None and isinstance(cell.recur, Recurrence):
        if carry is None and not _fast.zero_initial_carry(cell):
            carry = cell.initial_carry(batch)
        carry, ys = _fast.unroll_recurrence(
            cell, params, zs, carry, reverse, return_sequences, unroll
        )
        return carry, (jnp.swapaxes(ys, 0, 1) if return_sequences else ys)
    if carry is None:
        carry = cell.initial_carry(batch)
    if parallel:
        carry, ys = associative_unroll(
            cell.recur,
            params,
            zs,
            carry,
            lengths=lengths,
            reverse=reverse,
            return_sequences=return_sequences,
        )
        return carry, (jnp.swapaxes(ys, 0, 1) if return_sequences else ys)
    # The step's output dtype, not the inputs' (a custom step may read integer tokens itself).
    z = jax.ShapeDtypeStruct(zs.shape[1:], zs.dtype)
    y = jax.eval_shape(lambda c, z: cell.recur(params, c, z)[1], carry, z)
    y0 = jnp.zeros(y.shape, y.dtype)

    if lengths is None:

        def body(state, z):
            carry, _ = state
            carry, y = cell.recur(params, carry, z)
            return (carry, y), (y if return_sequences else None)

        scanned = zs
    else:
        valid = jnp.arange(time)[:, None] < lengths[None, :]  # (time, batch)

        def body(state, inputs):
            z, ok = inputs
            old_carry, old_y = state
            new_carry, y = cell.recur(params, old_carry, z)
            keep = ok[:, None]
            carry = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_carry, old_carry)
            y_last = jnp.where(keep, y, old_y)
            return (carry, y_last), (jnp.where(keep, y, 0.0) if return_sequences else None)

        scanned = (zs, valid)

    (carry, y_last), ys = jax.lax.scan(body, (carry, y0), scanned, reverse=reverse, unroll=unroll)
    if return_sequences:
        return carry, jnp.swapaxes(ys, 0, 1)
    return carry, y_last
