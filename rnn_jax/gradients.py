"""BPTT probes: per-step gradient norms, step Jacobians and their products, gate saturation.

A probe reads a step's output ``y_t`` from the step's new carry (the one it perturbs) and its
projected input: through ``cell.recur.readout(prepared, carry, z)`` for a
:class:`rnn_jax.LinearRecurrence` (LRU's ``y_t = Re(h_t C) + x_t D``; the carry itself for
minGRU and minLSTM), else as ``cell.hidden(carry)`` (:attr:`rnn_jax.Cell.hidden`), the hidden
state each cell names.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rnn_jax.cells import Carry, Cell, Params, norm
from rnn_jax.linear import LinearRecurrence
from rnn_jax.scan import prologue

# loss_fn(ys) -> per-example losses (batch,) or a scalar; ys is (batch, units) (the last output)
# or (batch, time, units) (every output, with return_sequences=True).
OutputLoss = Callable[[jax.Array], jax.Array]


def _readout(cell: Cell) -> Callable[[Params, Carry, jax.Array], jax.Array]:
    """``(prepared, carry, z) -> y``: a step's output from its new carry and projected input."""
    if isinstance(cell.recur, LinearRecurrence):
        return cell.recur.readout
    return lambda params, carry, z: cell.hidden(carry)


def global_norm(tree) -> jax.Array:
    """``sqrt(Σ x²)`` over every leaf of ``tree``, without overflow or underflow.

    Squared directly, a float32 entry above ~1.8e19 overflows to inf (a gain-3 SimpleRNN's
    gradient over 200 steps has entries near 1e25) and one below ~1e-19 flushes to 0. Each
    leaf's :func:`norm` is scaled by its largest magnitude, then the norm of those norms is
    taken the same way: exact up to rounding for any finite entries. A NaN or inf entry gives a
    non-finite norm.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(())
    dtype = jnp.result_type(*leaves)
    per_leaf = [norm(jnp.ravel(x).astype(dtype), axis=0) for x in leaves]
    return norm(jnp.stack(per_leaf), axis=0)


def _carries(cell: Cell, params: Params, zs: jax.Array, carry: Carry):
    """Every step's incoming carry ``h_{t-1}``, time-major: a pytree of ``(time, batch, ·)``."""

    def body(carry, z):
        new, _ = cell.recur(params, carry, z)
        return new, carry

    _, before = jax.lax.scan(body, carry, zs)
    return before


def carry_gradients(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    loss_fn: OutputLoss,
    carry: Carry | None = None,
    *,
    return_sequences: bool = False,
) -> tuple[jax.Array, Carry]:
    """``∂L/∂h_t`` for every step ``t`` in one backward pass.

    A zero perturbation ``δ_t`` is added to the carry after every step, ``h_t ← h_t + δ_t``,
    and ``L`` is differentiated with respect to the stacked ``δ``: ``∂L/∂δ_t = ∂L/∂h_t``, the
    total derivative through every later step (and through ``y_t`` when the loss reads every
    output). The output ``y_t`` is read from the perturbed carry (and the step's projected
    input) as the module docstring says: ``cell.hidden`` of the carry for the cells of
    :mod:`rnn_jax.cells`, ``cell.recur.readout`` for a :class:`rnn_jax.LinearRecurrence`.

    Args:
      cell: a :class:`rnn_jax.Cell`.
      params: the cell's parameters (float32, or float64 under ``jax.enable_x64(True)``).
      xs: ``(batch, time, input_dim)`` float features or ``(batch, time)`` integer tokens.
      loss_fn: ``ys -> losses``: per-example losses ``(batch,)`` (their sum is differentiated,
        so each example's gradient is its own loss's) or a scalar. ``ys`` is the last output
        ``(batch, units)``, or every output ``(batch, time, units)`` with ``return_sequences``.
        Close over a head's params and the targets.
      carry: the initial carry; zeros when None.
      return_sequences: pass every output to ``loss_fn`` instead of the last one.

    Returns:
      ``(loss, grads)``: ``loss`` is what ``loss_fn`` returned, ``grads`` a carry-shaped pytree
      of ``(batch, time, units)`` arrays: ``grads[:, t] = ∂L/∂h_t`` where ``h_t`` is the carry
      after reading ``xs[:, t]`` (for LSTM, :class:`LSTMCarry` of ``∂L/∂h_t`` and ``∂L/∂c_t``;
      for LRU, :class:`rnn_jax.LRUCarry` of the real and imaginary parts).
    """
    zs, carry, params = prologue(cell, params, xs, carry)
    time = zs.shape[0]
    readout = _readout(cell)
    deltas = jax.tree.map(lambda c: jnp.zeros((time,) + c.shape, c.dtype), carry)

    def objective(deltas):
        def body(carry, inputs):
            z, delta = inputs
            carry, _ = cell.recur(params, carry, z)
            carry = jax.tree.map(jnp.add, carry, delta)
            return carry, (readout(params, carry, z) if return_sequences else None)

        final, hs = jax.lax.scan(body, carry, (zs, deltas))
        ys = jnp.swapaxes(hs, 0, 1) if return_sequences else readout(params, final, zs[-1])
        losses = loss_fn(ys)
        return jnp.sum(losses), losses

    grads, losses = jax.grad(objective, has_aux=True)(deltas)
    return losses, jax.tree.map(lambda g: jnp.swapaxes(g, 0, 1), grads)


