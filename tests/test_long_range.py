"""The vmapped task trainer against separate runs and a hand-written loop; a tiny sweep."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import long_range
from rnn_jax import cells, tasks

STEPS, EVAL_EVERY, BATCH = 4, 2, 3


def _trainer(name, task):
    return tasks.make_task_trainer(
        cells.CELLS[name](4), task, num_steps=STEPS, eval_every=EVAL_EVERY, batch_size=BATCH,
        learning_rate=1e-2,
    )


def test_vmap_over_seeds_and_clips_equals_separate_runs():
    # The trainer is cell-agnostic; LSTM's two-part carry is the most structured case.
    task = tasks.adding_problem(5)
    model, train = _trainer("lstm", task)
    seeds = jax.random.split(jax.random.PRNGKey(0), 2)
    params = jax.vmap(model.init)(seeds)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    clips = jnp.array([jnp.inf, 0.05])
    test = task.sample(jax.random.PRNGKey(2), 8)
    over_seeds = jax.vmap(train, in_axes=(0, 0, None, None, None))
    vmapped = jax.jit(jax.vmap(over_seeds, in_axes=(None, None, 0, None, None)))(
        params, keys, clips, *test
    )
    one = jax.jit(train)
    for c in range(2):
        for s in range(2):
            alone = one(jax.tree.map(lambda a: a[s], params), keys[s], clips[c], *test)
            jax.tree.map(
                lambda v, a: np.testing.assert_allclose(v[c, s], a, rtol=1e-5, atol=1e-6),
                vmapped, alone,
            )
    # Clipping changed the runs, and the recorded norms are the pre-clip ones.
    final_params, curves = vmapped
    assert not np.allclose(final_params["dense"]["kernel"][0], final_params["dense"]["kernel"][1])
    np.testing.assert_allclose(curves.grad_norm[0, :, 0], curves.grad_norm[1, :, 0], rtol=1e-6)
    assert np.all(curves.grad_norm[1] > 0.05)


def test_trainer_equals_a_hand_written_clipped_adam_loop():
    task = tasks.copy_task(3, num_symbols=3, copy_length=2)
    model, train = _trainer("gru", task)
    params = model.init(jax.random.PRNGKey(0))
    key, clip = jax.random.PRNGKey(5), 0.3
    test = task.sample(jax.random.PRNGKey(6), 8)
    got_params, curves = jax.jit(train)(params, key, clip, *test)

    # The loop the trainer must equal: the batches come from the key's split, as documented.
    def mean_loss(p, xs, ys):
        logits = model.apply(p, xs)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), ys[..., None], -1))

    opt = optax.adam(1e-2)
    state = opt.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(mean_loss))
    update = jax.jit(opt.update)
    batch_keys = jax.random.split(jax.random.split(key)[0], STEPS)
    p, losses, norms = params, [], []
    for k in batch_keys:
        xs, ys = task.sample(k, BATCH)
        loss, grads = value_and_grad(p, xs, ys)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * min(1.0, clip / norm), grads)
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        losses.append(loss)
        norms.append(norm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got_params, p)
    np.testing.assert_allclose(curves.train_loss, losses, rtol=1e-5)
    np.testing.assert_allclose(curves.grad_norm, norms, rtol=1e-5)
    assert curves.test_loss.shape == (STEPS // EVAL_EVERY + 1,)
    np.testing.assert_allclose(curves.test_loss[-1], mean_loss(p, *test), rtol=1e-5)
    np.testing.assert_allclose(curves.test_loss[0], mean_loss(params, *test), rtol=1e-5)


def test_trainer_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        tasks.make_task_trainer(cells.gru(2), tasks.adding_problem(4), num_steps=5,
                                eval_every=2, batch_size=2)


def test_first_solved():
    curves = np.array([[0.2, 0.1, 0.04, 0.01], [0.2, 0.2, 0.2, 0.2]])
    assert long_range.first_solved(curves, 0.05, 10) == [20, None]


def test_short_sweep_end_to_end(tmp_path):
    lines = []
    rows = long_range.sweep(
        "adding", ["lstm"], [4], seeds=2, steps=4, eval_every=2, batch_size=4,
        test_size=16, units=3, learning_rate=1e-2, optimizer="adam", clip_norm=0.5, seed=0,
        workdir=str(tmp_path), out=lines.append,
    )
    assert [(r["cell"], r["clip"]) for r in rows] == [("lstm", "none"), ("lstm", 0.5)]
    results = json.load(open(tmp_path / "results.json"))
    for r, res in zip(rows[::2], results["results"]):
        test = np.asarray(res["test_loss"])  # (clips, seeds, evals)
        assert test.shape == (2, 2, 3)
        np.testing.assert_allclose(r["final_test_median"], np.median(test[0, :, -1]), rtol=1e-6)
        np.testing.assert_allclose(r["baseline"], 1 / 6)
        assert 0.0 <= r["frac_above_clip"] <= 1.0
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "curves_adding.png").stat().st_size > 1000
    assert "| adding | lstm | 4 | 0.5 |" in lines[-1]
