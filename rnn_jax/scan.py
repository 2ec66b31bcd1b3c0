"""unroll: the one ``lax.scan`` that runs any cell over a sequence, and how it runs it."""

import enum

import jax
import jax.numpy as jnp

from rnn_jax import _fast
from rnn_jax.cells import Carry, Cell, Params, Recurrence
from rnn_jax.linear import LinearRecurrence, associative_unroll


class ScanType(enum.Enum):
    """How :func:`unroll` runs a cell over time (as recurrentgemma's ``ScanType``).

    Attributes:
      AUTO: ``FUSED`` where the cell has it (and no ``lengths``), else ``ASSOCIATIVE`` for a
        cell linear in its carry on GPU and TPU (``jax.default_backend()``), else
        ``SEQUENTIAL``.
      SEQUENTIAL: the readable ``jax.lax.scan`` of ``cell.recur``, step by step; any cell.
      FUSED: :func:`rnn_jax._fast.unroll_recurrence`, the same arithmetic as ``SEQUENTIAL``
        with no product on a zero initial carry and the recurrent kernel's gradient formed as
        one matrix product over all steps: a cell whose ``recur`` is a
        :class:`rnn_jax.cells.Recurrence` (simple_rnn, lstm, gru), without ``lengths``.
      ASSOCIATIVE: one ``jax.lax.associative_scan``
        (:func:`rnn_jax.linear.associative_unroll`): a cell whose ``recur`` is a
        :class:`rnn_jax.LinearRecurrence` (min_gru, min_lstm, lru).
    """

    AUTO = "auto"
    SEQUENTIAL = "sequential"
    FUSED = "fused"
    ASSOCIATIVE = "associative"


def available_scans(cell: Cell, lengths: jax.Array | None = None) -> tuple[ScanType, ...]:
    """The :class:`ScanType` values :func:`unroll` accepts for ``cell`` (with ``lengths`` or
    without), ``AUTO`` and ``SEQUENTIAL`` always among them."""
    scans = [ScanType.AUTO, ScanType.SEQUENTIAL]
    if isinstance(cell.recur, Recurrence) and lengths is None:
        scans.append(ScanType.FUSED)
    if isinstance(cell.recur, LinearRecurrence):
        scans.append(ScanType.ASSOCIATIVE)
    return tuple(scans)


def _chosen(scan: ScanType, cell: Cell, lengths: jax.Array | None) -> ScanType:
    """``scan``, with ``AUTO`` resolved; a ``scan`` not available for ``cell`` raises."""
    if not isinstance(scan, ScanType):
        raise ValueError(f"scan={scan!r} must be a rnn_jax.ScanType")
    available = available_scans(cell, lengths)
    if scan is ScanType.AUTO:
        if ScanType.FUSED in available:
            return ScanType.FUSED
        if ScanType.ASSOCIATIVE in available and jax.default_backend() != "cpu":
            return ScanType.ASSOCIATIVE
        return ScanType.SEQUENTIAL
    if scan not in available:
        needs = {
            ScanType.FUSED: "a cell whose recur is a rnn_jax.cells.Recurrence (simple_rnn, "
            "lstm, gru) and no lengths",
            ScanType.ASSOCIATIVE: "a cell linear in its carry, its recur a "
            "rnn_jax.LinearRecurrence (min_gru, min_lstm, lru)",
        }[scan]
        given = "" if lengths is None else " and lengths are given"
        raise ValueError(
            f"scan={scan} needs {needs}; this cell's recur is {type(cell.recur).__name__}"
            f"{given}: available here {', '.join(str(s) for s in available)}"
        )
    return scan


