"""Recurrent cells as pure functions over Keras-layout parameter dicts."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Params = dict[str, jax.Array]
Carry = Any


class Cell(NamedTuple):
    """A recurrence as pure functions, shaped like an optax ``GradientTransformation``.

    ``step(params, carry, x) == recur(params, carry, project(params, x))``: ``project`` is the
    input half (``x W + b``), free of the carry, so :func:`rnn_jax.unroll` applies it to every
    time step in one matrix product (or one row gather for integer tokens) before the scan, and
    ``recur`` is the sequential half that the scan runs.

    Attributes:
      init: ``(key, input_dim) -> params``, Keras names and layout.
      initial_carry: ``(batch) -> carry`` of zeros.
      step: ``(params, carry, x) -> (carry, y)``; carry first, so it drops into ``lax.scan``.
      project: ``(params, x) -> projected``; ``x`` is ``(..., input_dim)`` float features or
        ``(...)`` integer tokens, read as one-hot rows without building them (``onehot(i) @ W``
        is the row gather ``W[i]``).
      recur: ``(params, carry, projected) -> (carry, y)``.
      units: the width of ``y`` and of each carry component.
    """

    init: Callable[[jax.Array, int], Params]
    initial_carry: Callable[[int], Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    project: Callable[[Params, jax.Array], jax.Array]
    recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    units: int


class LSTMCarry(NamedTuple):
    """LSTM state: hidden ``h`` and cell ``c``, each ``(batch, units)``."""

    h: jax.Array
    c: jax.Array


def glorot_uniform(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Keras ``GlorotUniform``: U(-l, l) with ``l = sqrt(6 / (fan_in + fan_out))``."""
    limit = jnp.sqrt(6.0 / (shape[0] + shape[1]))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def orthogonal(key: jax.Array, shape: tuple[int, int], gain: float = 1.0, dtype=jnp.float32):
    """Keras ``Orthogonal``: ``gain`` times a (semi-)orthogonal matrix (QR of a Gaussian)."""
    return jax.nn.initializers.orthogonal(scale=gain)(key, shape, dtype)


