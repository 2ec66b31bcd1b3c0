"""PyTorch-layout converters: round trips, and PyTorch's equations in NumPy equal our forward."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import cells, convert
from rnn_jax.scan import unroll

BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def torch_state_dict(kind, input_dim, hidden, num_layers, bidirectional, rng, prefix=""):
    """Random float64 weights under PyTorch's names and shapes."""
    k = BLOCKS[kind]
    out = {}
    for layer in range(num_layers):
        in_dim = input_dim if layer == 0 else hidden * (1 + bidirectional)
        for suffix in ("", "_reverse") if bidirectional else ("",):
            out[f"{prefix}weight_ih_l{layer}{suffix}"] = 0.5 * rng.standard_normal(
                (k * hidden, in_dim)
            )
            out[f"{prefix}weight_hh_l{layer}{suffix}"] = 0.5 * rng.standard_normal(
                (k * hidden, hidden)
            )
            out[f"{prefix}bias_ih_l{layer}{suffix}"] = 0.5 * rng.standard_normal(k * hidden)
            out[f"{prefix}bias_hh_l{layer}{suffix}"] = 0.5 * rng.standard_normal(k * hidden)
    return out


def our_forward(kind, params, xs):
    """Stacked (bi)directional layers by unroll: ``(outputs (B, T, D·H), final hs)``.

    The final ``h`` of each layer and direction, in PyTorch's ``h_n`` order.
    """
    first = params["layer_0"].get("forward", params["layer_0"])
    cell = cells.CELLS[kind](first["recurrent_kernel"].shape[0])
    finals, k = [], 0
    while f"layer_{k}" in params:
        layer = params[f"layer_{k}"]
        if "forward" in layer:
            directions = [(layer["forward"], False), (layer["backward"], True)]
        else:
            directions = [(layer, False)]
        outs = []
        for p, reverse in directions:
            carry, ys = unroll(
                cell, jax.tree.map(jnp.asarray, p), xs, reverse=reverse, return_sequences=True
            )
            outs.append(ys)
            finals.append(carry.h if kind == "lstm" else carry)
        xs = jnp.concatenate(outs, axis=-1)
        k += 1
    return xs, finals


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_torch_equations_equal_our_forward(kind, num_layers, bidirectional):
    rng = np.random.default_rng(0)
    sd = torch_state_dict(kind, 3, 4, num_layers, bidirectional, rng)
    xs = rng.standard_normal((2, 5, 3))
    want_out, want_h = ref.torch_forward(kind, sd, xs, num_layers, bidirectional)

    params = convert.from_torch(sd, kind)
    assert sorted(params) == [f"layer_{k}" for k in range(num_layers)]
    with jax.enable_x64(True):
        out, finals = jax.jit(lambda p, x: our_forward(kind, p, x))(params, jnp.asarray(xs))
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.stack(finals), want_h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru"])
def test_layout_and_round_trips(kind):
    rng = np.random.default_rng(1)
    k = BLOCKS[kind]
    sd = torch_state_dict(kind, 3, 4, 2, True, rng, prefix="encoder.rnn.")
    sd["encoder.embed.weight"] = rng.standard_normal((10, 3))  # other modules are ignored
    params = convert.from_torch(sd, kind, prefix="encoder.rnn.")
    p = params["layer_1"]["backward"]
    assert p["kernel"].shape == (8, k * 4) and p["recurrent_kernel"].shape == (4, k * 4)
    assert p["bias"].shape == ((2, 12) if kind == "gru" else (k * 4,))
    assert p["kernel"].dtype == np.float64

    back = convert.to_torch(params, kind, prefix="encoder.rnn.")
    rnn_names = sorted(n for n in sd if ".rnn." in n)
    assert sorted(back) == rnn_names
    for name in rnn_names:
        assert back[name].shape == sd[name].shape
        if kind == "gru" or name.startswith("encoder.rnn.weight"):
            np.testing.assert_array_equal(back[name], sd[name])
    if kind != "gru":
        # One merged bias: the sum survives, all of it in bias_ih.
        for name in rnn_names:
            if "bias_ih" in name:
                hh = name.replace("bias_ih", "bias_hh")
                np.testing.assert_allclose(back[name] + back[hh], sd[name] + sd[hh], rtol=1e-15)
                np.testing.assert_array_equal(back[hh], 0.0)

    # Ours -> PyTorch -> ours is exact for every cell.
    again = convert.from_torch(back, kind, prefix="encoder.rnn.")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gru_gate_order_by_hand():
    """PyTorch r, z, n blocks become our z, r, h; weights transpose; biases stay apart."""
    h, d = 2, 1
    w_ih = np.arange(3 * h * d, dtype=float).reshape(3 * h, d)  # rows: r0 r1 z0 z1 n0 n1
    w_hh = np.arange(3 * h * h, dtype=float).reshape(3 * h, h) + 100
    b_ih, b_hh = np.arange(6.0), np.arange(6.0) + 10
    p = convert.layer_from_torch(w_ih, w_hh, b_ih, b_hh, cell="gru")
    np.testing.assert_array_equal(p["kernel"], [[2, 3, 0, 1, 4, 5]])
    np.testing.assert_array_equal(p["recurrent_kernel"][0], [104, 106, 100, 102, 108, 110])
    np.testing.assert_array_equal(p["bias"], [[2, 3, 0, 1, 4, 5], [12, 13, 10, 11, 14, 15]])
    lstm = convert.layer_from_torch(
        np.ones((8, 1)), np.ones((8, 2)), np.arange(8.0), np.ones(8), cell="lstm"
    )
    np.testing.assert_array_equal(lstm["bias"], np.arange(8.0) + 1)


