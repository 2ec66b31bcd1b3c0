"""Cells against float64 NumPy written from DESIGN.md §3; the Keras initialisers; gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import cells
from rnn_jax.scan import ScanType, unroll

# (name, factory kwargs, reference kind, reference options)
VARIANTS = {
    "simple_rnn": (cells.simple_rnn, {}, "simple_rnn", {}),
    "simple_rnn_relu": (
        cells.simple_rnn,
        {"activation": "relu"},
        "simple_rnn",
        {"activation": "relu"},
    ),
    "lstm": (cells.lstm, {}, "lstm", {}),
    "gru": (cells.gru, {}, "gru", {"reset_after": True}),
    "gru_reset_before": (cells.gru, {"reset_after": False}, "gru", {"reset_after": False}),
}
BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def random_params(cell, input_dim, rng, scale=0.5):
    """Float64 params of the cell's shapes, every entry (biases included) random."""
    shapes = jax.eval_shape(lambda key: cell.init(key, input_dim), jax.random.PRNGKey(0))
    return {k: scale * rng.standard_normal(s.shape) for k, s in shapes.items()}


def to_jax(tree, dtype=jnp.float64):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def ours_loop(cell, params, carry, xs):
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell.step(params, carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cell_matches_numpy_float64(variant):
    factory, kwargs, kind, options = VARIANTS[variant]
    units, input_dim, batch, time = 4, 3, 2, 5
    cell = factory(units, **kwargs)
    rng = np.random.default_rng(0)
    params = random_params(cell, input_dim, rng)
    xs = rng.standard_normal((batch, time, input_dim))
    if kind == "lstm":
        carry0 = (rng.standard_normal((batch, units)), rng.standard_normal((batch, units)))
    else:
        carry0 = rng.standard_normal((batch, units))
    want_carry, want_ys = ref.run(
        lambda c, x: ref.keras_step(kind, params, c, x, **options), carry0, xs
    )

    zero = ref.keras_initial_carry(kind, batch, units)
    _, want_zero = ref.run(lambda c, x: ref.keras_step(kind, params, c, x, **options), zero, xs)

    with jax.enable_x64(True):

        @jax.jit
        def ours(params, carry0, xs):
            # The cell's step in a loop from a given carry; the scan from the cell's own zero
            # carry, the default (the fused path where the cell has one) and the readable scan.
            return ours_loop(cell, params, carry0, xs), [
                unroll(cell, params, xs, return_sequences=True, scan=scan)[1]
                for scan in (ScanType.AUTO, ScanType.SEQUENTIAL)
            ]

        jcarry0 = cells.LSTMCarry(*to_jax(carry0)) if kind == "lstm" else to_jax(carry0)
        (carry, ys), scans = ours(to_jax(params), jcarry0, to_jax(xs))
        assert ys.dtype == jnp.float64
        np.testing.assert_allclose(ys, want_ys, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            jax.tree.leaves(carry), jax.tree.leaves(want_carry), rtol=1e-12, atol=1e-12
        )
        # The hidden state the probes and the sampler read is the step's output h_t.
        np.testing.assert_allclose(cell.hidden(carry), want_ys[:, -1], rtol=1e-12, atol=1e-12)
        for ys_scan in scans:
            assert ys_scan.dtype == jnp.float64
            np.testing.assert_allclose(ys_scan, want_zero, rtol=1e-12, atol=1e-12)

    # Default float32 path: same numbers to float32 accuracy.
    _, ys32 = jax.jit(lambda p, x: unroll(cell, p, x, return_sequences=True))(
        to_jax(params, jnp.float32), to_jax(xs, jnp.float32)
    )
    assert ys32.dtype == jnp.float32
    np.testing.assert_allclose(ys32, want_zero, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_activations_match_numpy_float64(variant):
    """``cell.activations`` names the step's σ gates and tanh units, with the reference's values."""
    factory, kwargs, kind, options = VARIANTS[variant]
    units, input_dim, batch = 4, 3, 2
    cell = factory(units, **kwargs)
    rng = np.random.default_rng(5)
    params = random_params(cell, input_dim, rng, scale=1.0)
    x = rng.standard_normal((batch, input_dim))
    carry = ref.keras_initial_carry(kind, batch, units)
    carry = jax.tree.map(lambda c: rng.standard_normal(c.shape), carry)
    want = ref.keras_activations(kind, params, carry, x, **options)
    with jax.enable_x64(True):
        jcarry = cells.LSTMCarry(*to_jax(carry)) if kind == "lstm" else to_jax(carry)
        p = to_jax(params)
        got = cell.activations(p, jcarry, cell.project(p, to_jax(x)))
    assert set(got) == {"gates", "tanh"}
    for group in ("gates", "tanh"):
        assert sorted(got[group]) == sorted(want[group]), group
        for name, value in want[group].items():
            assert got[group][name].dtype == jnp.float64
            np.testing.assert_allclose(
                got[group][name], value, rtol=1e-12, atol=1e-12, err_msg=name
            )


def test_gru_forms_differ():
    """reset_after=True and False are different recurrences on the same weights."""
    units, input_dim = 4, 3
    rng = np.random.default_rng(1)
    params = random_params(cells.gru(units), input_dim, rng)
    before = dict(params, bias=params["bias"][0] + params["bias"][1])
    h, x = rng.standard_normal((2, units)), rng.standard_normal((2, input_dim))
    with jax.enable_x64(True):
        after_h, _ = cells.gru(units).step(to_jax(params), to_jax(h), to_jax(x))
        before_h, _ = cells.gru(units, reset_after=False).step(to_jax(before), to_jax(h), to_jax(x))
    assert np.max(np.abs(np.asarray(after_h) - np.asarray(before_h))) > 1e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_is_recur_of_project_and_tokens_are_one_hot(variant):
    factory, kwargs, _, _ = VARIANTS[variant]
    units, vocab = 3, 5
    cell = factory(units, **kwargs)
    params = to_jax(random_params(cell, vocab, np.random.default_rng(2)), jnp.float32)
    tokens = jnp.array([0, 3, 4, 1])
    one_hot = jax.nn.one_hot(tokens, vocab)
    np.testing.assert_allclose(
        cell.project(params, tokens), cell.project(params, one_hot), atol=1e-6
    )
    carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(4))
    c1, y1 = cell.step(params, carry, one_hot)
    c2, y2 = cell.recur(params, carry, cell.project(params, tokens))
    np.testing.assert_allclose(y1, y2, atol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(c1), jax.tree.leaves(c2), atol=1e-6)
    assert y1.shape == (4, units)


# --- Initialisers (DESIGN.md §2) ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_keras_default_init(name):
    units, input_dim = 32, 50
    k = BLOCKS[name]
    params = cells.CELLS[name](units).init(jax.random.PRNGKey(3), input_dim)
    kernel = np.asarray(params["kernel"], np.float64)
    rec = np.asarray(params["recurrent_kernel"], np.float64)
    assert kernel.shape == (input_dim, k * units) and rec.shape == (units, k * units)

    # Glorot uniform: U(-l, l), l = sqrt(6 / (fan_in + fan_out)), fans of the whole kernel.
    limit = np.sqrt(6.0 / (input_dim + k * units))
    assert np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.97 * limit
    assert abs(kernel.var() / (limit**2 / 3.0) - 1.0) < 0.15
    assert abs(kernel.mean()) < 0.05 * limit

    # Orthogonal (gain 1): the rows of the (units, k·units) recurrent kernel are orthonormal.
    np.testing.assert_allclose(rec @ rec.T, np.eye(units), atol=1e-5)

    bias = np.asarray(params["bias"])
    if name == "lstm":
        want = np.zeros(4 * units)
        want[units : 2 * units] = 1.0  # unit_forget_bias: the f block of i, f, c, o
        np.testing.assert_array_equal(bias, want)
    elif name == "gru":
        np.testing.assert_array_equal(bias, np.zeros((2, 3 * units)))
    else:
        np.testing.assert_array_equal(bias, np.zeros(units))


def test_init_options():
    units = 6
    factories = {
        "irnn": lambda: cells.simple_rnn(
            units, recurrent_init="identity", recurrent_gain=0.5, activation="relu"
        ),
        "lstm_identity": lambda: cells.lstm(units, recurrent_init="identity"),
        "gru_gain": lambda: cells.gru(units, recurrent_gain=2.0),
        "simple_rnn": lambda: cells.simple_rnn(units),
        "glorot": lambda: cells.simple_rnn(
            units, recurrent_init="glorot_uniform", recurrent_gain=3.0
        ),
        "forget_bias": lambda: cells.lstm(units, forget_bias=2.5),
        "gru_before": lambda: cells.gru(units, reset_after=False),
        "lstm": lambda: cells.lstm(units),
    }

    @jax.jit  # one compilation for every draw
    def draw(key, other_key):
        out = {name: make().init(key, 2) for name, make in factories.items()}
        out["simple_rnn_other"] = factories["simple_rnn"]().init(other_key, 2)
        out["lstm_other"] = factories["lstm"]().init(other_key, 2)
        return out

    p = jax.tree.map(
        lambda a: np.asarray(a, np.float64), draw(*jax.random.split(jax.random.PRNGKey(0)))
    )
    np.testing.assert_array_equal(p["irnn"]["recurrent_kernel"], 0.5 * np.eye(units))
    np.testing.assert_array_equal(
        p["lstm_identity"]["recurrent_kernel"], np.tile(np.eye(units), (1, 4))
    )
    rec = p["gru_gain"]["recurrent_kernel"]
    np.testing.assert_allclose(rec @ rec.T, 4.0 * np.eye(units), atol=1e-4)
    for name in ("simple_rnn", "simple_rnn_other"):
        sq = p[name]["recurrent_kernel"]
        np.testing.assert_allclose(sq.T @ sq, np.eye(units), atol=1e-5)

    g = p["glorot"]["recurrent_kernel"]
    assert np.abs(g).max() <= 3.0 * np.sqrt(6.0 / (2 * units)) and np.abs(g).max() > 1.0

    bias = p["forget_bias"]["bias"]
    np.testing.assert_array_equal(bias[units : 2 * units], 2.5)
    assert np.count_nonzero(bias) == units
    assert p["gru_before"]["bias"].shape == (18,)

    # The same key draws the same params; another key others.
    np.testing.assert_array_equal(p["lstm"]["kernel"], p["forget_bias"]["kernel"])
    assert not np.allclose(p["lstm"]["kernel"], p["lstm_other"]["kernel"])
    assert not np.allclose(p["simple_rnn"]["kernel"], p["simple_rnn_other"]["kernel"])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="recurrent_init"):
        cells.lstm(4, recurrent_init="zeros").init(jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match="activation"):
        cells.simple_rnn(4, activation="sigmoid")