def identity(shape: tuple[int, int], gain: float = 1.0, dtype=jnp.float32) -> jax.Array:
    """``gain`` times the identity, tiled over the gate blocks (IRNN, Le et al. 2015)."""
    units, width = shape
    return gain * jnp.tile(jnp.eye(units, dtype=dtype), (1, width // units))


def _recurrent_kernel(key, units, blocks, recurrent_init, gain):
    shape = (units, blocks * units)
    if recurrent_init == "orthogonal":
        return orthogonal(key, shape, gain)
    if recurrent_init == "identity":
        return identity(shape, gain)
    if recurrent_init == "glorot_uniform":
        return gain * glorot_uniform(key, shape)
    raise ValueError(
        f"recurrent_init must be 'orthogonal', 'identity' or 'glorot_uniform', got {recurrent_init!r}"
    )


def add_bias(z: jax.Array, bias: jax.Array) -> jax.Array:
    """``z (..., n) + bias (n,)`` with the broadcast spelled out (rank promotion stays strict)."""
    return z + bias.reshape((1,) * (z.ndim - 1) + bias.shape)


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


def _project(params: Params, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    kernel = params["kernel"]
    z = _rows(kernel, x) if jnp.issubdtype(x.dtype, jnp.integer) else matmul(x, kernel)
    return z if bias is None else add_bias(z, bias)


def _rows(kernel: jax.Array, tokens: jax.Array) -> jax.Array:
    """``kernel[tokens]``, NumPy-style: negative tokens count from the end, others out of range
    give NaN rows (``jnp.take``'s fill mode). Written as an in-range gather from the kernel with
    one NaN row appended: XLA on CPU fuses fill mode's per-element select into the consumer
    and loses vectorisation there (measured 3x slower in the sampler's GRU step)."""
    vocab = kernel.shape[0]
    tokens = jnp.where(tokens < 0, tokens + vocab, tokens)
    tokens = jnp.where((tokens >= 0) & (tokens < vocab), tokens, vocab)
    table = jnp.concatenate([kernel, jnp.full((1, kernel.shape[1]), jnp.nan, kernel.dtype)])
    return jnp.take(table, tokens, axis=0, mode="clip")


class Recurrence:
    """A ``recur`` whose carry meets the recurrent kernel in one matrix product, then a gate.

    ``recur(params, carry, zx) -> (new, hidden(new))`` with ``u = hidden(carry) @ U`` (plus
    ``recurrent_bias(params)`` when given) and ``new = gate(carry, zx + u)`` when ``additive``,
    else ``new = gate(carry, zx, u)``. The output of a step is the new hidden state. Knowing
    this shape lets :func:`rnn_jax.unroll` skip the product with a zero initial carry and form
    the recurrent kernel's gradient of all steps as one matrix product; a ``recur`` of any
    other shape (a plain function) runs step by step as written.

    Attributes:
      gate: ``(carry, z) -> carry`` (``additive``) or ``(carry, zx, u) -> carry``; elementwise.
      hidden: ``carry -> h (batch, units)``, the part multiplied by the recurrent kernel.
      recurrent_bias: ``params -> (k·units,)`` added to ``u``, or None.
      additive: the gate reads ``zx`` and ``u`` only through their sum.
    """

    __slots__ = ("gate", "hidden", "recurrent_bias", "additive")

    def __init__(self, gate, hidden=lambda carry: carry, recurrent_bias=None, additive=True):
        self.gate, self.hidden = gate, hidden
        self.recurrent_bias, self.additive = recurrent_bias, additive

    def recurrent_input(self, params: Params, h: jax.Array) -> jax.Array:
        """``u = h @ recurrent_kernel (+ recurrent bias)``: ``(batch, k·units)``."""
        u = h @ params["recurrent_kernel"]
        return u if self.recurrent_bias is None else add_bias(u, self.recurrent_bias(params))

    def __call__(self, params: Params, carry: Carry, zx: jax.Array):
        u = self.recurrent_input(params, self.hidden(carry))
        new = self.gate(carry, zx + u) if self.additive else self.gate(carry, zx, u)
        return new, self.hidden(new)


def _make_cell(init, initial_carry, project, recur, units) -> Cell:
    def step(params, carry, x):
        return recur(params, carry, project(params, x))

    return Cell(init, initial_carry, step, project, recur, units)


_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def simple_rnn(
    units: int,
    activation: str = "tanh",
    recurrent_init: str = "orthogonal",
    recurrent_gain: float = 1.0,
) -> Cell:
    """Elman recurrence ``h_t = act(x_t W + h_{t-1} U + b)`` (Keras ``SimpleRNN``).

    Params: ``kernel (input_dim, units)`` glorot-uniform, ``recurrent_kernel (units, units)``
    orthogonal times ``recurrent_gain`` (or ``identity`` for the IRNN of Le et al. 2015, used
    with ``activation="relu"``), ``bias (units,)`` zeros. Carry: ``h (batch, units)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    act = _ACTIVATIONS[activation]

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        return {
            "kernel": glorot_uniform(k_w, (input_dim, units)),
            "recurrent_kernel": _recurrent_kernel(k_u, units, 1, recurrent_init, recurrent_gain),
            "bias": jnp.zeros((units,)),
        }

    def project(params, x):
        return _project(params, x, params["bias"])

    recur = Recurrence(lambda h, z: act(z))
    return _make_cell(init, lambda batch: jnp.zeros((batch, units)), project, recur, units)


def lstm(
    units: int,
    forget_bias: float = 1.0,
    recurrent_init: str = "orthogonal",
    recurrent_gain: float = 1.0,
) -> Cell:
    """Long short-term memory (Keras ``LSTM``), gate blocks in the order i, f, c, o.

    ``z = x_t W + h_{t-1} U + b``; ``i, f, o = σ(z_i), σ(z_f), σ(z_o)``; ``g = tanh(z_c)``;
    ``c_t = f ⊙ c_{t-1} + i ⊙ g``; ``h_t = o ⊙ tanh(c_t)``.

    Params: ``kernel (input_dim, 4u)``, ``recurrent_kernel (u, 4u)``, ``bias (4u,)`` with the
    forget block set to ``forget_bias`` (Keras ``unit_forget_bias=True`` is 1; Jozefowicz et al.
    2015). PyTorch orders its blocks i, f, g, o too but keeps two biases; see
    :mod:`rnn_jax.convert`. Carry: :class:`LSTMCarry` ``(h, c)``.
    """

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        bias = jnp.zeros((4 * units,)).at[units : 2 * units].set(forget_bias)
        return {
            "kernel": glorot_uniform(k_w, (input_dim, 4 * units)),
            "recurrent_kernel": _recurrent_kernel(k_u, units, 4, recurrent_init, recurrent_gain),
            "bias": bias,
        }

    def project(params, x):
        return _project(params, x, params["bias"])

    def gate(carry, z):
        z_i, z_f, z_c, z_o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(z_f) * carry.c + jax.nn.sigmoid(z_i) * jnp.tanh(z_c)
        return LSTMCarry(jax.nn.sigmoid(z_o) * jnp.tanh(c), c)

    recur = Recurrence(gate, hidden=lambda carry: carry.h)

    def initial_carry(batch):
        return LSTMCarry(jnp.zeros((batch, units)), jnp.zeros((batch, units)))

    return _make_cell(init, initial_carry, project, recur, units)


def gru(
    units: int,
    reset_after: bool = True,
    recurrent_init: str = "orthogonal",
    recurrent_gain: float = 1.0,
) -> Cell:
    """Gated recurrent unit (Keras ``GRU``), gate blocks in the order z, r, h.

    ``reset_after=True`` (Keras 3 default; cuDNN, PyTorch and Flax's ``GRUCell`` use this form):
    ``a = x_t W + b_x``, ``u = h_{t-1} U + b_h``, ``z = σ(a_z + u_z)``, ``r = σ(a_r + u_r)``,
    ``n = tanh(a_h + r ⊙ u_h)``, ``h_t = z ⊙ h_{t-1} + (1 - z) ⊙ n``; ``bias`` is ``(2, 3u)``
    with rows ``b_x`` and ``b_h``.

    ``reset_after=False`` (Cho et al. 2014): one ``bias (3u,)`` and the reset applied before the
    product, ``n = tanh(a_h + (r ⊙ h_{t-1}) U_h)``.

    PyTorch orders its blocks r, z, n; see :mod:`rnn_jax.convert`. Carry: ``h (batch, units)``.
    """

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        return {
            "kernel": glorot_uniform(k_w, (input_dim, 3 * units)),
            "recurrent_kernel": _recurrent_kernel(k_u, units, 3, recurrent_init, recurrent_gain),
            "bias": jnp.zeros((2, 3 * units) if reset_after else (3 * units,)),
        }

    def project(params, x):
        bias = params["bias"][0] if reset_after else params["bias"]
        return _project(params, x, bias)

    def gate_after(h, zx, u):
        a_z, a_r, a_h = jnp.split(zx, 3, axis=-1)
        u_z, u_r, u_h = jnp.split(u, 3, axis=-1)
        z = jax.nn.sigmoid(a_z + u_z)
        r = jax.nn.sigmoid(a_r + u_r)
        n = jnp.tanh(a_h + r * u_h)
        return z * h + (1.0 - z) * n

    recur_after = Recurrence(gate_after, recurrent_bias=lambda p: p["bias"][1], additive=False)

    def recur_before(params, h, zx):
        kernel_zr = params["recurrent_kernel"][:, : 2 * units]
        kernel_h = params["recurrent_kernel"][:, 2 * units :]
        a_zr, a_h = zx[..., : 2 * units], zx[..., 2 * units :]
        z, r = jnp.split(jax.nn.sigmoid(a_zr + h @ kernel_zr), 2, axis=-1)
        n = jnp.tanh(a_h + (r * h) @ kernel_h)
        h = z * h + (1.0 - z) * n
        return h, h

    recur = recur_after if reset_after else recur_before
    return _make_cell(init, lambda batch: jnp.zeros((batch, units)), project, recur, units)


CELLS: dict[str, Callable[..., Cell]] = {"simple_rnn": simple_rnn, "lstm": lstm, "gru": gru}
