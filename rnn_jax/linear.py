"""Recurrences linear in the carry, ``h_t = a_t ⊙ h_{t-1} + b_t``: minGRU, minLSTM, LRU, and
their parallel (associative) scan."""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnn_jax.cells import (
    Activations,
    Carry,
    Cell,
    Params,
    _itself,
    _make_cell,
    _project,
    glorot_uniform,
    norm,
)

_NO_ACTIVATIONS: Activations = {"gates": {}, "tanh": {}}


class LinearRecurrence:
    """A ``recur`` linear in the carry: ``h_t = a_t ⊙ h_{t-1} + b_t``, ``y_t = readout(h_t, z_t)``.

    ``(a_t, b_t)`` come from the step's projected input ``z_t`` and the prepared params alone,
    never from the carry. So the steps compose associatively, ``(a_i, b_i) ∘ (a_j, b_j) =
    (a_j ⊙ a_i, a_j ⊙ b_i + b_j)`` for step ``i`` before ``j``, and :func:`rnn_jax.unroll` can
    run them with ``jax.lax.associative_scan`` (``scan=ScanType.ASSOCIATIVE``,
    :func:`associative_unroll`) as well as step by step; ``unroll`` recognises this class by
    ``isinstance``, as it does :class:`rnn_jax.cells.Recurrence`.

    The output of a step need not be the carry (LRU's is ``Re(h_t C) + x_t D``): ``readout``
    says what it is, and :mod:`rnn_jax.gradients` reads it through :meth:`readout` from the
    (perturbed) carry, the same function the step uses. The carry stays a pytree of real
    arrays (what the probes flatten, checkpoints store and samplers hold); ``to_state`` and
    ``to_carry`` convert it to and from the array ``h`` that the recurrence multiplies, which
    may be complex.

    Args:
      coefficients: ``(prepared, z) -> (a, b, activations)``: ``z (batch, width)`` one step's
        projected inputs (or many steps' merged into the batch), ``a`` and ``b`` of ``h``'s
        shape ``(batch, n)``, real or complex; ``activations`` the step's bounded
        nonlinearities (:data:`rnn_jax.cells.Activations`) for
        :func:`rnn_jax.gradients.saturation`, computed by the same code.
      readout: ``(prepared, carry, z) -> y (batch, units)``: the step's output from its new
        carry and its projected input; None for the carry itself.
      to_state: ``carry -> h (batch, n)``; None when the carry is ``h``.
      to_carry: ``h -> carry``, the inverse of ``to_state`` (also applied to ``h`` with a
        leading time axis); None when the carry is ``h``.
    """

    __slots__ = ("coefficients_and_activations", "output", "to_carry", "to_state")

    def __init__(
        self,
        coefficients: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array, Activations]],
        readout: Callable[[Params, Carry, jax.Array], jax.Array] | None = None,
        to_state: Callable[[Carry], jax.Array] | None = None,
        to_carry: Callable[[jax.Array], Carry] | None = None,
    ):
        self.coefficients_and_activations = coefficients
        self.output = readout
        self.to_state = _itself if to_state is None else to_state
        self.to_carry = _itself if to_carry is None else to_carry

    def coefficients(self, prepared: Params, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(a, b)`` of the step(s) whose projected inputs are ``z``."""
        a, b, _ = self.coefficients_and_activations(prepared, z)
        return a, b

    def readout(self, prepared: Params, carry: Carry, z: jax.Array) -> jax.Array:
        """The step's output ``y`` from its new ``carry`` and its projected input ``z``."""
        return carry if self.output is None else self.output(prepared, carry, z)

    def __call__(self, prepared: Params, carry: Carry, z: jax.Array) -> tuple[Carry, jax.Array]:
        a, b = self.coefficients(prepared, z)
        new = self.to_carry(a * self.to_state(carry) + b)
        return new, self.readout(prepared, new, z)

    def activations(self, prepared: Params, carry: Carry, z: jax.Array) -> Activations:
        """The step's gates (:attr:`rnn_jax.Cell.activations`); they do not read the carry."""
        del carry
        return self.coefficients_and_activations(prepared, z)[2]


def compose(earlier, later):
    """``(a_i, b_i) ∘ (a_j, b_j) = (a_j ⊙ a_i, a_j ⊙ b_i + b_j)``: step ``i`` then step ``j``.

    Applying the result to ``h`` gives ``a_j (a_i h + b_i) + b_j``; associative, so
    ``jax.lax.associative_scan`` can combine the steps in any grouping.
    """
    a_i, b_i = earlier
    a_j, b_j = later
    return a_j * a_i, a_j * b_i + b_j


def associative_unroll(
    recurrence: LinearRecurrence,
    prepared: Params,
    zs: jax.Array,
    carry: Carry,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    return_sequences: bool = False,
) -> tuple[Carry, jax.Array]:
    """:func:`rnn_jax.unroll` of a :class:`LinearRecurrence` by ``jax.lax.associative_scan``.

    Every step's ``(a_t, b_t)`` is computed at once; the initial carry is folded into the first
    step processed (``b ← a ⊙ h_0 + b``), so the ``t``-th prefix composition's ``b`` is ``h_t``:
    O(log T) depth and O(T) work, but about 2T combines of two products each and strided copies
    at every level, where the sequential scan does T multiply-adds in cache. Padding steps
    (``lengths``) get ``a = 1, b = 0``, which keeps the carry as it is, and output zero.

    Args:
      recurrence: the cell's ``recur``.
      prepared: ``cell.prepare(params)``.
      zs: ``(time, batch, width)`` projected inputs, time-major.
      carry: the initial carry.
      lengths, reverse, return_sequences: as for :func:`rnn_jax.unroll`.

    Returns:
      ``(final carry, ys)``, ``ys`` time-major ``(time, batch, units)`` with
      ``return_sequences``, else the last real step's output ``(batch, units)``.
    """
    time, batch = zs.shape[0], zs.shape[1]
    merge = lambda x: x.reshape((time * batch,) + x.shape[2:])
    split = lambda x: x.reshape((time, batch) + x.shape[1:])
    a, b = (split(x) for x in recurrence.coefficients(prepared, merge(zs)))
    if lengths is not None:
        valid = (jnp.arange(time)[:, None] < lengths[None, :])[:, :, None]  # (time, batch, 1)
        a = jnp.where(valid, a, jnp.ones((), a.dtype))
        b = jnp.where(valid, b, jnp.zeros((), b.dtype))
    first = time - 1 if reverse else 0
    b = b.at[first].add(a[first] * recurrence.to_state(carry))
    _, hs = jax.lax.associative_scan(compose, (a, b), reverse=reverse)
    final = recurrence.to_carry(hs[0] if reverse else hs[-1])

    if return_sequences:
        carries = jax.tree.map(merge, recurrence.to_carry(hs))
        ys = split(recurrence.readout(prepared, carries, merge(zs)))
        if lengths is not None:
            ys = jnp.where(valid, ys, jnp.zeros((), ys.dtype))
        return final, ys

    # Only the last real step's output: read it out from that step alone.
    if reverse:
        last = jnp.zeros((batch,), jnp.int32)
    elif lengths is None:
        last = jnp.full((batch,), time - 1)
    else:
        last = jnp.maximum(lengths - 1, 0)
    rows = jnp.arange(batch)
    y = recurrence.readout(prepared, recurrence.to_carry(hs[last, rows]), zs[last, rows])
    if lengths is not None:
        y = jnp.where((lengths > 0)[:, None], y, jnp.zeros((), y.dtype))
    return final, y


def _zeros(units):
    return lambda batch: jnp.zeros((batch, units))


def min_gru(units: int) -> Cell:
    """minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?").

    ``z_t = σ(x_t W_z + b_z)``, ``h̃_t = x_t W_h + b_h``,
    ``h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t``, output ``y_t = h_t``: a GRU whose gate and
    candidate read the input alone, so the recurrence is linear in the carry
    (:class:`LinearRecurrence` with ``a_t = 1 − z_t``, ``b_t = z_t ⊙ h̃_t``) and runs as a
    parallel scan (:func:`rnn_jax.unroll` with ``scan=ScanType.ASSOCIATIVE``).

    Params: ``kernel (input_dim, 2u)`` glorot-uniform and ``bias (2u,)`` zeros, blocks in the
    order z, h. Carry: ``h (batch, units)``. Activations: gate ``update_gate`` (z).
    The paper's log-space form passes ``h̃`` through ``g(x) = x + 0.5`` (x ≥ 0) or ``σ(x)`` to
    keep it positive for its log-sum-exp scan; ``associative_scan`` needs no logs, so ``h̃``
    here is the plain linear map of the paper's sequential form.
    """

    def init(key, input_dim):
        return {
            "kernel": glorot_uniform(key, (input_dim, 2 * units)),
            "bias": jnp.zeros((2 * units,)),
        }

    def project(params, x):
        return _project(params, x, params["bias"])

    def coefficients(_params, z):
        z_z, candidate = jnp.split(z, 2, axis=-1)
        update = jax.nn.sigmoid(z_z)
        return 1.0 - update, update * candidate, {"gates": {"update_gate": update}, "tanh": {}}

    recur = LinearRecurrence(coefficients)
    return _make_cell(init, _zeros(units), project, recur, units, _itself, recur.activations)


def min_lstm(units: int) -> Cell:
    """minLSTM (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?").

    ``f_t = σ(x_t W_f + b_f)``, ``i_t = σ(x_t W_i + b_i)``, ``h̃_t = x_t W_h + b_h``,
    ``f'_t = f_t / (f_t + i_t)``, ``i'_t = i_t / (f_t + i_t)``,
    ``h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t``, output ``y_t = h_t`` (no output gate, no ``c``):
    linear in the carry (:class:`LinearRecurrence`), so it runs as a parallel scan.

    ``f'`` is computed as ``σ(log σ(z_f) − log σ(z_i))`` (and ``i' = σ(log σ(z_i) −
    log σ(z_f))``), equal to the ratio and finite even where both gates underflow to 0.

    Params: ``kernel (input_dim, 3u)`` glorot-uniform and ``bias (3u,)`` zeros, blocks in the
    order f, i, h. Carry: ``h (batch, units)``. Activations: gates ``forget_gate`` (f) and
    ``input_gate`` (i), before normalisation.
    """

    def init(key, input_dim):
        return {
            "kernel": glorot_uniform(key, (input_dim, 3 * units)),
            "bias": jnp.zeros((3 * units,)),
        }

    def project(params, x):
        return _project(params, x, params["bias"])

    def coefficients(_params, z):
        z_f, z_i, candidate = jnp.split(z, 3, axis=-1)
        log_f, log_i = jax.nn.log_sigmoid(z_f), jax.nn.log_sigmoid(z_i)
        forget, keep_in = jax.nn.sigmoid(log_f - log_i), jax.nn.sigmoid(log_i - log_f)
        gates = {"forget_gate": jnp.exp(log_f), "input_gate": jnp.exp(log_i)}
        return forget, keep_in * candidate, {"gates": gates, "tanh": {}}

    recur = LinearRecurrence(coefficients)
    return _make_cell(init, _zeros(units), project, recur, units, _itself, recur.activations)


class LRUCarry(NamedTuple):
    """LRU state ``h = re + i·im``, its real and imaginary parts, each ``(batch, state_size)``."""

    re: jax.Array
    im: jax.Array


def _modulus(carry: LRUCarry) -> jax.Array:
    """``|h| = sqrt(re² + im²)``, elementwise: LRU's hidden state (:attr:`rnn_jax.Cell.hidden`).

    Taken like :func:`rnn_jax.cells.norm`, scaled, so that it neither overflows nor underflows.
    Applied to the per-part gradient norms ``LRUCarry(‖∂L/∂Re h_t‖, ‖∂L/∂Im h_t‖)`` it gives
    ``sqrt(‖∂L/∂Re h‖² + ‖∂L/∂Im h‖²)``, the norm over the whole complex state (as
    ``2·state_size`` reals).
    """
    return norm(jnp.stack([carry.re, carry.im], axis=-1), axis=-1)


# exp(θ) overflows float32 past θ ≈ 88. Phases beyond e^40 ≈ 2e17 rad keep no digit below 2π
# in float32 or float64 anyway, so capping θ there changes no meaningful phase.
_MAX_LOG_PHASE = 40.0


def lru_eigenvalues(nu_log: jax.Array, theta_log: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(λ, γ)`` of the LRU: ``λ = exp(−exp(ν) + i·exp(θ))`` and ``γ = sqrt(1 − |λ|²)``.

    ``|λ| = exp(−exp(ν)) < 1`` for any real ``ν``; so that rounding keeps it below 1 too,
    ``exp(ν)`` is floored at the dtype's machine epsilon (for ``ν < ln eps``, about −15.9 in
    float32, ``|λ| = exp(−eps)``, the largest modulus the dtype tells apart from 1, and ``ν``
    gets no gradient there). ``γ`` is computed as ``sqrt(−expm1(−2 exp(ν)))``, exact near
    ``|λ| = 1`` where ``1 − |λ|²`` would cancel.

    Args:
      nu_log: ``ν (state_size,)``.
      theta_log: ``θ (state_size,)``.

    Returns:
      ``λ (state_size,)`` complex and ``γ (state_size,)`` real.
    """
    eps = jnp.finfo(nu_log.dtype).eps
    decay = jnp.maximum(jnp.exp(nu_log), eps)  # −ln|λ|
    phase = jnp.exp(jnp.minimum(theta_log, _MAX_LOG_PHASE))
    lam = jnp.exp(jax.lax.complex(-decay, phase))
    gamma = jnp.sqrt(-jnp.expm1(-2.0 * decay))
    return lam, gamma


def lru(
    units: int,
    state_size: int | None = None,
    r_min: float = 0.9,
    r_max: float = 0.999,
    max_phase: float = 2 * math.pi,
) -> Cell:
    """Linear recurrent unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De 2023,
    "Resurrecting Recurrent Neural Networks for Long Sequences").

    A complex diagonal recurrence ``h_t = λ ⊙ h_{t-1} + γ ⊙ (x_t B)`` with
    ``λ = exp(−exp(ν) + i·exp(θ))`` (``|λ| < 1`` for any params) and the normalisation
    ``γ = sqrt(1 − |λ|²)``; output ``y_t = Re(h_t C) + x_t D``. ``λ`` and ``γ`` are computed
    once per sequence (:attr:`rnn_jax.Cell.prepare`, :func:`lru_eigenvalues`).

    Initialisation as the paper's: ``|λ|²`` uniform on ``[r_min², r_max²]`` (so ``λ`` is
    uniform on the area of the ring ``r_min ≤ |λ| ≤ r_max``), the phase ``exp(θ)`` uniform on
    ``(0, max_phase]``; ``B = (N(0,1) + i N(0,1)) / sqrt(2·input_dim)``,
    ``C = (N(0,1) + i N(0,1)) / sqrt(state_size)``.

    Where we differ from the paper: its ``γ`` is a trainable parameter (``gamma_log``)
    initialised to ``sqrt(1 − |λ|²)``; here it stays tied to ``λ`` (as written in the paper's
    equations). Its skip ``D`` is a vector (output width = input width); here ``D`` is a matrix
    ``(input_dim, units)``, ``N(0, 1/input_dim)``, the same output scale for unit inputs, so
    ``units`` may differ from ``input_dim``. No nonlinearity or MLP follows (the paper's block
    adds them around the LRU).

    Params: ``kernel (input_dim, 2·state_size + units)`` = ``[Re B | Im B | D]``, the input half
    as one product (or one row gather for tokens); ``nu_log (state_size,)``, ``theta_log
    (state_size,)``; ``output_kernel (2·state_size, units)`` = ``[Re C; Im C]`` (rows), so
    ``Re(h C) = Re h · Re C − Im h · Im C``. Carry: :class:`LRUCarry` ``(re, im)``, real, each
    ``(batch, state_size)``; its hidden state (:attr:`rnn_jax.Cell.hidden`) the modulus ``|h|``
    ``(batch, state_size)``. Activations: none (nothing saturates).

    Args:
      units: the width of ``y``.
      state_size: ``N``, the number of complex state units; ``units`` when None.
      r_min, r_max: the ring of initial moduli, ``0 ≤ r_min < r_max ≤ 1``.
      max_phase: the largest initial phase, ``> 0`` (the paper's default 2π; π/10 for its
        long-range tasks).
    """
    state_size = units if state_size is None else state_size
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"r_min={r_min}, r_max={r_max} must satisfy 0 <= r_min < r_max <= 1")
    if not max_phase > 0.0:
        raise ValueError(f"max_phase={max_phase} must be > 0")
    n = state_size

    def init(key, input_dim):
        k_r, k_p, k_b, k_c, k_d = jax.random.split(key, 5)
        u_r = jax.random.uniform(k_r, (n,))
        u_p = 1.0 - jax.random.uniform(k_p, (n,))  # in (0, 1]: no phase of exactly 0 (θ = −∞)
        modulus_sq = u_r * (r_max**2 - r_min**2) + r_min**2
        b = jax.random.normal(k_b, (input_dim, 2 * n)) / math.sqrt(2 * input_dim)
        d = jax.random.normal(k_d, (input_dim, units)) / math.sqrt(input_dim)
        return {
            "kernel": jnp.concatenate([b, d], axis=-1),
            "nu_log": jnp.log(-0.5 * jnp.log(modulus_sq)),
            "theta_log": jnp.log(max_phase * u_p),
            "output_kernel": jax.random.normal(k_c, (2 * n, units)) / math.sqrt(n),
        }

    def project(params, x):
        return _project(params, x, None)

    def prepare(params):
        lam, gamma = lru_eigenvalues(params["nu_log"], params["theta_log"])
        return {"lambda": lam, "gamma": gamma, "output_kernel": params["output_kernel"]}

    def coefficients(prepared, z):
        bx = jax.lax.complex(z[..., :n], z[..., n : 2 * n])
        gamma = jnp.broadcast_to(prepared["gamma"], bx.shape)
        return jnp.broadcast_to(prepared["lambda"], bx.shape), gamma * bx, _NO_ACTIVATIONS

    def readout(prepared, carry, z):
        c_re, c_im = jnp.split(prepared["output_kernel"], 2, axis=0)
        return carry.re @ c_re - carry.im @ c_im + z[..., 2 * n :]

    recur = LinearRecurrence(
        coefficients,
        readout,
        to_state=lambda carry: jax.lax.complex(carry.re, carry.im),
        to_carry=lambda h: LRUCarry(jnp.real(h), jnp.imag(h)),
    )

    def initial_carry(batch):
        return LRUCarry(jnp.zeros((batch, n)), jnp.zeros((batch, n)))

    return _make_cell(
        init, initial_carry, project, recur, units, _modulus, recur.activations, prepare
    )