# --- Gradients against finite differences (float64) -------------------------------------------


@pytest.mark.parametrize("variant", ["simple_rnn", "lstm", "gru"])
def test_gradients_match_finite_differences(variant):
    """Reverse mode of ``unroll`` against central differences: the fast path's custom JVP (a
    zero and a given carry) and the readable scan (lengths). The reset-before GRU has no
    custom derivative; JAX differentiates its plain code."""
    factory, kwargs, _, _ = VARIANTS[variant]
    cell = factory(3, **kwargs)
    rng = np.random.default_rng(4)
    params0 = random_params(cell, 2, rng)
    xs0 = rng.standard_normal((2, 4, 2))
    lengths = np.array([4, 2])
    carry0 = jax.tree.map(lambda c: c + 0.5, cell.initial_carry(2))
    with jax.enable_x64(True):
        primals = (to_jax(params0), to_jax(xs0), to_jax(carry0))

        def loss(params, xs, carry0):
            # Every output, final carries, the masking path, a given carry and reverse.
            total = 0.0
            for kwargs in [
                {"lengths": lengths, "return_sequences": True},
                {"carry": carry0, "reverse": True, "return_sequences": True},
                {},
            ]:
                carry, ys = unroll(cell, params, xs, **kwargs)
                total += jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(carry))
            return total

        # One compilation: the value at the shifted points comes from the same function.
        ref.assert_directional_derivatives(loss, primals, eps=1e-5, rtol=1e-7, atol=1e-8)