def test_converted_params_run_in_our_cells_float32():
    """A float32 state dict (as torch saves it) drops into rnn_jax.lstm unchanged."""
    rng = np.random.default_rng(2)
    sd = {k: v.astype(np.float32) for k, v in torch_state_dict("lstm", 3, 4, 1, False, rng).items()}
    params = convert.from_torch(sd, "lstm")["layer_0"]
    xs = rng.standard_normal((2, 5, 3)).astype(np.float32)
    _, ys = unroll(
        cells.lstm(4), jax.tree.map(jnp.asarray, params), jnp.asarray(xs), return_sequences=True
    )
    want, _ = ref.torch_forward(
        "lstm", {k: v.astype(np.float64) for k, v in sd.items()}, xs.astype(np.float64), 1, False
    )
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5)


def test_bias_free_and_bad_inputs():
    rng = np.random.default_rng(3)
    sd = torch_state_dict("gru", 3, 4, 1, False, rng)
    no_bias = {k: v for k, v in sd.items() if k.startswith("weight")}
    p = convert.from_torch(no_bias, "gru")["layer_0"]
    np.testing.assert_array_equal(p["bias"], np.zeros((2, 12)))

    with pytest.raises(ValueError, match="cell='rnn' must be one of"):
        convert.from_torch(sd, "rnn")
    with pytest.raises(ValueError, match="weight_ih_l0"):
        convert.from_torch(sd, "gru", prefix="decoder.")
    with pytest.raises(ValueError, match="weight_ih"):
        convert.from_torch(sd, "lstm")  # 3 blocks read as 4
    with pytest.raises(ValueError, match="proj_size"):
        convert.from_torch({**sd, "weight_hr_l0": np.zeros((2, 4))}, "gru")
    with pytest.raises(ValueError, match="reset_after"):
        before = cells.gru(4, reset_after=False).init(jax.random.PRNGKey(0), 3)
        convert.to_torch({"layer_0": before}, "gru")
    with pytest.raises(ValueError, match="layer_0"):
        convert.to_torch({"kernel": 1}, "gru")
