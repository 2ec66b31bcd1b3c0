"""The fast path of :func:`rnn_jax.unroll` and of the dense layers: same arithmetic, faster.

:func:`rnn_jax.unroll` runs the readable step-by-step scan of ``cell.recur``
(``ScanType.SEQUENTIAL``). For cells whose ``recur`` is a :class:`rnn_jax.cells.Recurrence` it
takes :func:`unroll_recurrence` instead (``ScanType.FUSED``; flax keeps ``OptimizedLSTMCell``
beside ``LSTMCell`` the same way), and :func:`matmul` gives every input projection and dense
head a reverse mode that XLA's CPU backend runs faster. :func:`step_from_zero` is the first
step from a zero carry, here and in the sampler. tests/test_fast.py pins them to the readable
forms, values and derivatives.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


@jax.custom_jvp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel``, differentiated so that reverse mode's ``x^T g`` is a plain product.

    XLA's fast CPU matrix-product path takes plainly laid out operands; ``x^T g`` contracts the
    leading axis of both and would take a slower one. The tangent multiplies ``dkernel`` by a
    transposed copy of ``x`` (kept from the forward pass) instead, whose transpose is ``x^T g``
    with ``x^T`` already in place.
    """
    return x @ kernel


def _matmul_jvp(primals, tangents):
    x, kernel = primals
    d_x, d_kernel = tangents
    y = x @ kernel
    terms = []
    if not isinstance(d_x, SymbolicZero):
        terms.append(d_x @ kernel)
    if not isinstance(d_kernel, SymbolicZero):
        x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
        terms.append((x_t.T @ d_kernel).reshape(y.shape))
    return y, sum(terms[1:], terms[0])


matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def zero_initial_carry(cell) -> bool:
    """Whether ``cell.initial_carry`` is all zeros, so a first step may skip ``0 @ U``."""
    with jax.ensure_compile_time_eval():
        try:
            leaves = jax.tree.leaves(cell.initial_carry(1))
            return all(not np.any(np.asarray(leaf)) for leaf in leaves)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return False


def step_from_zero(rec, zeros, zx: jax.Array, b_h: jax.Array | None = None):
    """The carry after one step of the :class:`rnn_jax.cells.Recurrence` ``rec`` from the
    all-zero carry ``zeros``, without the product ``0 @ U``: the recurrent input is the
    recurrent bias ``b_h`` (zero without one).

    Args:
      rec: the cell's ``recur``.
      zeros: the cell's initial carry, all zeros (:func:`zero_initial_carry`).
      zx: the step's projected input ``(batch, k·units)``.
      b_h: ``rec.recurrent_bias(prepared)`` ``(k·units,)``, or None when ``rec`` has none.
    """
    if b_h is None:
        return rec.gate(zeros, zx) if rec.additive else rec.gate(zeros, zx, jnp.zeros_like(zx))
    u = jnp.broadcast_to(b_h.astype(zx.dtype), zx.shape)
    return rec.gate(zeros, zx + u) if rec.additive else rec.gate(zeros, zx, u)


def unroll_recurrence(cell, params, zs, carry, reverse: bool, return_sequences: bool, unroll):
    """:func:`unroll` for a :class:`Recurrence`, time-major, without lengths.

    The arithmetic of the step-by-step scan, arranged for speed. With a zero initial carry
    (``carry`` None) the first step is :func:`step_from_zero`. Differentiation goes
    through a custom JVP: the forward scan keeps each step's gate linearisation, and the
    tangent of ``u_t = h_{t-1} U`` splits into ``dh_{t-1} U`` (inside the tangent scan) and
    ``h_{t-1} dU`` for all steps at once, so reverse mode (its transpose) forms ``dU`` as ONE
    ``(units, steps·batch) @ (steps·batch, k·units)`` product instead of one per step, while
    forward mode keeps working. Equal to the plain scan's derivatives up to float rounding
    (tests/test_fast.py).

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

    def forward(kernel, b_h, zs, carry, keep):
        """The recurrence; with ``keep``, also every ``h_{t-1}`` and each step's ``jax.vjp``."""
        start_vjp = start_y = None
        rest = zs
        if zero_start:
            zx, rest = first_and_rest(zs)
            bias = () if b_h is None else (b_h,)
            # Made here, not closed over: a custom_jvp function may not capture tracers.
            zeros = jax.tree.map(lambda c: c.astype(zs.dtype), cell.initial_carry(batch))
            start = lambda zx, *bias: step_from_zero(rec, zeros, zx, *bias)
            if keep:
                carry, start_vjp = jax.vjp(start, zx, *bias)
            else:
                carry = start(zx, *bias)
            start_y = rec.hidden(carry)

        def body(carry, zx):
            h = rec.hidden(carry)
            u = h @ kernel if b_h is None else h @ kernel + b_h[None]
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
            du = du + d_b_h[None, None]

        d_rest = d_zs
        if zero_start:
            d_zx, d_rest = first_and_rest(d_zs)
            d_bias = () if b_h is None else (jnp.zeros_like(b_h) if d_b_h is None else d_b_h,)
            d_carry = tangent_of(start_vjp)(d_zx, *d_bias)
            d_start_y = rec.hidden(d_carry)

        # A fusion barrier on the tangent carry. The elementwise ops that carry LSTM's c (GRU's
        # z * h) from step to step form a chain that, unrolled, XLA fuses into every later step
        # of reverse mode and recomputes (quadratic in time). XLA neither fuses across a
        # conditional nor removes one whose branches differ; both branches return the carry
        # (the second, x - 0 x, only runs when the kernel is not finite).
        finite = jnp.isfinite(kernel.reshape(-1)[0])

        def barrier(d_carry):
            same = lambda c: jax.tree.map(lambda x: x - 0.0 * x, c)
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
