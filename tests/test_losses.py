"""Every loss and metric of rnn_jax.losses against float64 NumPy written from the definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import losses


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _cross_entropy(logits, labels):
    """``-log softmax(logits)[label]`` in float64, any leading shape."""
    log_p = _log_softmax(np.asarray(logits, np.float64))
    return -np.take_along_axis(log_p, np.asarray(labels)[..., None], axis=-1)[..., 0]


_STATIC = {"masked_mean": ("axis",), "sequence_mask": ("time",)}


class _Jitted:
    """``losses`` with every function jitted: one compilation per shape instead of one per
    primitive and shape, as eager dispatch would make."""

    def __getattr__(self, name):
        return jax.jit(getattr(losses, name), static_argnames=_STATIC.get(name, ()))


_jit = _Jitted()
RNG = np.random.default_rng(0)
BATCH, TIME, CLASSES = 4, 5, 6
LOGITS = RNG.standard_normal((BATCH, TIME, CLASSES)).astype(np.float32)
LABELS = RNG.integers(0, CLASSES, (BATCH, TIME)).astype(np.int32)
LENGTHS = np.array([5, 3, 1, 0], np.int32)  # full, padded, one step, empty
MASK = np.arange(TIME)[None, :] < LENGTHS[:, None]


def test_softmax_cross_entropy():
    logits, labels = LOGITS[:, 0], LABELS[:, 0]
    got = _jit.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert got.shape == (BATCH,)
    np.testing.assert_allclose(got, _cross_entropy(logits, labels), rtol=1e-6, atol=1e-6)
    # Exact values: uniform logits cost ln(classes); any leading shape works.
    uniform = _jit.softmax_cross_entropy(jnp.zeros((2, 3, 8)), jnp.zeros((2, 3), jnp.int32))
    np.testing.assert_allclose(uniform, np.full((2, 3), math.log(8)), rtol=1e-6)
    np.testing.assert_allclose(
        _jit.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS)),
        _cross_entropy(LOGITS, LABELS),
        rtol=1e-6,
        atol=1e-6,
    )
    # Large logits stay finite (log-sum-exp, not exp then log).
    big = _jit.softmax_cross_entropy(jnp.array([[1000.0, 0.0]]), jnp.array([1]))
    assert float(big[0]) == pytest.approx(1000.0)


def test_sequence_cross_entropy():
    got = _jit.sequence_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert got.shape == (BATCH,)
    want = _cross_entropy(LOGITS, LABELS).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_squared_error():
    outputs = jnp.array([[1.5], [0.0], [-2.0]])
    targets = jnp.array([1.0, 0.25, 1.0])
    got = _jit.squared_error(outputs, targets)
    assert got.shape == (3,)  # (batch, 1) against (batch,): no (batch, batch) broadcast
    np.testing.assert_array_equal(got, [0.25, 0.0625, 9.0])


def test_bits():
    assert losses.bits(math.log(2.0)) == pytest.approx(1.0, rel=1e-15)
    assert losses.bits(math.log(8.0)) == pytest.approx(3.0, rel=1e-15)
    assert losses.bits(0.0) == 0.0
    # A character model's 1.5 nats per character: 2.164 bits.
    assert losses.bits(1.5) == pytest.approx(1.5 / 0.6931471805599453, rel=1e-15)


def test_accuracy():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 2.0, 0.5]])
    labels = np.array([1, 1, 2, 0])
    got = _jit.accuracy(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(
        _jit.accuracy(jnp.asarray(LOGITS), jnp.asarray(LABELS)),
        (LOGITS.argmax(-1) == LABELS).astype(np.float32),
    )


def test_masked_mean():
    values = jnp.arange(6.0)
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    assert float(_jit.masked_mean(values, mask)) == pytest.approx((0 + 2 + 3) / 3)
    assert float(_jit.masked_mean(values, np.zeros(6, bool))) == 0.0  # none: 0, not NaN
    table = jnp.asarray(LOGITS[..., 0])
    got = _jit.masked_mean(table, MASK, axis=1)
    want = [LOGITS[b, : LENGTHS[b], 0].mean() if LENGTHS[b] else 0.0 for b in range(BATCH)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Padded entries (finite garbage here) contribute neither value nor gradient.
    garbage = jnp.where(jnp.asarray(MASK), table, 1e6)
    np.testing.assert_allclose(_jit.masked_mean(garbage, MASK, axis=1), want, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(losses.masked_mean(v, MASK, axis=1))))(garbage)
    want_grad = np.where(MASK, 1.0 / np.maximum(LENGTHS, 1)[:, None], 0.0)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)


def test_sequence_mask():
    got = _jit.sequence_mask(jnp.asarray(LENGTHS), TIME)
    assert got.dtype == jnp.bool_ and got.shape == (BATCH, TIME)
    np.testing.assert_array_equal(
        got,
        [
            [True, True, True, True, True],
            [True, True, True, False, False],
            [True, False, False, False, False],
            [False, False, False, False, False],
        ],
    )
    np.testing.assert_array_equal(_jit.sequence_mask([2], 3), [[True, True, False]])


def _garbage_padding():
    """LOGITS and LABELS with NaN, inf and out-of-range labels at every padded step."""
    logits, labels = LOGITS.copy(), LABELS.copy()
    logits[~MASK] = np.nan
    logits[1, 4, 2] = np.inf
    labels[~MASK] = 99
    return logits, labels


def test_masked_cross_entropy_value_and_gradient():
    logits, labels = _garbage_padding()
    got = _jit.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(MASK))
    per_step = _cross_entropy(LOGITS, LABELS)
    want = [per_step[b, : LENGTHS[b]].mean() if LENGTHS[b] else 0.0 for b in range(BATCH)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    # d(loss_b)/d(logits[b, t]) = (softmax - onehot) / length_b at real steps, exactly 0 at
    # padded ones (not NaN: the padding's NaN logits must not leak into the gradient).
    def total(x):
        return jnp.sum(_jit.masked_cross_entropy(x, jnp.asarray(labels), jnp.asarray(MASK)))

    grad = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(logits)))
    probs = np.exp(_log_softmax(LOGITS.astype(np.float64)))
    onehot = np.eye(CLASSES)[LABELS]
    scale = np.where(MASK, 1.0 / np.maximum(LENGTHS, 1)[:, None], 0.0)
    np.testing.assert_allclose(grad, (probs - onehot) * scale[..., None], rtol=1e-5, atol=1e-7)
    assert np.all(grad[~MASK] == 0.0)


def test_masked_accuracy():
    _, labels = _garbage_padding()
    predictions = np.where(MASK, LOGITS.argmax(-1), 0)
    predictions[0, 1] = (LABELS[0, 1] + 1) % CLASSES  # one wrong step in the full row
    predictions[1, :3] = LABELS[1, :3]  # the padded row right at every real step
    got = _jit.masked_accuracy(jnp.asarray(predictions), jnp.asarray(labels), jnp.asarray(MASK))
    hits = (predictions == LABELS) & MASK
    want = [hits[b].sum() / LENGTHS[b] if LENGTHS[b] else 0.0 for b in range(BATCH)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(got[1]) == 1.0 and float(got[3]) == 0.0


def test_exact_match():
    predictions = LABELS.copy()
    predictions[~MASK] = (LABELS[~MASK] + 1) % CLASSES  # wrong at every padded step: ignored
    mask = jnp.asarray(MASK)
    got = _jit.exact_match(jnp.asarray(predictions), jnp.asarray(LABELS), mask)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0, 1.0])  # the empty row is vacuously right
    predictions[1, 2] = (LABELS[1, 2] + 1) % CLASSES  # wrong at the last real step of row 1
    predictions[2, 0] = (LABELS[2, 0] + 1) % CLASSES  # and at the only real step of row 2
    got = _jit.exact_match(jnp.asarray(predictions), jnp.asarray(LABELS), mask)
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 1.0])