def carry_gradient_norms(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    loss_fn: OutputLoss,
    carry: Carry | None = None,
    *,
    return_sequences: bool = False,
) -> tuple[jax.Array, Carry]:
    """Per-step gradient norms ``‖∂L/∂h_t‖`` (and ``‖∂L/∂c_t‖`` for LSTM), one backward pass.

    Same arguments as :func:`carry_gradients`. Returns ``(loss, norms)`` with ``norms`` a
    carry-shaped pytree of ``(batch, time)`` Euclidean norms over the units, per example;
    ``cell.hidden(norms)`` is ``‖∂L/∂h_t‖`` (for LSTM ``norms.h``, ``norms.c`` being
    ``‖∂L/∂c_t‖``; for LRU the norm over the whole complex state). Vanishing gradients show as
    ``norms[:, 0] / norms[:, -1] → 0`` as ``time`` grows.
    """
    loss, grads = carry_gradients(
        cell, params, xs, loss_fn, carry, return_sequences=return_sequences
    )
    return loss, jax.tree.map(norm, grads)


def _flat_step(cell: Cell, params: Params, carry_row: Carry, z: jax.Array):
    """Jacobian of one example's flattened carry update, ``(n, n)`` with ``n`` the carry size."""
    flat, unravel = ravel_pytree(carry_row)

    def step(vec):
        # Cells are written for a batch: run a batch of one.
        batched = jax.tree.map(lambda c: c[None], unravel(vec))
        new, _ = cell.recur(params, batched, z[None])
        return ravel_pytree(jax.tree.map(lambda c: c[0], new))[0]

    return jax.jacfwd(step)(flat)


def _jacobian_rows(cell: Cell, params: Params, before: Carry, zs: jax.Array) -> jax.Array:
    """Jacobians for a batch of rows: ``before`` carries ``(rows, ·)``, ``zs (rows, k·u)``."""
    return jax.vmap(lambda c, z: _flat_step(cell, params, c, z))(before, zs)


def step_jacobians(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = None
) -> jax.Array:
    """Every step's Jacobian ``J_t = ∂h_t/∂h_{t-1}``, with respect to the whole carry.

    The carry is flattened per example in :func:`jax.flatten_util.ravel_pytree` order: ``h``
    then ``c`` for :class:`LSTMCarry` (``n = 2·units``), ``h`` alone otherwise (``n = units``).
    Memory grows as ``batch·time·n²``; for long sequences use :func:`jacobian_norms`, which
    never holds more than one step's Jacobians.

    Args:
      cell, params, xs, carry: as for :func:`carry_gradients`.

    Returns:
      ``(batch, time, n, n)``: ``J[b, t, i, j] = ∂h_t[i]/∂h_{t-1}[j]`` (``h_{-1}`` the initial
      carry), forward-mode (``jax.jacfwd``).
    """
    zs, carry, params = prologue(cell, params, xs, carry)
    before = _carries(cell, params, zs, carry)
    jac = jax.vmap(lambda c, z: _jacobian_rows(cell, params, c, z))(before, zs)
    return jnp.swapaxes(jac, 0, 1)


def _spectral_norm(m: jax.Array) -> jax.Array:
    return jnp.linalg.svd(m, compute_uv=False)[..., 0]


