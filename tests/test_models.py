"""Layers and heads (rnn_jax.models) against float64 NumPy loops over each unpadded sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax.cells import CELLS
from rnn_jax.models import (
    bidirectional,
    dense,
    dense_init,
    recurrent,
    sequence_classifier,
    sequence_tagger,
    stacked,
)

CELL_NAMES = sorted(CELLS)
TOL = dict(rtol=2e-5, atol=2e-6)


def random_params(init, *args, seed=0, scale=0.7):
    """Random float32 params of ``init(key, *args)``'s shapes, biases included, so that every
    term of a step matters (drawn by NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init(key, *args), jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def reference_scan(kind, params, xs, reverse=False):
    """``(final carry, ys (time, units))`` of one unpadded sequence ``xs (time, in)``."""
    p = f64(params)
    units = p["recurrent_kernel"].shape[0]
    carry, ys = ref.run(
        lambda c, x: ref.keras_step(kind, p, c, x),
        ref.keras_initial_carry(kind, 1, units),
        np.asarray(xs, np.float64)[None],
        reverse=reverse,
    )
    return carry, ys[0]


def carry_leaves(carry):
    """Our carry (an array or LSTMCarry(h, c)) or the reference's ((h, c) or h) as a list."""
    return list(carry) if isinstance(carry, tuple) else [carry]


@pytest.mark.parametrize("name", CELL_NAMES)
def test_bidirectional_with_lengths_equals_each_sequence_alone_and_flipped(name):
    layer = bidirectional(CELLS[name](3), CELLS[name](3))
    batch, time, input_dim = 3, 5, 2
    lengths = np.array([5, 3, 1])
    params = random_params(layer.init, input_dim)
    xs = normal(1, (batch, time, input_dim))
    apply = jax.jit(layer.apply, static_argnames="return_sequences")
    (carry_f, carry_b), ys = apply(params, xs, lengths=lengths, return_sequences=True)
    _, last = apply(params, xs, lengths=lengths)
    assert layer.units == 6 and ys.shape == (batch, time, 6) and last.shape == (batch, 6)

    for b, n in enumerate(lengths):
        seq = np.asarray(xs[b, :n])
        cf, yf = reference_scan(name, params["forward"], seq)
        # The backward direction is the forward recurrence over the flipped sequence alone,
        # its outputs flipped back into input order: step t has read x_{n-1} .. x_t.
        cb, yb_flipped = reference_scan(name, params["backward"], seq[::-1])
        yb = yb_flipped[::-1]
        _, yb_reverse = reference_scan(name, params["backward"], seq, reverse=True)
        np.testing.assert_allclose(yb, yb_reverse, rtol=1e-12)
        np.testing.assert_allclose(ys[b, :n], np.concatenate([yf, yb], -1), **TOL)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
        np.testing.assert_allclose(last[b], np.concatenate([yf[-1], yb[0]]), **TOL)
        ours = carry_leaves(carry_f) + carry_leaves(carry_b)
        for got, want in zip(ours, carry_leaves(cf) + carry_leaves(cb), strict=True):
            np.testing.assert_allclose(got[b], want[0], **TOL)

    # The padding's values reach nothing.
    valid = (np.arange(time)[None, :] < lengths[:, None])[..., None]
    _, ys2 = apply(
        params, np.where(valid, xs, normal(2, xs.shape)), lengths=lengths, return_sequences=True
    )
    np.testing.assert_array_equal(ys, ys2)


def test_recurrent_reverse_with_lengths_reads_each_sequence_from_its_own_end():
    layer = recurrent(CELLS["lstm"](3), reverse=True)
    tokens = jnp.array([[1, 2, 3, 0], [3, 1, 0, 0]])  # int tokens, read as one-hot rows
    lengths = np.array([3, 2])
    params = random_params(layer.init, 4)
    carry, last = jax.jit(layer.apply)(params, tokens, lengths=lengths)
    onehot = np.eye(4)[np.asarray(tokens)]
    for b, n in enumerate(lengths):
        (h, c), ys = reference_scan("lstm", params, onehot[b, :n][::-1])
        np.testing.assert_allclose(last[b], ys[-1], **TOL)  # step 0's output, read last
        np.testing.assert_allclose(carry.h[b], h[0], **TOL)
        np.testing.assert_allclose(carry.c[b], c[0], **TOL)


def test_bidirectional_sum_merge_and_bad_merge():
    cell = CELLS["gru"](4)
    concat = bidirectional(cell)
    summed = bidirectional(cell, merge="sum")
    params = random_params(concat.init, 3)
    xs = normal(1, (2, 4, 3))
    _, ys_c = concat.apply(params, xs, return_sequences=True)
    _, ys_s = summed.apply(params, xs, return_sequences=True)
    np.testing.assert_allclose(ys_s, ys_c[..., :4] + ys_c[..., 4:], rtol=1e-6)
    assert summed.units == 4 and concat.units == 8
    with pytest.raises(ValueError, match="merge"):
        bidirectional(cell, merge="mean")
    with pytest.raises(ValueError, match="concat"):
        bidirectional(cell, CELLS["gru"](5), merge="sum")


def test_stacked_feeds_each_layer_the_sequence_below():
    cells = [CELLS["lstm"](4), CELLS["simple_rnn"](3)]
    layer = stacked([recurrent(c) for c in cells])
    assert layer.units == 3
    params = random_params(layer.init, 2)
    tokens = jnp.array([[0, 1, 1, 0], [1, 0, 0, 0]])
    lengths = np.array([4, 2])
    carries, last = jax.jit(layer.apply)(params, tokens, lengths=lengths)
    onehot = np.eye(2)[np.asarray(tokens)]
    for b, n in enumerate(lengths):
        (h0, c0), ys0 = reference_scan("lstm", params["layer_0"], onehot[b, :n])
        h1, ys1 = reference_scan("simple_rnn", params["layer_1"], ys0)
        np.testing.assert_allclose(last[b], ys1[-1], **TOL)
        np.testing.assert_allclose(carries[0].h[b], h0[0], **TOL)
        np.testing.assert_allclose(carries[0].c[b], c0[0], **TOL)
        np.testing.assert_allclose(carries[1][b], h1[0], **TOL)
    with pytest.raises(ValueError, match="at least one"):
        stacked([])


def test_dense_is_keras_dense():
    params = dense_init(jax.random.PRNGKey(0), 300, 200)
    limit = np.sqrt(6 / (300 + 200))  # glorot uniform
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (300, 200) and np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.99 * limit and abs(kernel.mean()) < 0.01 * limit
    np.testing.assert_allclose(kernel.var(), limit**2 / 3, rtol=0.02)  # U(-l, l): l²/3
    np.testing.assert_array_equal(params["bias"], np.zeros(200))
    params = random_params(dense_init, 300, 200)
    x = normal(2, (5, 300))
    np.testing.assert_allclose(
        dense(params, x), ref.dense(f64(params), f64(x)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("head", ["classifier", "tagger"])
def test_heads_read_each_sequences_own_steps(head):
    cell = CELLS["gru"](3)
    build = sequence_classifier if head == "classifier" else sequence_tagger
    model = build(cell, 4, 2)  # a bare cell: run by recurrent()
    params = random_params(model.init)
    assert set(params) == {"rnn", "dense"}
    tokens = jnp.array([[1, 2, 3, 0], [3, 3, 0, 0]])
    lengths = np.array([3, 2])
    logits = jax.jit(model.apply)(params, tokens, lengths)
    onehot = np.eye(4)[np.asarray(tokens)]
    for b, n in enumerate(lengths):
        _, ys = reference_scan("gru", params["rnn"], onehot[b, :n])
        want = ref.dense(f64(params["dense"]), ys)
        got = logits[b] if head == "classifier" else logits[b, :n]
        np.testing.assert_allclose(got, want[-1] if head == "classifier" else want, **TOL)


def test_tagger_and_classifier_ignore_padded_tokens():
    layer = stacked([bidirectional(CELLS["gru"](3)), recurrent(CELLS["lstm"](2))])
    tagger = sequence_tagger(layer, 4, 3)
    classifier = sequence_classifier(layer, 4, 2)
    tokens = jnp.array([[1, 2, 3, 0], [3, 3, 0, 0]])
    other = jnp.array([[1, 2, 3, 2], [3, 3, 1, 2]])
    lengths = jnp.array([3, 2])
    p_t, p_c = random_params(tagger.init), random_params(classifier.init)
    tag, classify = jax.jit(tagger.apply), jax.jit(classifier.apply)
    a, b = tag(p_t, tokens, lengths), tag(p_t, other, lengths)
    assert a.shape == (2, 4, 3)
    mask = np.arange(4)[None] < np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(a)[mask], np.asarray(b)[mask])
    np.testing.assert_array_equal(classify(p_c, tokens, lengths), classify(p_c, other, lengths))
