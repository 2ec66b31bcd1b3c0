"""The sampler: stub cells with known outputs, real cells against the rolling-window loop (the
ring buffer of windows at its edges), vmap, temperature, and its argmax against jnp.argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax import cells
from rnn_jax.models import sequence_classifier
from rnn_jax.sample import _argmax, make_sampler

V = 7


def _token_cell(recur, initial):
    """A stub cell over ``V`` one-hot tokens whose carry is a one-hot ``(batch, V)``."""
    project = lambda params, x: jax.nn.one_hot(x, V) if jnp.issubdtype(x.dtype, jnp.integer) else x
    return cells.Cell(
        init=lambda key, input_dim: {},
        initial_carry=lambda batch: jax.nn.one_hot(jnp.full((batch,), initial), V),
        step=lambda p, c, x: recur(p, c, project(p, x)),
        project=project,
        recur=recur,
        units=V,
        hidden=lambda carry: carry,
    )


def _last_token_cell():
    """Carry = the last token read; with a ``+1`` dense head the next token is ``current + 1``."""
    return _token_cell(lambda params, carry, z: (z, z), initial=0)


def _window_sum_cell():
    """Carry = one-hot of (sum of the tokens read) mod V: depends on the whole window."""
    shift = (np.arange(V)[:, None] - np.arange(V)[None, :]) % V  # [k, j] = (k - j) mod V

    def recur(_params, carry, z):
        new = jnp.einsum("...j,...kj->...k", carry, z[..., shift])
        return new, new

    return _token_cell(recur, initial=0)


def _head(shift):
    """Dense params mapping one-hot(i) to logits peaked at (i + shift) mod V."""
    return {"kernel": jnp.asarray(np.roll(np.eye(V), shift, axis=1)), "bias": jnp.zeros(V)}


def test_stub_next_is_current_plus_one():
    sample = make_sampler(_last_token_cell(), num_chars=12)
    seeds = jnp.array([[3, 1, 4, 1, 5], [0, 0, 0, 0, 6]])
    out = sample({"rnn": {}, "dense": _head(1)}, seeds, jax.random.PRNGKey(0))
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out[0], (6 + np.arange(12)) % V)
    np.testing.assert_array_equal(out[1], (7 + np.arange(12)) % V)


@pytest.mark.parametrize("seq_len", [1, 4])
def test_stub_window_sum_rolls_exactly_seq_len(seq_len):
    """Next token = sum of the current window mod V: wrong window bookkeeping changes the output."""
    params = {"rnn": {}, "dense": _head(0)}
    seeds = np.random.default_rng(seq_len).integers(0, V, (3, seq_len))
    out = make_sampler(_window_sum_cell(), num_chars=20)(params, jnp.asarray(seeds))
    for seed, got in zip(seeds, np.asarray(out), strict=True):
        want, window = [], list(seed)
        for _ in range(20):
            want.append(sum(window) % V)
            window = window[1:] + [want[-1]]
        assert got.tolist() == want


def _trained_like(name, seed):
    """A real classifier, every param random (GRU's recurrent bias reaches the sampler's
    peeled first step), weights large enough that the greedy path visits many tokens."""
    cell = cells.CELLS[name](16)
    model = sequence_classifier(cell, V, V)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
    # Strong input and output weights: the greedy path then moves between many tokens.
    params["rnn"]["kernel"] = 4.0 * params["rnn"]["kernel"]
    params["dense"] = {"kernel": 3.0 * params["dense"]["kernel"], "bias": jnp.zeros(V)}
    return cell, model, params


# (cell, window length): the ring buffer holds T - 1 rows; 1 and 2 rows are its edge cases.
@pytest.mark.parametrize("name,seq_len", [("simple_rnn", 6), ("lstm", 3), ("gru", 2), ("gru", 6)])
def test_real_cells_match_rolling_window_reference(name, seq_len):
    """The ring buffer of windows against re-running the model on each rolled window."""
    cell, model, params = _trained_like(name, seed=0)
    seeds = jnp.asarray(np.random.default_rng(1).integers(0, V, (4, seq_len)))
    num_chars = 15
    out = np.asarray(make_sampler(cell, num_chars)(params, seeds))
    predict = jax.jit(lambda window: model.apply(params, window[None])[0])
    for seed, got in zip(np.asarray(seeds), out, strict=True):
        want = ref.greedy_rolling(
            lambda w: np.asarray(predict(jnp.asarray(w))), seed.tolist(), num_chars
        )
        assert got.tolist() == want
    assert len(set(out.ravel().tolist())) > 2  # the test would see a broken roll


def test_vmap_over_seeds_equals_per_seed_calls():
    cell, _, params = _trained_like("lstm", seed=2)
    seeds = jnp.asarray(np.random.default_rng(3).integers(0, V, (5, 4)))
    sample = make_sampler(cell, 9)
    batched = np.asarray(sample(params, seeds, jax.random.PRNGKey(4)))
    for i in range(5):
        np.testing.assert_array_equal(batched[i], sample(params, seeds[i : i + 1])[0])
    assert len({tuple(row) for row in batched}) > 1


def test_temperature_sampling():
    cell, model, params = _trained_like("gru", seed=5)
    # The first draw follows softmax(logits / T): frequencies over many copies of one seed.
    seeds = jnp.tile(jnp.arange(4)[None], (4000, 1))
    hot = make_sampler(cell, 3, temperature=2.0)
    a = np.asarray(hot(params, seeds, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(a, hot(params, seeds, jax.random.PRNGKey(0)))
    assert not np.array_equal(a, hot(params, seeds, jax.random.PRNGKey(1)))
    assert a.min() >= 0 and a.max() < V
    logits = np.asarray(jax.jit(model.apply)(params, seeds[:1])[0], np.float64) / 2.0
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(np.bincount(a[:, 0], minlength=V) / len(a), probs, atol=0.03)
    assert len({tuple(row) for row in a}) > 5  # identical seeds, different continuations


def test_bad_arguments():
    cell = cells.simple_rnn(4)
    with pytest.raises(ValueError, match="num_chars"):
        make_sampler(cell, 0)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(cell, 5, temperature=-1.0)


def test_argmax_is_jnp_argmax():
    """Ties give the first maximum, NaN gives the first NaN, as ``jnp.argmax``."""
    rng = np.random.default_rng(4)
    logits = rng.integers(0, 4, (200, 6)).astype(np.float32)  # many ties
    logits[rng.random(200) < 0.2, 2] = np.nan
    logits[rng.random(200) < 0.2, 4] = np.nan
    logits[rng.random(200) < 0.2, 0] = -np.inf
    np.testing.assert_array_equal(_argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
