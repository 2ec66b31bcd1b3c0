"""Our cells against the real Keras 3 and PyTorch layers, via ``tests/golden/keras_torch.npz``.

The file holds each library's inputs, weights (in its own layout), initial state, every output
step and final state; ``tests/golden/make_golden.py`` wrote it and CI only reads it.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn_jax

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "keras_torch.npz")
UNITS = 4

# case -> (cell constructor, name for rnn_jax.from_torch, or None for Keras-layout weights)
CASES = {
    "keras_simple_rnn": (rnn_jax.simple_rnn, None),
    "keras_lstm": (rnn_jax.lstm, None),
    "keras_gru_reset_after": (lambda u: rnn_jax.gru(u, reset_after=True), None),
    "keras_gru_reset_before": (lambda u: rnn_jax.gru(u, reset_after=False), None),
    "torch_rnn": (rnn_jax.simple_rnn, "simple_rnn"),
    "torch_lstm": (rnn_jax.lstm, "lstm"),
    "torch_gru": (rnn_jax.gru, "gru"),
}


def _load(case: str) -> dict[str, np.ndarray]:
    """The arrays of one case, keys without the ``"<case>/"`` prefix."""
    with np.load(GOLDEN) as golden:
        prefix = f"{case}/"
        return {k[len(prefix) :]: golden[k] for k in golden.files if k.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_library(case):
    """Every output step and the final state match the library's, from the same weights."""
    make_cell, torch_name = CASES[case]
    data = _load(case)
    weights = {k[len("w/") :]: v for k, v in data.items() if k.startswith("w/")}
    if torch_name is None:
        params = weights
    else:
        params = rnn_jax.from_torch(weights, torch_name)["layer_0"]
    # PyTorch states carry a leading num_layers axis of 1.
    states = {k: data[k].reshape(-1, UNITS) for k in ("h0", "c0", "h", "c") if k in data}
    carry = rnn_jax.LSTMCarry(states["h0"], states["c0"]) if "c0" in data else states["h0"]
    params, carry = jax.tree.map(jnp.asarray, (params, carry))

    final, ys = rnn_jax.unroll(
        make_cell(UNITS), params, jnp.asarray(data["x"]), carry, return_sequences=True
    )

    assert np.abs(data["out"]).max() > 0.05
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys, data["out"], **tol)
    if "c" in data:
        np.testing.assert_allclose(final.h, states["h"], **tol)
        np.testing.assert_allclose(final.c, states["c"], **tol)
    else:
        np.testing.assert_allclose(final, states["h"], **tol)
