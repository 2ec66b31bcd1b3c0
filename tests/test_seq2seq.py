"""Encoder-decoder and one-to-many generators (rnn_jax.seq2seq) against float64 NumPy loops,
and the masked per-step losses they train with (rnn_jax.losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from rnn_jax.cells import CELLS
from rnn_jax.losses import exact_match, masked_accuracy, masked_cross_entropy, sequence_mask
from rnn_jax.seq2seq import encoder_decoder, one_to_many

CELL_NAMES = sorted(CELLS)


def random_params(init, seed, scale):
    """Random float32 params of ``init``'s shapes, large enough for argmax decisions to vary."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def reference_encoder(kind, layers, params, tokens, vocab, reverse):
    """Each layer's final carry after reading one unpadded int sequence, by NumPy loops."""
    xs = np.eye(vocab)[tokens][None]
    carries = []
    for i in range(layers):
        p = f64(params[f"layer_{i}"])
        units = p["recurrent_kernel"].shape[0]
        step = lambda c, x, p=p: ref.keras_step(kind, p, c, x)
        carry, xs = ref.run(step, ref.keras_initial_carry(kind, 1, units), xs, reverse=reverse)
        carries.append(carry)
    return carries


def reference_greedy(kind, params, carries, out_len, num_outputs):
    """Greedy tokens and logits, one example, one step and one layer at a time: each step
    reads the previous step's argmax as a one-hot over the outputs and GO (``num_outputs``)."""
    params = f64(params)
    token, tokens, logits = num_outputs, [], []
    for _ in range(out_len):
        x = np.eye(num_outputs + 1)[[token]]
        for i in range(len(carries)):
            carries[i], x = ref.keras_step(kind, params[f"layer_{i}"], carries[i], x)
        step_logits = ref.dense(params["dense"], x)[0]
        token = int(np.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
    return np.array(tokens), np.array(logits)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_encoder_decoder_greedy_matches_reference_and_teacher_forcing(name):
    input_dim, num_outputs, out_len = 5, 4, 6
    cell = CELLS[name](4)  # one set of functions; every layer has its own params
    model = encoder_decoder(
        [cell, cell], [cell, cell], input_dim, num_outputs, out_len, reverse_input=True
    )
    assert model.go == num_outputs
    params = random_params(model.init, seed=1, scale=1.5)
    tokens = np.array([[1, 2, 3, 4, 0], [4, 4, 1, 0, 0], [2, 0, 0, 0, 0]], np.int32)
    lengths = np.array([5, 3, 1], np.int32)

    greedy = np.asarray(model.generate(params, tokens, lengths))
    assert greedy.shape == (3, out_len) and greedy.dtype == np.int32
    forced = jax.jit(model.apply)(params, tokens, greedy, lengths)
    for b in range(3):
        carries = reference_encoder(
            name, 2, params["encoder"], tokens[b, : lengths[b]], input_dim, reverse=True
        )
        want_tokens, want_logits = reference_greedy(
            name, params["decoder"], carries, out_len, num_outputs
        )
        np.testing.assert_array_equal(greedy[b], want_tokens)
        # Teacher forcing on the greedy tokens reads what greedy decoding read: same logits,
        # so their argmax is the greedy output.
        np.testing.assert_allclose(forced[b], want_logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(forced[b], -1), greedy[b])
    assert len(set(greedy.reshape(-1).tolist())) > 1  # the test decodes something non-trivial


def test_encoder_reverse_input_reads_each_sequence_from_its_own_end():
    input_dim, num_outputs, out_len = 4, 3, 5
    cell = CELLS["gru"](5)
    forward = encoder_decoder([cell], [cell], input_dim, num_outputs, out_len)
    backward = encoder_decoder([cell], [cell], input_dim, num_outputs, out_len, reverse_input=True)
    params = random_params(forward.init, seed=2, scale=1.5)
    tokens = np.array([[1, 2, 3, 0], [3, 1, 0, 0]], np.int32)
    flipped = np.array([[3, 2, 1, 0], [1, 3, 0, 0]], np.int32)  # each reversed within its length
    lengths = np.array([3, 2], np.int32)
    targets = np.array([[0, 1, 2, 2, 1], [2, 2, 0, 1, 0]], np.int32)
    np.testing.assert_allclose(
        jax.jit(backward.apply)(params, tokens, targets, lengths),
        jax.jit(forward.apply)(params, flipped, targets, lengths),
        rtol=1e-5,
        atol=1e-6,
    )


def test_one_to_many_greedy_matches_reference():
    input_dim, num_outputs, out_len = 6, 5, 7
    model = one_to_many([CELLS["lstm"](4)], input_dim, num_outputs, out_len)
    params = random_params(model.init, seed=3, scale=1.5)
    vectors = np.random.default_rng(4).standard_normal((3, input_dim)).astype(np.float32)
    greedy = np.asarray(model.generate(params, vectors))
    forced = jax.jit(model.apply)(params, vectors, greedy)
    bridge_h, bridge_c = f64(params["bridge"][0])  # one tanh(Dense) per LSTM carry part
    for b in range(3):
        v = np.asarray(vectors[b : b + 1], np.float64)
        carry = (np.tanh(ref.dense(bridge_h, v)), np.tanh(ref.dense(bridge_c, v)))
        want, want_logits = reference_greedy(
            "lstm", params["decoder"], [carry], out_len, num_outputs
        )
        np.testing.assert_array_equal(greedy[b], want)
        np.testing.assert_allclose(forced[b], want_logits, rtol=1e-4, atol=1e-5)
    assert len(set(greedy.reshape(-1).tolist())) > 1


def test_generators_reject_bad_layer_counts():
    with pytest.raises(ValueError, match="as many"):
        encoder_decoder([CELLS["gru"](3)], [CELLS["gru"](3)] * 2, 4, 3, 2)
    with pytest.raises(ValueError, match="at least one"):
        one_to_many([], 4, 3, 2)


def test_masked_losses_ignore_padding():
    batch, time, classes = 3, 5, 4
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((batch, time, classes)).astype(np.float32)
    labels = rng.integers(0, classes, (batch, time)).astype(np.int32)
    lengths = np.array([5, 2, 1])
    mask = np.asarray(sequence_mask(lengths, time))
    np.testing.assert_array_equal(mask, np.arange(time)[None] < lengths[:, None])

    loss = jax.jit(masked_cross_entropy)
    got = loss(logits, labels, mask)
    nll = -np.take_along_axis(ref.log_softmax(logits.astype(np.float64)), labels[..., None], -1)[
        ..., 0
    ]
    np.testing.assert_allclose(got, [nll[b, :n].mean() for b, n in enumerate(lengths)], rtol=1e-5)

    # Other values (even NaN logits, out-of-range labels) at padded steps change nothing.
    pad = ~mask
    logits2 = np.where(pad[..., None], np.nan, logits).astype(np.float32)
    labels2 = np.where(pad, 99, labels)
    grad = jax.jit(jax.grad(lambda lg, lb: jnp.sum(masked_cross_entropy(lg, lb, mask))))
    np.testing.assert_array_equal(loss(logits2, labels2, mask), got)
    g1, g2 = grad(logits, labels), grad(logits2, labels2)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(np.asarray(g1)[pad], 0.0)

    predictions = np.where(pad, 99, labels)
    np.testing.assert_array_equal(exact_match(predictions, labels, mask), [1, 1, 1])
    np.testing.assert_array_equal(masked_accuracy(predictions, labels, mask), [1, 1, 1])
    wrong_first = predictions.copy()
    wrong_first[:, 0] = 99
    np.testing.assert_array_equal(exact_match(wrong_first, labels, mask), [0, 0, 0])
    np.testing.assert_allclose(masked_accuracy(wrong_first, labels, mask), [0.8, 0.5, 0.0])
