"""Recurrent cells as pure functions over Keras-layout parameter dicts, equations included."""

import math
import numbers
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
      hidden: ``carry -> h``, the hidden state: the real array ``(batch, ·)`` of the carry that
        is each step's output, ``y_t = hidden(carry_t)``, as the gradient probes
        (:mod:`rnn_jax.gradients`) and the sampler's first step read it. The carry itself for
        one-array carries, ``carry.h`` for :class:`LSTMCarry`; for LRU the modulus ``|h|`` of
        its complex state (a :class:`rnn_jax.LinearRecurrence` with a ``readout`` computes its
        output itself, and the probes read that). Applied to a carry-shaped pytree of per-part
        norms (:func:`rnn_jax.carry_gradient_norms`) it gives the norm over ``h``.
      activations: ``(prepared, carry, projected) -> {"gates": {...}, "tanh": {...}}``: the
        step's bounded nonlinearities by name, sigmoid gates (saturated near 0 and 1) and tanh
        units (near ±1), computed by the same code as ``recur``; what
        :func:`rnn_jax.gradients.saturation` reads. None when the cell does not say.
      prepare: ``params -> prepared``, the per-sequence part of the parameters that ``recur``
        and ``activations`` read; every tool calls it once per sequence (outside its scan).

    Write a cell of your own with :func:`custom_cell` from ``init``, ``initial_carry`` and
    ``step`` alone (and ``hidden`` when the carry has several parts); every tool of the library
    accepts it.
    """

    init: Callable[[jax.Array, int], Params]
    initial_carry: Callable[[int], Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    project: Callable[[Params, jax.Array], jax.Array]
    recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    units: int
    hidden: Callable[[Carry], jax.Array]
    activations: Callable[[Params, Carry, jax.Array], Activations] | None = None
    prepare: Callable[[Params], Params] = lambda params: params


class LSTMCarry(NamedTuple):
    """LSTM state: hidden ``h`` and cell ``c``, each ``(batch, units)``."""

    h: jax.Array
    c: jax.Array


def _itself(carry: Carry) -> Carry:
    return carry


def _lstm_hidden(carry: LSTMCarry) -> jax.Array:
    return carry.h


def norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean norm along ``axis``, scaled so that squares of tiny entries do not underflow.

    A float32 gradient of 1e-20 has squares below the smallest normal float (XLA on CPU flushes
    those to zero), so ``jnp.linalg.norm`` would report 0 for a gradient that is not.
    """
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.squeeze(scale, axis) * jnp.sqrt(jnp.sum(jnp.square(x / safe), axis=axis))


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
      hidden: ``carry -> h (batch, units)``, the part multiplied by the recurrent kernel (the
        cell's :attr:`Cell.hidden`).
      recurrent_bias: ``params -> (k·units,)`` added to ``u``, or None.
      additive: the gate reads ``zx`` and ``u`` only through their sum.
    """

    __slots__ = ("additive", "gate_and_activations", "hidden", "recurrent_bias")

    def __init__(self, gate, hidden=_itself, recurrent_bias=None, additive=True):
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


def _make_cell(
    init, initial_carry, project, recur, units, hidden, activations=None, prepare=None
) -> Cell:
    if prepare is None:
        prepare = Cell._field_defaults["prepare"]

    def step(params, carry, x):
        return recur(prepare(params), carry, project(params, x))

    if activations is None and isinstance(recur, Recurrence):
        activations = recur.activations
    return Cell(init, initial_carry, step, project, recur, units, hidden, activations, prepare)


def custom_cell(
    init: Callable[[jax.Array, int], Params],
    initial_carry: Callable[[int], Carry],
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]],
    *,
    hidden: Callable[[Carry], jax.Array] | None = None,
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
      hidden: ``carry -> h (batch, units)``, the hidden state (:attr:`Cell.hidden`); write
        ``step`` so that ``y = hidden(new carry)``: the gradient probes differentiate with
        respect to the carry and read each step's output through ``hidden``. Optional when the
        carry is one array (then ``h`` is the carry), required when it has several parts.
      activations: optional ``(params, carry, x) -> {"gates": {...}, "tanh": {...}}``, for
        :func:`rnn_jax.gradients.saturation`.
      units: the width of ``y``; by default the last axis of ``hidden`` of the carry.

    Raises:
      ValueError: the carry is not one array (a tuple, NamedTuple, dict) and ``hidden`` is
        not given: which part is the hidden state is not guessed.
    """
    carry = jax.eval_shape(lambda: initial_carry(1))
    if hidden is None:
        if not isinstance(carry, jax.ShapeDtypeStruct):
            raise ValueError(
                f"custom_cell: the carry is a {type(carry).__name__}, not one array, so which "
                "part is the hidden state must be said: pass hidden=, a function carry -> "
                "(batch, units) array (the part each step outputs)"
            )
        hidden = _itself
    if units is None:
        units = jax.eval_shape(hidden, carry).shape[-1]
    return Cell(init, initial_carry, step, lambda params, x: x, step, units, hidden, activations)


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

    recur = Recurrence(gate, hidden=_itself)
    initial_carry = lambda batch: jnp.zeros((batch, units))
    return _make_cell(init, initial_carry, project, recur, units, _itself)


def lstm(
    units: int,
    forget_bias: float = 1.0,
    recurrent_init: str = "orthogonal",
    recurrent_gain: float = 1.0,
    *,
    chrono_t_max: float | None = None,
    layer_norm: bool = False,
) -> Cell:
    """Long short-term memory (Keras ``LSTM``), gate blocks in the order i, f, c, o.

    ``z = x_t W + h_{t-1} U + b``; ``i, f, o = σ(z_i), σ(z_f), σ(z_o)``; ``g = tanh(z_c)``;
    ``c_t = f ⊙ c_{t-1} + i ⊙ g``; ``h_t = o ⊙ tanh(c_t)``.

    Params: ``kernel (input_dim, 4u)``, ``recurrent_kernel (u, 4u)``, ``bias (4u,)`` with the
    forget block set to ``forget_bias`` (Keras ``unit_forget_bias=True`` is 1; Jozefowicz et al.
    2015). PyTorch orders its blocks i, f, g, o too but keeps two biases; see
    :mod:`rnn_jax.convert`. Carry: :class:`LSTMCarry` ``(h, c)``. Activations: gates
    ``input_gate, forget_gate, output_gate``; tanh ``candidate`` (g) and ``cell_tanh``.

    ``chrono_t_max``: chrono initialisation (Tallec & Ollivier, "Can recurrent neural networks
    warp time?", ICLR 2018) for dependencies up to about ``chrono_t_max`` steps: the forget
    block of ``bias`` is ``b_f = ln u`` with ``u ~ U[1, T_max - 1]`` drawn per unit, the input
    block ``b_i = -b_f`` (the other blocks 0), so each unit starts with a characteristic
    forgetting time ``1 / (1 - σ(b_f)) = 1 + u`` spread over ``[2, T_max]``. It replaces
    ``forget_bias``; the kernels are the draws of the same ``key`` without it.

    ``layer_norm``: layer-normalised LSTM (Ba, Kiros & Hinton, "Layer normalization", 2016):
    ``z = LN(x_t W) + LN(h_{t-1} U) + b``, gates and ``c_t`` as above,
    ``h_t = o ⊙ tanh(LN(c_t))``, where ``LN(a) = γ ⊙ (a - mean(a)) / sqrt(var(a) + 1e-5) + β``
    has its own gain ``γ`` (init 1) and shift ``β`` (init 0) for each of its three uses. The
    two pre-activation LNs normalise each gate block (i, f, c, o) over its own ``units``
    entries, where the paper normalises all ``4u`` together: the blocks feed different
    nonlinearities at different operating points (the forget bias), and normalised together a
    large block (say the candidate's) would shrink the others; per block, each gate's
    pre-activation is standardised on its own, as in TensorFlow's ``LayerNormBasicLSTMCell``.
    Extra params, each ``(4u,)`` except the cell's ``(u,)``: ``input_norm_scale,
    input_norm_bias, recurrent_norm_scale, recurrent_norm_bias, cell_norm_scale,
    cell_norm_bias``. ``project`` is ``LN(x_t W) + b`` (still free of the carry); ``recur`` is a
    plain function (the normalisation of ``h U`` reads params), so :func:`rnn_jax.unroll` runs
    its readable scan. Activations as above, ``cell_tanh`` being ``tanh(LN(c_t))``.
    """
    chrono = _chrono_check(chrono_t_max)

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        bias = jnp.zeros((4 * units,)).at[units : 2 * units].set(forget_bias)
        if chrono:
            b_f = _chrono_bias(jax.random.fold_in(key, 1), units, chrono_t_max)
            bias = jnp.concatenate([-b_f, b_f, jnp.zeros((2 * units,))])
        params = {
            "kernel": glorot_uniform(k_w, (input_dim, 4 * units)),
            "recurrent_kernel": _recurrent_kernel(k_u, units, 4, recurrent_init, recurrent_gain),
            "bias": bias,
        }
        if layer_norm:
            for name, width in (("input", 4 * units), ("recurrent", 4 * units), ("cell", units)):
                params[f"{name}_norm_scale"] = jnp.ones((width,))
                params[f"{name}_norm_bias"] = jnp.zeros((width,))
        return params

    def initial_carry(batch):
        return LSTMCarry(jnp.zeros((batch, units)), jnp.zeros((batch, units)))

    if not layer_norm:

        def project(params, x):
            return _project(params, x, params["bias"])

        recur = Recurrence(lambda carry, z: _lstm_update(carry, z), hidden=_lstm_hidden)
        return _make_cell(init, initial_carry, project, recur, units, _lstm_hidden)

    def project_ln(params, x):
        zx = _layer_norm(_project(params, x, None), params, "input", 4)
        return add_bias(zx, params["bias"])

    def parts(params, carry, zx):
        u = _layer_norm(carry.h @ params["recurrent_kernel"], params, "recurrent", 4)
        return _lstm_update(carry, zx + u, lambda c: _layer_norm(c, params, "cell", 1))

    def recur_ln(params, carry, zx):
        carry, _ = parts(params, carry, zx)
        return carry, carry.h

    def activations(params, carry, zx):
        return parts(params, carry, zx)[1]

    return _make_cell(init, initial_carry, project_ln, recur_ln, units, _lstm_hidden, activations)


def _lstm_update(carry: LSTMCarry, z: jax.Array, normalise_cell=None):
    """The LSTM gates on ``z (batch, 4u)``: the new :class:`LSTMCarry` and the activations."""
    z_i, z_f, z_c, z_o = jnp.split(z, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_c), jax.nn.sigmoid(z_o)
    c = f * carry.c + i * g
    cell_tanh = jnp.tanh(c if normalise_cell is None else normalise_cell(c))
    acts = {
        "gates": {"input_gate": i, "forget_gate": f, "output_gate": o},
        "tanh": {"candidate": g, "cell_tanh": cell_tanh},
    }
    return LSTMCarry(o * cell_tanh, c), acts


LAYER_NORM_EPSILON = 1e-5
"""Added to the variance in :func:`lstm`'s layer normalisation (PyTorch's ``LayerNorm``)."""


def _layer_norm(a: jax.Array, params: Params, name: str, blocks: int) -> jax.Array:
    """``γ ⊙ (a - mean) / sqrt(var + ε) + β`` over each of ``blocks`` equal blocks of the last
    axis of ``a (..., n)``, with ``γ, β (n,)`` = ``params[name + "_norm_scale" / "_norm_bias"]``."""
    shape = a.shape
    a = a.reshape(shape[:-1] + (blocks, shape[-1] // blocks))
    mean = jnp.mean(a, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(a - mean), axis=-1, keepdims=True)
    a = ((a - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPSILON)).reshape(shape)
    scale, shift = params[f"{name}_norm_scale"], params[f"{name}_norm_bias"]
    return add_bias(a * scale.reshape((1,) * (a.ndim - 1) + scale.shape), shift)


def _chrono_check(t_max) -> bool:
    """Whether chrono initialisation is asked for; a ``t_max`` that is not a number > 2 raises."""
    if t_max is None:
        return False
    if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real):
        raise ValueError(f"chrono_t_max={t_max!r} must be a number > 2 (or None)")
    if not (math.isfinite(t_max) and t_max > 2):
        raise ValueError(
            f"chrono_t_max={t_max!r} must be finite and > 2: u ~ U[1, chrono_t_max - 1]"
        )
    return True


def _chrono_bias(key: jax.Array, units: int, t_max: float) -> jax.Array:
    """``ln u`` with ``u ~ U[1, t_max - 1]`` per unit (Tallec & Ollivier 2018): ``(units,)``."""
    return jnp.log(jax.random.uniform(key, (units,), jnp.float32, 1.0, float(t_max) - 1.0))


def gru(
    units: int,
    reset_after: bool = True,
    recurrent_init: str = "orthogonal",
    recurrent_gain: float = 1.0,
    *,
    chrono_t_max: float | None = None,
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

    ``chrono_t_max``: chrono initialisation (Tallec & Ollivier 2018; see :func:`lstm`). Here
    ``z`` keeps the old state (``h_t = z ⊙ h_{t-1} + (1 - z) ⊙ n``), so it plays the LSTM's
    forget gate: the z block of the bias is ``b_z = ln u``, ``u ~ U[1, T_max - 1]`` per unit,
    every other bias 0. With ``reset_after=True`` it goes in the input row ``b_x`` (``bias[0]``;
    ``b_z`` is the sum of both rows' z blocks, ``bias[1]`` stays 0). The kernels are the draws
    of the same ``key`` without it. (Written with ``1 - z`` on the old state, as some texts
    write the GRU, the same law reads ``b_z = -ln u``.)
    """
    chrono = _chrono_check(chrono_t_max)

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        bias = jnp.zeros((2, 3 * units) if reset_after else (3 * units,))
        if chrono:
            b_z = _chrono_bias(jax.random.fold_in(key, 1), units, chrono_t_max)
            b_z = jnp.concatenate([b_z, jnp.zeros((2 * units,))])
            bias = bias.at[0].set(b_z) if reset_after else b_z
        return {
            "kernel": glorot_uniform(k_w, (input_dim, 3 * units)),
            "recurrent_kernel": _recurrent_kernel(k_u, units, 3, recurrent_init, recurrent_gain),
            "bias": bias,
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
        recur = Recurrence(
            gate_after, hidden=_itself, recurrent_bias=lambda p: p["bias"][1], additive=False
        )
        activations = None
    else:
        recur, activations = recur_before, activations_before
    initial_carry = lambda batch: jnp.zeros((batch, units))
    return _make_cell(init, initial_carry, project, recur, units, _itself, activations)


def indrnn(units: int, max_length: int | None = None, recurrent_max: float | None = None) -> Cell:
    """Independently recurrent network (IndRNN; Li, Li, Cook, Zhu & Gao, CVPR 2018).

    ``h_t = relu(x_t W + u ⊙ h_{t-1} + b)``: each unit sees only its own past, through one
    recurrent weight ``u_n``. Over ``T`` steps the gradient through unit ``n`` is scaled by at
    most ``|u_n|^T`` (ReLU passes 0 or 1), so the paper bounds ``|u_n| ≤ 2^{1/T}`` (at most a
    factor 2 of growth over the sequence). The bound is ``recurrent_max`` when given, else
    ``2 ** (1 / max_length)``, else none; :attr:`Cell.prepare` clips ``u`` to
    ``[-bound, bound]`` once per sequence, so the recurrence always runs with ``|u| ≤ bound``
    whatever the params. A stored ``u_n`` that an update moves past the bound has gradient 0
    there and acts as the bound from then on; to let it come back, clip the stored params
    after each update instead (a projection).

    Params: ``kernel (input_dim, u)`` glorot-uniform (Keras's default, as the other cells),
    ``recurrent_kernel (u,)`` the recurrent *vector* (the diagonal of a recurrent matrix)
    drawn ``U[0, bound]`` (``U[0, 1]`` without a bound), the uniform draw of the paper's
    experiments as the public IndRNN code runs them (batzner/indrnn, StefOe/indrnn-pytorch),
    ``bias (u,)`` zeros. Carry: ``h (batch, units)``. Activations: none (ReLU does not
    saturate): ``{"gates": {}, "tanh": {}}``.

    Args:
      units: hidden units.
      max_length: ``T``, the longest sequence trained on; sets the bound ``2^{1/T}``.
      recurrent_max: the bound itself (> 0); give at most one of the two.
    """
    if max_length is not None and recurrent_max is not None:
        raise ValueError(
            f"max_length={max_length!r} and recurrent_max={recurrent_max!r}: give at most one"
        )
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
            raise ValueError(f"max_length={max_length!r} must be a positive integer")
        if max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive integer")
        bound = 2.0 ** (1.0 / max_length)
    elif recurrent_max is not None:
        if isinstance(recurrent_max, bool) or not isinstance(recurrent_max, numbers.Real):
            raise ValueError(f"recurrent_max={recurrent_max!r} must be a finite number > 0")
        if not (math.isfinite(recurrent_max) and recurrent_max > 0):
            raise ValueError(f"recurrent_max={recurrent_max!r} must be a finite number > 0")
        bound = float(recurrent_max)
    else:
        bound = None

    def init(key, input_dim):
        k_w, k_u = jax.random.split(key)
        high = 1.0 if bound is None else bound
        return {
            "kernel": glorot_uniform(k_w, (input_dim, units)),
            "recurrent_kernel": jax.random.uniform(k_u, (units,), jnp.float32, 0.0, high),
            "bias": jnp.zeros((units,)),
        }

    def prepare(params):
        u = params["recurrent_kernel"]
        return {"recurrent_kernel": u if bound is None else jnp.clip(u, -bound, bound)}

    def project(params, x):
        return _project(params, x, params["bias"])

    def recur(prepared, h, zx):
        u = prepared["recurrent_kernel"]
        h = jax.nn.relu(zx + h * u.reshape((1,) * (h.ndim - 1) + u.shape))
        return h, h

    def activations(_prepared, _h, _zx):
        return {"gates": {}, "tanh": {}}

    initial_carry = lambda batch: jnp.zeros((batch, units))
    return _make_cell(init, initial_carry, project, recur, units, _itself, activations, prepare)


def modrelu(z: jax.Array, bias: jax.Array) -> jax.Array:
    """``sign(z) ⊙ relu(|z| + b)`` (Arjovsky, Shah & Bengio 2016), ``bias (n,)`` over the last
    axis of ``z (..., n)``: shrinks ``|z|`` by ``-b`` (zero inside ``|z| ≤ -b``), keeps the sign."""
    return jnp.sign(z) * jax.nn.relu(add_bias(jnp.abs(z), bias))


def exp_rnn(units: int) -> Cell:
    """Orthogonal RNN by the exponential map (expRNN; Lezcano-Casado & Martínez-Rubio, "Cheap
    orthogonal constraints in neural networks", ICML 2019).

    ``h_t = modrelu(x_t W + h_{t-1} R)`` with ``R = expm(A - Aᵀ)``: the exponential of a
    skew-symmetric matrix is orthogonal for any ``A``, so plain gradient steps on ``A`` (any
    optimiser) keep ``R`` orthogonal, and the linear part ``h ↦ h R`` keeps the norm of every
    vector (Jacobian singular values all 1). :attr:`Cell.prepare` computes ``R``
    (``jax.scipy.linalg.expm``) once per sequence; the scan multiplies by it.
    ``modrelu(z) = sign(z) ⊙ relu(|z| + b)`` (:func:`modrelu`); ``project`` is ``x_t W`` (the
    bias sits inside modReLU, not added to ``z``).

    Params: ``kernel (input_dim, u)`` He normal ``N(0, 2 / input_dim)`` and ``bias (u,)``
    ``U[-0.01, 0.01]``, as the paper's code; ``recurrent_skew (u, u)`` the matrix ``A``, by the
    Henaff initialisation (Henaff, Szlam & LeCun 2016, as in the paper): ``A - Aᵀ`` block
    diagonal with 2×2 blocks ``[[0, s], [-s, 0]]``, ``s ~ U[-π, π]`` (only ``A``'s upper entries
    set), so ``R`` is a block rotation whose eigenvalues ``e^{±is}`` have angles ``|s|`` spread
    uniformly over ``(0, π)`` (an odd ``units`` leaves one eigenvalue 1). ``A``'s diagonal does
    not enter ``R`` (its gradient is 0). Carry: ``h (batch, units)``. Activations: none
    (modReLU does not saturate): ``{"gates": {}, "tanh": {}}``.
    """

    def init(key, input_dim):
        k_w, k_a, k_b = jax.random.split(key, 3)
        angles = jax.random.uniform(k_a, (units // 2,), jnp.float32, -jnp.pi, jnp.pi)
        rows = 2 * jnp.arange(units // 2)
        return {
            "kernel": jnp.sqrt(2.0 / input_dim) * jax.random.normal(k_w, (input_dim, units)),
            "recurrent_skew": jnp.zeros((units, units)).at[rows, rows + 1].set(angles),
            "bias": jax.random.uniform(k_b, (units,), jnp.float32, -0.01, 0.01),
        }

    def prepare(params):
        a = params["recurrent_skew"]
        return {"recurrent_kernel": jax.scipy.linalg.expm(a - a.T), "bias": params["bias"]}

    def project(params, x):
        return _project(params, x, None)

    def recur(prepared, h, zx):
        h = modrelu(zx + h @ prepared["recurrent_kernel"], prepared["bias"])
        return h, h

    def activations(_prepared, _h, _zx):
        return {"gates": {}, "tanh": {}}

    initial_carry = lambda batch: jnp.zeros((batch, units))
    return _make_cell(init, initial_carry, project, recur, units, _itself, activations, prepare)


CELLS: dict[str, Callable[..., Cell]] = {"simple_rnn": simple_rnn, "lstm": lstm, "gru": gru}