def jacobian_norms(
    cell: Cell,
    params: Params,
    xs: jax.Array,
    carry: Carry | None = None,
    *,
    spectrum: bool = False,
) -> dict[str, jax.Array]:
    """Largest singular values of ``J_t`` and of the products ``J_{T-1} ⋯ J_{t+1}``.

    ``‖∂h_{T-1}/∂h_t‖₂ = ‖J_{T-1} ⋯ J_{t+1}‖₂`` bounds how much of a gradient at the last step
    reaches step ``t`` (Pascanu, Mikolov & Bengio 2013): ``‖∂L/∂h_t‖ ≤ ‖∂L/∂h_{T-1}‖ ·
    ‖J_{T-1} ⋯ J_{t+1}‖₂`` for a loss on the last output. The product is accumulated in one
    reverse scan, one step's Jacobians at a time, renormalised at every step and kept as a
    log-norm, so it neither overflows nor underflows at long ``T``.

    Args:
      cell, params, xs, carry: as for :func:`carry_gradients`.
      spectrum: also return every singular value of every ``J_t``.

    Returns:
      ``{"step_norm": (batch, time) ‖J_t‖₂, "log_product_norm": (batch, time)
      ln ‖J_{T-1} ⋯ J_{t+1}‖₂`` (0 at ``t = T-1``, where the product is empty; ``-inf`` once it
      is exactly zero), and with ``spectrum`` ``"singular_values": (batch, time, n)``,
      descending ``}``.
    """
    zs, carry, params = prologue(cell, params, xs, carry)
    before = _carries(cell, params, zs, carry)
    batch = zs.shape[1]
    n = ravel_pytree(jax.tree.map(lambda c: c[0], carry))[0].shape[0]
    dtype = jax.tree.leaves(carry)[0].dtype
    eye = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (batch, n, n))
    tiny = jnp.finfo(dtype).tiny

    def body(state, inputs):
        unit, log_norm = state  # unit = P_t / ‖P_t‖, P_t = ∂h_{T-1}/∂h_t
        c, z = inputs
        jac = _jacobian_rows(cell, params, c, z)  # (batch, n, n)
        singular = jnp.linalg.svd(jac, compute_uv=False) if spectrum else None
        step_norm = singular[:, 0] if spectrum else _spectral_norm(jac)
        prod = unit @ jac  # P_{t-1} = P_t J_t, up to the scale in log_norm
        scale = _spectral_norm(prod)
        new = (prod / jnp.maximum(scale, tiny)[:, None, None], log_norm + jnp.log(scale))
        return new, (log_norm, step_norm, singular)

    init = (eye, jnp.zeros((batch,), dtype))
    _, (log_norm, step_norm, singular) = jax.lax.scan(body, init, (before, zs), reverse=True)
    out = {"step_norm": step_norm.T, "log_product_norm": log_norm.T}
    if spectrum:
        out["singular_values"] = jnp.swapaxes(singular, 0, 1)
    return out


def saturation(
    cell: Cell, params: Params, xs: jax.Array, carry: Carry | None = None, *, margin: float = 0.1
) -> dict[str, jax.Array]:
    """Fraction of saturated units at every step: gates near 0 or 1, tanh units near ±1.

    A gate (sigmoid) counts as saturated below ``margin`` or above ``1 - margin``, a tanh unit
    when ``|tanh| > 1 - margin`` (with ``margin = 0.1``, the 0.1/0.9 thresholds of Karpathy,
    Johnson & Fei-Fei 2015). Saturated units pass almost no gradient: ``σ' = σ(1-σ) < 0.09``,
    ``tanh' < 0.19``.

    The cell says what saturates: ``cell.activations`` returns the step's gates and tanh units
    by name, from the code that computes the step (any cell that provides it, yours included;
    see :func:`rnn_jax.custom_cell`).

    Args:
      cell, params, xs, carry: as for :func:`carry_gradients`.
      margin: distance from the bound that counts as saturated.

    Returns:
      ``{name: (batch, time)}`` fraction of the units saturated, per example and step: one
      entry per activation the cell names (e.g. LSTM ``input_gate, forget_gate, output_gate,
      candidate, cell_tanh``), plus ``gates`` (all sigmoid units together) when the cell has
      gates and ``tanh_units`` (all tanh units together) when it has tanh units.

    Raises:
      ValueError: the cell does not expose its activations.
    """
    if cell.activations is None:
        raise ValueError(
            "cell.activations is None: this cell does not say which units saturate; build it "
            "with rnn_jax.custom_cell(..., activations=...)"
        )
    zs, carry, params = prologue(cell, params, xs, carry)

    def fractions(acts: dict[str, jax.Array], saturated) -> tuple[dict, list]:
        flags = {name: saturated(a) for name, a in acts.items()}
        return {name: jnp.mean(f, axis=-1) for name, f in flags.items()}, list(flags.values())

    def body(carry, z):
        acts = cell.activations(params, carry, z)
        gates, gate_flags = fractions(acts["gates"], lambda a: (a < margin) | (a > 1.0 - margin))
        tanhs, tanh_flags = fractions(acts["tanh"], lambda a: jnp.abs(a) > 1.0 - margin)
        stats = {**gates, **tanhs}
        if gate_flags:
            stats["gates"] = jnp.mean(jnp.concatenate(gate_flags, axis=-1), axis=-1)
        if tanh_flags:
            stats["tanh_units"] = jnp.mean(jnp.concatenate(tanh_flags, axis=-1), axis=-1)
        carry, _ = cell.recur(params, carry, z)
        return carry, stats

    _, stats = jax.lax.scan(body, carry, zs)
    dtype = jax.tree.leaves(carry)[0].dtype
    return {name: s.T.astype(dtype) for name, s in stats.items()}
