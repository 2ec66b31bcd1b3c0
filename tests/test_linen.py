"""The linen layer: Keras-named params, Keras init, and the same numbers as the pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from rnn_jax import cells, convert
from rnn_jax.linen import RNN
from rnn_jax.scan import unroll

BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def _xs(batch=3, time=5, dim=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, time, dim)), jnp.float32)


def _close(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_params_are_keras_named_and_initialised(name):
    units, k = 8, BLOCKS[name]
    layer = RNN(cell=name, units=units)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), _xs(dim=20))["params"]
    assert set(params) == {"kernel", "recurrent_kernel", "bias"}
    assert params["kernel"].shape == (20, k * units)
    assert params["recurrent_kernel"].shape == (units, k * units)
    assert params["bias"].shape == ((2, 3 * units) if name == "gru" else (k * units,))
    limit = np.sqrt(6.0 / (20 + k * units))
    assert np.abs(params["kernel"]).max() <= limit
    rec = np.asarray(params["recurrent_kernel"], np.float64)
    np.testing.assert_allclose(rec @ rec.T, np.eye(units), atol=1e-5)
    want_bias = np.zeros(params["bias"].shape)
    if name == "lstm":
        want_bias[units : 2 * units] = 1.0
    np.testing.assert_array_equal(params["bias"], want_bias)


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_apply_equals_pure_unroll(name):
    cell = cells.CELLS[name](6)
    all_kwargs = [
        {},
        {"reverse": True, "return_sequences": True},
        {"return_state": True, "unroll": 2},
    ]

    @jax.jit
    def both(params, xs, carry0, lengths):
        out = []
        for kwargs in all_kwargs:
            got = RNN(cell=name, units=6, **kwargs).apply({"params": params}, xs, carry0, lengths)
            carry, ys = unroll(
                cell,
                params,
                xs,
                carry0,
                lengths=lengths,
                reverse=kwargs.get("reverse", False),
                return_sequences=kwargs.get("return_sequences", False),
            )
            out.append((got, (carry, ys) if kwargs.get("return_state") else ys))
        return out

    shapes = jax.eval_shape(lambda key: cell.init(key, 4), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    params = {
        k: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32) for k, s in shapes.items()
    }
    carry0 = jax.tree.map(lambda c: c + 0.3, cell.initial_carry(3))
    for got, want in both(params, _xs(), carry0, jnp.array([5, 2, 4])):
        _close(got, want)


def test_options_tokens_and_cell_instances():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 7, (2, 5)), jnp.int32)
    gru = RNN(
        cell="gru", units=4, options={"reset_after": False}, input_dim=7, return_sequences=True
    )
    variables = jax.jit(gru.init)(jax.random.PRNGKey(0), tokens)
    assert variables["params"]["bias"].shape == (12,)
    got = jax.jit(gru.apply)(variables, tokens)
    pure = jax.jit(
        lambda p, t: unroll(
            cells.gru(4, reset_after=False), p, jax.nn.one_hot(t, 7), return_sequences=True
        )
    )
    _close(got, pure(variables["params"], tokens)[1], tol=1e-6)
    with pytest.raises(ValueError, match="input_dim"):
        RNN(cell="gru", units=4).init(jax.random.PRNGKey(0), tokens)

    irnn = RNN(
        cell="simple_rnn", units=3, options={"activation": "relu", "recurrent_init": "identity"}
    )
    rec = jax.jit(irnn.init)(jax.random.PRNGKey(0), _xs(dim=2))["params"]["recurrent_kernel"]
    np.testing.assert_array_equal(rec, np.eye(3))

    custom = cells.lstm(5, forget_bias=2.0)
    p = jax.jit(RNN(cell=custom).init)(jax.random.PRNGKey(0), _xs(dim=2))["params"]
    np.testing.assert_array_equal(p["bias"][5:10], 2.0)
    with pytest.raises(ValueError, match="units"):
        RNN(cell="lstm").init(jax.random.PRNGKey(0), _xs())
    with pytest.raises(ValueError, match="cell") as error:
        RNN(cell="transformer", units=3).init(jax.random.PRNGKey(0), _xs())
    assert "'transformer'" in str(error.value)


class _Classifier(nn.Module):
    """Stacked layers inside a Flax model: LSTM over every step, then GRU's last output, Dense."""

    @nn.compact
    def __call__(self, xs):
        ys = RNN(cell="lstm", units=6, return_sequences=True)(xs)
        h = RNN(cell="gru", units=5, reverse=True)(ys)
        return nn.Dense(3)(h)


def test_inside_a_flax_model_under_jit_and_grad():
    xs, labels = _xs(), jnp.array([0, 2, 1])
    model = _Classifier()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), xs)["params"]
    assert set(params) == {"RNN_0", "RNN_1", "Dense_0"}

    def loss(params):
        logits = model.apply({"params": params}, xs)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    def pure_loss(params):
        _, ys = unroll(cells.lstm(6), params["RNN_0"], xs, return_sequences=True)
        _, h = unroll(cells.gru(5), params["RNN_1"], ys, reverse=True)
        logits = h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None, :]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    (value, grads), want = jax.jit(lambda p: (jax.value_and_grad(loss)(p), pure_loss(p)))(params)
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


def test_torch_weights_load_into_the_layer():
    rng = np.random.default_rng(0)
    sd = {
        "weight_ih_l0": rng.standard_normal((12, 4)),
        "weight_hh_l0": rng.standard_normal((12, 4)),
        "bias_ih_l0": rng.standard_normal(12),
        "bias_hh_l0": rng.standard_normal(12),
    }
    params = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32), convert.from_torch(sd, "gru")["layer_0"]
    )
    layer = RNN(cell="gru", units=4, return_sequences=True)
    abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(0), _xs())["params"]
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
    both = jax.jit(
        lambda p, x: (
            layer.apply({"params": p}, x),
            unroll(cells.gru(4), p, x, return_sequences=True)[1],
        )
    )
    _close(*both(params, _xs()))
