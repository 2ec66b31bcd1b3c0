"""Task generators: structure, and their analytic baselines checked by sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, tasks


def test_adding_structure():
    xs, targets = map(np.asarray, tasks.adding_batch(jax.random.PRNGKey(0), 500, 9))
    assert xs.shape == (500, 9, 2) and xs.dtype == np.float32 and targets.shape == (500,)
    values, markers = xs[..., 0], xs[..., 1]
    assert np.all((values >= 0) & (values < 1))
    assert np.all(markers.sum(axis=1) == 2)
    first, second = (np.sort(np.nonzero(markers)[1].reshape(500, 2), axis=1)).T
    assert first.max() < 4 <= second.min()  # one mark in each half
    assert len(np.unique(first)) == 4 and len(np.unique(second)) == 5
    rows = np.arange(500)
    np.testing.assert_allclose(targets, values[rows, first] + values[rows, second], rtol=1e-6)


def test_adding_baseline_by_sampling():
    _, targets = tasks.adding_batch(jax.random.PRNGKey(1), 200_000, 20)
    errors = (np.asarray(targets, np.float64) - 1.0) ** 2
    stderr = errors.std() / math.sqrt(errors.size)
    assert abs(errors.mean() - tasks.adding_baseline()) < 4 * stderr
    assert abs(tasks.adding_baseline() - 1 / 6) < 1e-15
    # 1.0 is the best constant: the sample mean of the targets.
    assert abs(np.mean(targets) - 1.0) < 4 * math.sqrt(1 / 6 / targets.size)


def test_copy_structure():
    delay, n = 7, 300
    xs, targets = map(np.asarray, tasks.copy_batch(jax.random.PRNGKey(2), n, delay))
    assert xs.shape == targets.shape == (n, delay + 20)
    symbols = xs[:, :10]
    assert symbols.min() == 1 and symbols.max() == 8
    assert np.all(xs[:, 10 : 10 + delay - 1] == 0)
    assert np.all(xs[:, 9 + delay] == 9)  # the cue, one step before the recall
    assert np.all(xs[:, 10 + delay :] == 0)
    assert np.all(targets[:, : delay + 10] == 0)
    np.testing.assert_array_equal(targets[:, delay + 10 :], symbols)


def test_copy_baseline_by_sampling():
    delay = 15
    task = tasks.copy_task(delay)
    assert task.length == delay + 20
    np.testing.assert_allclose(task.baseline, 10 * math.log(8) / (delay + 20), rtol=1e-15)
    _, targets = task.sample(jax.random.PRNGKey(3), 40_000)
    targets = np.asarray(targets)
    # The best memoryless predictor is each position's marginal; its cross-entropy is the
    # mean over positions of the empirical entropies.
    entropy = 0.0
    for t in range(task.length):
        p = np.bincount(targets[:, t], minlength=9) / len(targets)
        entropy -= np.sum(p[p > 0] * np.log(p[p > 0]))
    np.testing.assert_allclose(entropy / task.length, task.baseline, rtol=2e-3)
    # Through the task's loss: blanks for sure, then uniform over the 8 symbols.
    logits = np.full((len(targets), task.length, 9), -1e9, np.float32)
    logits[:, : delay + 10, 0] = 0.0
    logits[:, delay + 10 :, 1:] = 0.0
    np.testing.assert_allclose(np.mean(task.loss(logits, targets)), task.baseline, rtol=1e-5)


def test_tasks_are_seeded():
    for task in (tasks.adding_problem(6), tasks.copy_task(4)):
        a = task.sample(jax.random.PRNGKey(7), 5)
        b = task.sample(jax.random.PRNGKey(7), 5)
        c = task.sample(jax.random.PRNGKey(8), 5)
        jax.tree.map(np.testing.assert_array_equal, a, b)
        assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "task", [tasks.adding_problem(6), tasks.copy_task(3)], ids=["adding", "copy"]
)
def test_task_model_shapes_and_loss(task):
    model = tasks.task_model(cells.gru(4), task)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    xs, targets = task.sample(jax.random.PRNGKey(1), 3)
    outputs = jax.jit(model.apply)(params, xs)
    expected = (3, task.length, task.output_dim) if task.return_sequences else (3, task.output_dim)
    assert outputs.shape == expected
    losses = task.loss(outputs, targets)
    assert losses.shape == (3,)
    if task.name == "adding":
        np.testing.assert_allclose(losses, (outputs[:, 0] - targets) ** 2, rtol=1e-6)
    else:
        logp = jax.nn.log_softmax(outputs)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(losses, nll.mean(axis=1), rtol=1e-5)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="length >= 2"):
        tasks.adding_batch(jax.random.PRNGKey(0), 1, 1)
    with pytest.raises(ValueError, match="delay >= 1"):
        tasks.copy_batch(jax.random.PRNGKey(0), 1, 0)
