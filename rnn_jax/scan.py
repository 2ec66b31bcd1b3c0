"""unroll: the one ``lax.scan`` that runs any cell over a sequence."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from rnn_jax.cells import Carry, Cell, Params, Recurrence, add_bias


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
) -> tuple[Carry, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs`` with one ``jax.lax.scan``.

    The input half of every step (``x W + b``) is computed for all steps before the scan, as one
    matrix product (float features) or one row gather (integer tokens); the scan runs only the
    recurrent half. The built-in cells (``recur`` a :class:`rnn_jax.cells.Recurrence`) without
    ``lengths`` take a faster arrangement of the same arithmetic: no product with a zero
    initial carry, and a custom JVP whose reverse mode forms the recurrent kernel's gradient as
    one matrix product over all steps (forward mode, ``vmap`` and higher orders still work).

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

    Returns:
      ``(final_carry, ys)``: ``ys`` is ``(batch, time, units)`` with ``return_sequences``,
      else ``(batch, units)``, the output of the last step processed (for each sequence its
      last real step: ``lengths - 1`` forwards, 0 with ``reverse``).
    """
    batch, time = xs.shape[0], xs.shape[1]
    # Time-major inside: project the transposed tokens/features so no copy of xs is made.
    zs = cell.project(params, jnp.swapaxes(xs, 0, 1))
    if lengths is None and isinstance(cell.recur, Recurrence):
        if carry is None and not zero_initial_carry(cell):
            carry = cell.initial_carry(batch)
        carry, ys = _unroll_recurrence(
            cell, params, zs, carry, reverse, return_sequences, unroll
        )
        return carry, (jnp.swapaxes(ys, 0, 1) if return_sequences else ys)
    if carry is None:
        carry = cell.initial_carry(batch)
    y0 = jnp.zeros((batch, cell.units), zs.dtype)

    if lengths is None:

        def body(state, z):
            carry, _ = state
            carry, y = cell.recur(params, carry, z)
            return (carry, y), (y if return_sequences else None)

        scanned = zs
    else:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
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



def zero_initial_carry(cell: Cell) -> bool:
    """Whether ``cell.initial_carry`` is all zeros, so a first step may skip ``0 @ U``."""
    with jax.ensure_compile_time_eval():
        try:
            leaves = jax.tree.leaves(cell.initial_carry(1))
            return all(not np.any(np.asarray(leaf)) for leaf in leaves)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return False


