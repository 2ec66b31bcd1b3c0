"""Recurrent cells as pure functions over Keras-layout parameter dicts, equations included."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnn_jax._fast import matmul

Params = dict[str, jax.Array]
Carry = Any
# {"gates": {name: sigmoid outputs}, "tanh": {name: tanh outputs}}, each (batch, units).
Activations = dict[str, dict[str, jax.Array]]


class Cell(NamedTuple):
    """A recurrence as pure functions, shaped like an optax ``GradientTransformation``.

    ``step(params, carry, x) == recur(prepare(params), carry, project(params, x))``: ``project``
    is the input half (``x W + b``), free of the carry, so :func:`rnn_jax.unroll` applies it to
    every time step in one matrix product (or one row gather for integer tokens) before the
    scan; ``prepare`` derives, once per sequence, what every step reads (an orthogonal kernel's
    matrix exponential, a clipped or reparametrised recurrent weight; the identity for most
    cells); ``recur`` is the sequential half that the scan runs.

    Attributes:
      init: ``(key, input_dim) -> params``, Keras names and layout.
      initial_carry: ``(batch) -> carry`` of zeros.
      step: ``(params, carry, x) -> (carry, y)``; carry first, so it drops into ``lax.scan``.
      project: ``(params, x) -> projected``; ``x`` is ``(..., input_dim)`` float features or
        ``(...)`` integer tokens, read as one-hot rows without building them (``onehot(i) @ W``
        is the row gather ``W[i]``).
      recur: ``(prepared, carry, projected) -> (carry, y)`` with ``prepared = prepare(params)``.
      units: the width of ``y``.
      activations: ``(prepared, carry, projected) -> {"gates": {...}, "tanh": {...}}``: the
        step's bounded nonlinearities by name, sigmoid gates (saturated near 0 and 1) and tanh
        units (near ±1), computed by the same code as ``recur``; what
        :func:`rnn_jax.gradients.saturation` reads. None when the cell does not say.
      prepare: ``params -> prepared``, the per-sequence part of the parameters that ``recur``
        and ``activations`` read; every tool calls it once per sequence (outside its scan).

    Write a cell of your own with :func:`custom_cell` from ``init``, ``initial_carry`` and
    ``step`` alone; every tool of the library accepts it.
    """

    init: Callable[[jax.Array, int], Params]
    initial_carry: Callable[[int], Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    project: Callable[[Params, jax.Array], jax.Array]
    recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    units: int
    activations: Callable[[Params, Carry, jax.Array], Activations] | None = None
    prepare: Callable[[Params], Params] = lambda params: params


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
        f"recurrent_init={recurrent_init!r} must be 'orthogonal', 'identity' or 'glorot_uniform'"
    )


def add_bias(z: jax.Array, bias: jax.Array) -> jax.Array:
    """``z (..., n) + bias (n,)`` with the broadcast spelled out (rank promotion stays strict)."""
    return z + bias.reshape((1,) * (z.ndim - 1) + bias.shape)


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
    ``recurrent_bias(params)`` when given) and ``(new, activations) = gate(carry, zx + u)``
    when ``additive``, else ``gate(carry, zx, u)``. The output of a step is the new hidden
    state. Knowing this shape lets :func:`rnn_jax.unroll` skip the product with a zero initial
    carry and form the recurrent kernel's gradient of all steps as one matrix product
    (:mod:`rnn_jax._fast`); a ``recur`` of any other shape (a plain function) runs step by step
    as written.

    Attributes:
      gate: ``(carry, z)`` (``additive``) or ``(carry, zx, u)`` ``-> (new carry, activations)``;
        elementwise. The activations (:data:`Activations`) are the gate's own intermediates.
      hidden: ``carry -> h (batch, units)``, the part multiplied by the recurrent kernel.
      recurrent_bias: ``params -> (k·units,)`` added to ``u``, or None.
      additive: the gate reads ``zx`` and ``u`` only through their sum.
    """

    __slots__ = ("additive", "gate_and_activations", "hidden", "recurrent_bias")

    def __init__(self, gate, hidden=lambda carry: carry, recurrent_bias=None, additive=True):
        self.gate_and_activations, self.hidden = gate, hidden
        self.recurrent_bias, self.additive = recurrent_bias, additive

    def gate(self, carry: Carry, *inputs) -> Carry:
        """The new carry alone."""
        return self.gate_and_activations(carry, *inputs)[0]

    def recurrent_input(self, params: Params, h: jax.Array) -> jax.Array:
        """``u = h @ recurrent_kernel (+ recurrent bias)``: ``(batch, k·units)``."""
        u = h @ params["recurrent_kernel"]
        return u if self.recurrent_bias is None else add_bias(u, self.recurrent_bias(params))

    def _inputs(self, params: Params, carry: Carry, zx: jax.Array):
        u = self.recurrent_input(params, self.hidden(carry))
        return (zx + u,) if self.additive else (zx, u)

    def __call__(self, params: Params, carry: Carry, zx: jax.Array):
        new = self.gate(carry, *self._inputs(params, carry, zx))
        return new, self.hidden(new)

    def activations(self, params: Params, carry: Carry, zx: jax.Array) -> Activations:
        """The step's gate and tanh activations (:attr:`Cell.activations`)."""
        return self.gate_and_activations(carry, *self._inputs(params, carry, zx))[1]


