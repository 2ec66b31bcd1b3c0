"""The batching strategies' plans and takes: shuffled epochs (a permutation, then the Feistel
shuffle beyond 2**20 examples), draws with replacement, windows in order, generated batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import batches


def _take_all(strategy, key, data=None):
    """Every step's ``(batch, weights)`` of one call, stacked: the plan and take of one call."""

    @jax.jit
    def run(key):
        plan = strategy.plan(key, data)
        return jax.lax.map(lambda i: strategy.take(plan, data, i), jnp.arange(strategy.num_steps))

    return jax.device_get(run(key))


def test_shuffle_is_a_deterministic_permutation_with_last_batch_kept():
    epoch = batches.shuffled_epoch(lambda d, idx: idx, 10, 4)
    assert epoch.num_steps == 3
    idx, w = _take_all(epoch, jax.random.PRNGKey(7))
    assert idx.shape == (3, 4) and w.tolist() == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    real = idx[w > 0]
    assert sorted(real.tolist()) == list(range(10))  # every example exactly once
    assert idx[2, 2:].tolist() == [0, 0]  # padding rows: example 0 at weight 0
    # Up to 2**20 examples the order is jax.random.permutation of the key.
    np.testing.assert_array_equal(real, jax.random.permutation(jax.random.PRNGKey(7), 10))
    idx2, _ = _take_all(epoch, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(idx, idx2)
    idx3, _ = _take_all(epoch, jax.random.PRNGKey(8))
    assert not np.array_equal(real, idx3[w > 0])
    ordered_epoch = batches.shuffled_epoch(lambda d, i: i, 10, 4, shuffle=False)
    ordered, w_ordered = _take_all(ordered_epoch, None)
    assert ordered.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert w_ordered.tolist() == w.tolist()
    assert batches.shuffled_epoch(lambda d, i: i, 10, 4, num_batches=2).num_steps == 2
    assert batches.shuffled_epoch(lambda d, i: i, 10, 4, num_batches=9).num_steps == 3
    for kwargs, name in [
        (dict(num_examples=0, batch_size=4), "num_examples=0"),
        (dict(num_examples=10, batch_size=0), "batch_size=0"),
        (dict(num_examples=10, batch_size=4, num_batches=0), "num_batches=0"),
    ]:
        with pytest.raises(ValueError, match=name):
            batches.shuffled_epoch(lambda d, i: i, **kwargs)


def test_large_epoch_is_a_feistel_permutation():
    """Beyond 2**20 examples: the keyed Feistel shuffle, still every example exactly once."""
    n, batch_size = (1 << 20) + 3, 1 << 18
    assert n > batches._PERMUTATION_MAX
    epoch = batches.shuffled_epoch(lambda d, idx: idx, n, batch_size)
    assert epoch.num_steps == 5
    idx, w = _take_all(epoch, jax.random.PRNGKey(3))
    assert w[:4].min() == 1.0 and w[4].sum() == 3.0  # the last batch holds the 3 left over
    real = idx[w > 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    # A shuffle: no trace of the input order; another key, another order.
    assert np.mean(real == np.arange(n)) < 1e-3
    assert abs(np.corrcoef(np.arange(n, dtype=np.float64), real)[0, 1]) < 0.01
    other, _ = _take_all(epoch, jax.random.PRNGKey(4))
    assert np.mean(other[w > 0] == real) < 1e-3


def test_with_replacement_draws_uniformly_in_range():
    n, batch_size, steps = 10, 1000, 10
    draws = batches.with_replacement(lambda d, idx: idx, n, batch_size, steps)
    assert draws.num_steps == steps
    idx, w = _take_all(draws, jax.random.PRNGKey(0))
    assert idx.shape == (steps, batch_size) and np.all(w == 1.0)
    assert idx.min() >= 0 and idx.max() < n
    counts = np.bincount(idx.ravel(), minlength=n)
    # Pearson's chi-square with 9 degrees of freedom: P(chi2 > 33.7) = 1e-4 when uniform.
    chi2 = np.sum((counts - idx.size / n) ** 2 / (idx.size / n))
    assert chi2 < 33.7, counts
    # Independent draws: each step's batch differs from the next.
    assert not np.array_equal(idx[0], idx[1])
    with pytest.raises(ValueError, match="num_steps=0"):
        batches.with_replacement(lambda d, i: i, n, batch_size, 0)


def test_with_replacement_weighted_and_keyed():
    """``weighted``: the weights are get_batch's own; ``with_keys``: step ``i``'s batch comes with
    a key of its own (``fold_in`` of the plan's step key with ``i``), the same for the same
    plan key, so a pass split into calls draws the same."""
    n, batch_size, steps = 50, 6, 4

    def get_batch(_data, idx):
        return idx, 2.0 * idx.astype(jnp.float32)

    draws = batches.with_replacement(get_batch, n, batch_size, steps, weighted=True)
    idx, w = _take_all(draws, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(w, 2.0 * idx)
    keyed = batches.with_replacement(get_batch, n, batch_size, steps, weighted=True, with_keys=True)
    (kidx, keys), kw = _take_all(keyed, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(kw, 2.0 * kidx)
    assert kidx.min() >= 0 and kidx.max() < n
    assert len({tuple(k) for k in np.asarray(keys)}) == steps  # a key per step
    (again, keys2), _ = _take_all(keyed, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(again, kidx)
    np.testing.assert_array_equal(keys2, keys)
    (other, _), _ = _take_all(keyed, jax.random.PRNGKey(1))
    assert not np.array_equal(other, kidx)


def test_in_order_takes_batch_k_at_step_k_and_folds_its_key():
    """Step ``k`` takes ``get_batch(data, k)`` whatever the key; with keys, the batch comes
    with ``fold_in(pass key, k)``, the pass key being the plan's key itself."""
    data = jnp.arange(12.0).reshape(4, 3)

    def get_batch(d, k):
        return d[k], jnp.array([1.0, 1.0, 0.0])

    plain = batches.in_order(get_batch, 4)
    rows, w = _take_all(plain, jax.random.PRNGKey(1), data)
    np.testing.assert_array_equal(rows, np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(w, np.tile([1.0, 1.0, 0.0], (4, 1)))
    again, _ = _take_all(plain, jax.random.PRNGKey(2), data)  # the same every pass
    np.testing.assert_array_equal(again, rows)

    keyed = batches.in_order(get_batch, 4, with_keys=True)
    (rows, keys), _ = _take_all(keyed, jax.random.PRNGKey(1), data)
    np.testing.assert_array_equal(rows, np.arange(12.0).reshape(4, 3))
    for k in range(4):
        np.testing.assert_array_equal(keys[k], jax.random.fold_in(jax.random.PRNGKey(1), k))
    with pytest.raises(ValueError, match="num_steps=0"):
        batches.in_order(get_batch, 0)


def test_generated_batches_come_from_the_split_plan_key():
    """Step ``i``'s batch is ``sample(split(key, num_steps)[i], batch_size)``, all weights 1."""

    def sample(key, batch_size):
        return jax.random.uniform(key, (batch_size, 2))

    strategy = batches.generated(sample, 3, 4)
    xs, w = _take_all(strategy, jax.random.PRNGKey(5))
    assert xs.shape == (4, 3, 2) and np.all(w == 1.0)
    for i, k in enumerate(jax.random.split(jax.random.PRNGKey(5), 4)):
        np.testing.assert_array_equal(xs[i], sample(k, 3))
    with pytest.raises(ValueError, match="batch_size=0"):
        batches.generated(sample, 0, 4)
