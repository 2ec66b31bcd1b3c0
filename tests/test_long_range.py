"""The vmapped task trainer against separate runs and a hand-written loop; a tiny sweep."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import cells, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS, EVAL_EVERY, BATCH = 4, 2, 3


def _trainer(name, task):
    return tasks.make_task_trainer(
        cells.CELLS[name](4), task, num_steps=STEPS, eval_every=EVAL_EVERY, batch_size=BATCH,
        learning_rate=1e-2,
    )


def test_vmap_over_seeds_and_clips_equals_separate_runs():
    # The trainer is cell-agnostic: the cheapest cell to compile will do.
    task = tasks.adding_problem(5)
    model, train = _trainer("simple_rnn", task)
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
    test_loss = jax.jit(mean_loss)
    np.testing.assert_allclose(curves.test_loss[-1], test_loss(p, *test), rtol=1e-5)
    np.testing.assert_allclose(curves.test_loss[0], test_loss(params, *test), rtol=1e-5)


def test_trainer_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        tasks.make_task_trainer(cells.gru(2), tasks.adding_problem(4), num_steps=5,
                                eval_every=2, batch_size=2)


def _launch(*args):
    return subprocess.Popen([sys.executable, "-m", "experiments.long_range", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", autouse=True)
def sweeps(tmp_path_factory):
    """A tiny sweep and one with a bad flag, started with this module so they overlap the
    in-process tests; subprocesses because absl flags are process-global."""
    workdir = tmp_path_factory.mktemp("long_range")
    procs = {
        "sweep": _launch("--task=adding", "--cells=lstm", "--lengths=4", "--seeds=2",
                         "--steps=4", "--eval_every=2", "--batch_size=4", "--test_size=16",
                         "--units=3", "--clip_norm=0.5", f"--workdir={workdir}"),
        "bad": _launch("--cells=lstm,tcn", f"--workdir={workdir / 'bad'}"),
    }
    yield procs, workdir
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_short_sweep_end_to_end_and_a_bad_flag(sweeps):
    procs, tmp_path = sweeps
    _, err = procs["bad"].communicate(timeout=300)
    assert procs["bad"].returncode != 0 and "--cells: unknown ['tcn']" in err
    out, err = procs["sweep"].communicate(timeout=300)
    assert procs["sweep"].returncode == 0, err[-2000:]
    assert "| adding | lstm | 4 | 0.5 |" in out
    results = json.load(open(tmp_path / "results.json"))
    (res,) = results["results"]
    test = np.asarray(res["test_loss"])  # (clip settings, seeds, evaluations)
    assert test.shape == (2, 2, 3)
    rows = res["rows"]
    assert [r["clip"] for r in rows] == ["none", 0.5]
    for r, curves in zip(rows, test):
        np.testing.assert_allclose(r["final_test_median"], np.median(curves[:, -1]), rtol=1e-6)
        np.testing.assert_allclose(r["baseline"], 1 / 6)
        expected = [2 * int(np.argmax(c < 0.05)) if np.any(c < 0.05) else None for c in curves]
        assert r["first_solved"] == expected
        assert 0.0 <= r["frac_above_clip"] <= 1.0
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "curves_adding.png").stat().st_size > 1000
    assert not os.path.exists(tmp_path / "bad" / "results.json")