def _make_cell(init, initial_carry, project, recur, units, activations=None, prepare=None) -> Cell:
    if prepare is None:
        prepare = Cell._field_defaults["prepare"]

    def step(params, carry, x):
        return recur(prepare(params), carry, project(params, x))

    if activations is None and isinstance(recur, Recurrence):
        activations = recur.activations
    return Cell(init, initial_carry, step, project, recur, units, activations, prepare)


def custom_cell(
    init: Callable[[jax.Array, int], Params],
    initial_carry: Callable[[int], Carry],
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]],
    *,
    activations: Callable[[Params, Carry, jax.Array], Activations] | None = None,
    units: int | None = None,
) -> Cell:
    """A :class:`Cell` from three pure functions of your own; every tool accepts it.

    ``unroll``, the gradient probes, the sampler, the layers and the trainers read a cell only
    through its fields; this fills the split ones plainly: ``project`` passes ``x`` through
    (``step`` gets the raw inputs, integer tokens included) and ``recur`` is ``step``.

    Args:
      init: ``(key, input_dim) -> params``.
      initial_carry: ``(batch) -> carry`` (any pytree of ``(batch, ·)`` arrays).
      step: ``(params, carry, x) -> (carry, y)`` for a batch: ``x (batch, input_dim)`` or
        ``(batch,)`` int tokens, ``y (batch, units)``.
      activations: optional ``(params, carry, x) -> {"gates": {...}, "tanh": {...}}``, for
        :func:`rnn_jax.gradients.saturation`.
      units: the width of ``y``; by default the last axis of the carry's first leaf.

    The gradient probes (:mod:`rnn_jax.gradients`) differentiate with respect to the carry and
    read the step's output as ``carry.h`` when the carry has an ``h``, else the carry itself:
    write ``step`` so that ``y`` is that.
    """
    if units is None:
        units = jax.tree.leaves(jax.eval_shape(lambda: initial_carry(1)))[0].shape[-1]
    return Cell(init, initial_carry, step, lambda params, x: x, step, units, activations)


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
    Activations: ``tanh`` units (none for relu, which does not saturate).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {sorted(_ACTIVATIONS)}")
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

    def gate(h, z):
        h = act(z)
        return h, {"gates": {}, "tanh": {"tanh": h} if activation == "tanh" else {}}

    recur = Recurrence(gate)
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
    :mod:`rnn_jax.convert`. Carry: :class:`LSTMCarry` ``(h, c)``. Activations: gates
    ``input_gate, forget_gate, output_gate``; tanh ``candidate`` (g) and ``cell_tanh``.
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
        i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_c), jax.nn.sigmoid(z_o)
        c = f * carry.c + i * g
        cell_tanh = jnp.tanh(c)
        acts = {
            "gates": {"input_gate": i, "forget_gate": f, "output_gate": o},
            "tanh": {"candidate": g, "cell_tanh": cell_tanh},
        }
        return LSTMCarry(o * cell_tanh, c), acts

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
    Activations: gates ``update_gate`` (z) and ``reset_gate`` (r); tanh ``candidate`` (n).
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

    def update(h, z, r, n):
        acts = {"gates": {"update_gate": z, "reset_gate": r}, "tanh": {"candidate": n}}
        return z * h + (1.0 - z) * n, acts

    def gate_after(h, zx, u):
        a_z, a_r, a_h = jnp.split(zx, 3, axis=-1)
        u_z, u_r, u_h = jnp.split(u, 3, axis=-1)
        z = jax.nn.sigmoid(a_z + u_z)
        r = jax.nn.sigmoid(a_r + u_r)
        return update(h, z, r, jnp.tanh(a_h + r * u_h))

    def step_before(params, h, zx):
        # The reset multiplies h before the product with U_h: not a Recurrence (one product).
        kernel_zr = params["recurrent_kernel"][:, : 2 * units]
        kernel_h = params["recurrent_kernel"][:, 2 * units :]
        a_zr, a_h = zx[..., : 2 * units], zx[..., 2 * units :]
        z, r = jnp.split(jax.nn.sigmoid(a_zr + h @ kernel_zr), 2, axis=-1)
        return update(h, z, r, jnp.tanh(a_h + (r * h) @ kernel_h))

    def recur_before(params, h, zx):
        h, _ = step_before(params, h, zx)
        return h, h

    def activations_before(params, h, zx):
        return step_before(params, h, zx)[1]

    if reset_after:
        recur = Recurrence(gate_after, recurrent_bias=lambda p: p["bias"][1], additive=False)
        activations = None
    else:
        recur, activations = recur_before, activations_before
    initial_carry = lambda batch: jnp.zeros((batch, units))
    return _make_cell(init, initial_carry, project, recur, units, activations)


CELLS: dict[str, Callable[..., Cell]] = {"simple_rnn": simple_rnn, "lstm": lstm, "gru": gru}