def _unroll_recurrence(
    cell: Cell, params, zs, carry, reverse: bool, return_sequences: bool, unroll
):
    """:func:`unroll` for a :class:`Recurrence`, time-major, without lengths.

    The arithmetic of the step-by-step scan, arranged for speed. With a zero initial carry
    (``carry`` None) the first step's product ``0 @ U`` is skipped. Differentiation goes
    through a custom JVP: the forward scan keeps each step's gate linearisation, and the
    tangent of ``u_t = h_{t-1} U`` splits into ``dh_{t-1} U`` (inside the tangent scan) and
    ``h_{t-1} dU`` for all steps at once, so reverse mode (its transpose) forms ``dU`` as ONE
    ``(units, steps·batch) @ (steps·batch, k·units)`` product instead of one per step, while
    forward mode keeps working. Equal to the plain scan's derivatives up to float rounding
    (tests/test_perf_paths.py).

    Returns ``(final carry, ys)``: ``ys (time, batch, units)`` or the last ``(batch, units)``.
    """
    rec, batch = cell.recur, zs.shape[1]
    zero_start = carry is None

    def gate_inputs(zx, u):
        # An additive gate reads zx + u: one input, so its tangent is stored once.
        return (zx + u,) if rec.additive else (zx, u)

    def first_and_rest(x):
        # The peeled first step in processing order, and the steps the scan runs. A split (not
        # two slices) transposes to one concatenation.
        if reverse:
            rest, first = jnp.split(x, [x.shape[0] - 1])
        else:
            first, rest = jnp.split(x, [1])
        return first[0], rest

    def with_first(first, rest):
        return jnp.concatenate([rest, first[None]] if reverse else [first[None], rest])

    def start_inputs(zx, b_h):
        # u = 0 @ U + b_h: no product with the zero carry.
        if b_h is None:
            return (zx,) if rec.additive else (zx, jnp.zeros_like(zx))
        return gate_inputs(zx, jnp.broadcast_to(b_h.astype(zx.dtype), zx.shape))

    def forward(kernel, b_h, zs, carry, keep):
        """The recurrence; with ``keep``, also every ``h_{t-1}`` and each step's ``jax.vjp``."""
        start_vjp = start_y = None
        rest = zs
        if zero_start:
            zx, rest = first_and_rest(zs)
            inputs = start_inputs(zx, b_h)
            # Made here, not closed over: a custom_jvp function may not capture tracers.
            zeros = jax.tree.map(lambda c: c.astype(zs.dtype), cell.initial_carry(batch))
            start = lambda *inputs: rec.gate(zeros, *inputs)  # noqa: E731
            if keep:
                carry, start_vjp = jax.vjp(start, *inputs)
            else:
                carry = start(*inputs)
            start_y = rec.hidden(carry)

        def body(carry, zx):
            h = rec.hidden(carry)
            u = h @ kernel if b_h is None else add_bias(h @ kernel, b_h)
            step_vjp = None
            if keep:
                carry, step_vjp = jax.vjp(rec.gate, carry, *gate_inputs(zx, u))
            else:
                carry = rec.gate(carry, *gate_inputs(zx, u))
            y = rec.hidden(carry) if return_sequences else None
            return carry, (y, h if keep else None, step_vjp)

        carry, (ys, hs, vjps) = jax.lax.scan(body, carry, rest, reverse=reverse, unroll=unroll)
        if not return_sequences:
            ys = rec.hidden(carry)
        elif zero_start:
            ys = with_first(start_y, ys)
        return (carry, ys), (start_vjp, hs, vjps)

    @jax.custom_jvp
    def run(kernel, b_h, zs, carry):
        return forward(kernel, b_h, zs, carry, keep=False)[0]

    def run_jvp(primals, tangents):
        kernel, b_h, zs, carry = primals
        d_kernel, d_b_h, d_zs, d_carry = tangents
        d_zs, d_carry = jax.tree.map(_instantiate, (d_zs, d_carry), (zs, carry))
        out, (start_vjp, hs, vjps) = forward(kernel, b_h, zs, carry, keep=True)
        carry_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out[0])

        def tangent_of(step_vjp):
            # The gate's JVP, as the transpose of the VJP kept by the forward scan: the gate's
            # derivatives come from the forward pass and are not computed again.
            transposed = jax.linear_transpose(step_vjp, carry_shape)
            return lambda *tangent_in: transposed(tangent_in)[0]

        if isinstance(d_b_h, SymbolicZero):
            d_b_h = None
        steps, units = hs.shape[0], hs.shape[-1]
        du = jnp.zeros((steps, batch, kernel.shape[-1]), zs.dtype)
        if not isinstance(d_kernel, SymbolicZero):
            # h_{t-1} dU for every step in one product. Multiplying by a transposed copy of
            # the hidden states makes reverse mode's dU = H^T dZ a product of plainly laid out
            # operands (XLA's fast CPU path).
            h_t = jax.lax.optimization_barrier(hs.reshape(steps * batch, units).T)
            du = (h_t.T @ d_kernel).reshape(du.shape)
        if d_b_h is not None:
            du = add_bias(du, d_b_h)

        d_rest = d_zs
        if zero_start:
            d_zx, d_rest = first_and_rest(d_zs)
            d_carry = tangent_of(start_vjp)(*start_inputs(d_zx, d_b_h))
            d_start_y = rec.hidden(d_carry)

        # A fusion barrier on the tangent carry. The elementwise ops that carry LSTM's c (GRU's
        # z * h) from step to step form a chain that, unrolled, XLA fuses into every later step
        # of reverse mode and recomputes (quadratic in time). XLA neither fuses across a
        # conditional nor removes one whose branches differ; both branches return the carry
        # (the second, x - 0 x, only runs when the kernel is not finite).
        finite = jnp.isfinite(kernel.reshape(-1)[0])

        def barrier(d_carry):
            same = lambda c: jax.tree.map(lambda x: x - 0.0 * x, c)  # noqa: E731
            return jax.lax.cond(finite, lambda c: c, same, d_carry)

        def tangent_body(d_carry, inputs):
            # inputs[-1] is d(zx + h_{t-1} U) for an additive gate, else d(h_{t-1} U).
            step_vjp, *d_in = inputs
            d_in[-1] = d_in[-1] + rec.hidden(d_carry) @ kernel
            d_carry = barrier(tangent_of(step_vjp)(d_carry, *d_in))
            return d_carry, (rec.hidden(d_carry) if return_sequences else None)

        d_in = (d_rest + du,) if rec.additive else (d_rest, du)
        d_carry, d_ys = jax.lax.scan(
            tangent_body, d_carry, (vjps, *d_in), reverse=reverse, unroll=unroll
        )
        if not return_sequences:
            d_ys = rec.hidden(d_carry)
        elif zero_start:
            d_ys = with_first(d_start_y, d_ys)
        return out, (d_carry, d_ys)

    run.defjvp(run_jvp, symbolic_zeros=True)
    b_h = None if rec.recurrent_bias is None else rec.recurrent_bias(params)
    return run(params["recurrent_kernel"], b_h, zs, carry)


def _instantiate(tangent, primal):
    return jnp.zeros_like(primal) if isinstance(tangent, SymbolicZero) else tangent