def prologue(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None, *, zero_start: bool = False
) -> tuple[jax.Array, Carry | None, Params]:
    """What every scan over ``cell`` starts with (:func:`unroll`, the gradient probes).

    The input half of every step (``x W + b``) for all steps at once, time-major: one matrix
    product of the transposed features, or one row gather of the transposed tokens, so no copy
    of ``xs`` is made. The initial carry (``cell.initial_carry`` when None) cast to the
    projection's dtype (the default float dtype for integer inputs that a custom ``step`` reads
    itself): zeros come out in the default float dtype, and float64 params (under
    ``jax.enable_x64(True)``) must give a float64 recursion throughout. The prepared params
    (:attr:`rnn_jax.Cell.prepare`) that ``recur`` reads.

    Args:
      cell, params, xs, carry: as for :func:`unroll`.
      zero_start: keep ``carry`` None when it is None and the cell's initial carry is all
        zeros, for a path that starts from zeros without them (``ScanType.FUSED``).

    Returns:
      ``(zs (time, batch, width), carry, prepared)``.
    """
    zs = cell.project(params, jnp.swapaxes(xs, 0, 1))
    if carry is None:
        if zero_start and _fast.zero_initial_carry(cell):
            return zs, None, cell.prepare(params)
        carry = cell.initial_carry(xs.shape[0])
    dtype = zs.dtype if jnp.issubdtype(zs.dtype, jnp.inexact) else jnp.result_type(float)
    carry = jax.tree.map(lambda c: c.astype(dtype), carry)
    return zs, carry, cell.prepare(params)


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
    scan: ScanType = ScanType.AUTO,
) -> tuple[Carry, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs`` with one ``jax.lax.scan``.

    The input half of every step (``x W + b``) is computed for all steps before the scan, as one
    matrix product (float features) or one row gather (integer tokens) (:func:`prologue`); the
    scan below runs only the recurrent half, ``cell.recur``, step by step. ``scan`` says how
    (:class:`ScanType`). By default (``AUTO``) cells whose ``recur`` is a
    :class:`rnn_jax.cells.Recurrence` (the built-in ones) take, without ``lengths``,
    :func:`rnn_jax._fast.unroll_recurrence` (``FUSED``): the same arithmetic with no product on
    a zero initial carry and the recurrent kernel's gradient formed as one matrix product over
    all steps (forward mode, ``vmap`` and higher orders still work).

    A cell whose ``recur`` is a :class:`rnn_jax.LinearRecurrence` (``h_t = a_t ⊙ h_{t-1} +
    b_t``: :func:`rnn_jax.min_gru`, :func:`rnn_jax.min_lstm`, :func:`rnn_jax.lru`) can instead
    run as one ``jax.lax.associative_scan`` (``ASSOCIATIVE``,
    :func:`rnn_jax.linear.associative_unroll`): O(log T) sequential depth, but about three
    times the arithmetic and a pass over ``(time, batch, state)`` arrays in memory at every
    level, where the scan does T multiply-adds on a carry in cache. ``AUTO`` takes it where the
    depth is what costs, on GPU and TPU (``jax.default_backend()``): their thousands of lanes
    sit idle in a step of a small recurrence, and each sequential step costs a kernel launch.
    On CPU, with a few cores that the scan's steps already keep busy, the extra work makes it
    slower (benchmarks/PARALLEL_SCAN.md: 1.8-2.5× on one core), so the sequential scan runs
    there.

    Args:
      cell: a :class:`rnn_jax.Cell`.
      params: the cell's parameters.
      xs: ``(batch, time, input_dim)`` float features or ``(batch, time)`` integer tokens.
      carry: the initial carry; zeros (``cell.initial_carry``) when None. Cast to the
        projected inputs' dtype (:func:`prologue`).
      lengths: optional ``(batch,)`` int: steps at or past ``lengths[b]`` are padding. As with
        Keras masking, the carry stays frozen there and the output is zero. With ``reverse``
        the padding is met first, so each sequence's backward pass starts at its own end.
      reverse: scan from the last step to the first (outputs stay in input order).
      return_sequences: return every step's output instead of the last one.
      unroll: ``lax.scan``'s unroll factor (``True`` unrolls fully; unused by
        ``ASSOCIATIVE``).
      scan: how to run it, a :class:`ScanType`; ``SEQUENTIAL`` is the readable reference the
        tests pin ``FUSED`` and ``ASSOCIATIVE`` to. One not available for this cell
        (:func:`available_scans`: ``FUSED`` with ``lengths`` or for a ``recur`` that is not a
        Recurrence, ``ASSOCIATIVE`` for a cell that is not linear in its carry) is a
        ValueError that names those that are.

    Returns:
      ``(final_carry, ys)``: ``ys`` is ``(batch, time, units)`` with ``return_sequences``,
      else ``(batch, units)``, the output of the last step processed (for each sequence its
      last real step: ``lengths - 1`` forwards, 0 with ``reverse``).
    """
    batch, time = xs.shape[0], xs.shape[1]
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths of shape {lengths.shape} must have shape ({batch},)")
    scan = _chosen(scan, cell, lengths)
    fused = scan is ScanType.FUSED
    zs, carry, params = prologue(cell, params, xs, carry, zero_start=fused)
    if fused:
        carry, ys = _fast.unroll_recurrence(
            cell, params, zs, carry, reverse, return_sequences, unroll
        )
        return carry, (jnp.swapaxes(ys, 0, 1) if return_sequences else ys)
    if scan is ScanType.ASSOCIATIVE:
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
