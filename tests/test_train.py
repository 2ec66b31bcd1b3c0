"""RMSprop and clipping against their formulas, the update engine against loops of apply_update
and hand sums, fit."""

import functools
import itertools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from helpers import assert_bit_identical

from rnn_jax import batches, cells, checkpoint, loop, metrics, optim, rundir, synthetic, train
from rnn_jax.losses import accuracy, softmax_cross_entropy
from rnn_jax.models import recurrent, sequence_classifier
from rnn_jax.workdir import WorkdirError

VOCAB, SEQ_LEN = 7, 5


def _gather(data, indices):
    return jax.tree.map(lambda a: a[indices], data)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- RMSprop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_rmsprop_matches_formula(eps_in_sqrt):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}
    # Gradients small enough that epsilon's placement changes the update.
    grads = [{k: 3e-4 * rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    lr, rho, eps = 1e-3, 0.9, 1e-7
    want = ref.rmsprop(params, grads, lr, rho, eps, eps_in_sqrt)
    other = ref.rmsprop(params, grads, lr, rho, eps, not eps_in_sqrt)
    assert max(np.max(np.abs(want[k] - other[k])) for k in want) > 1e-5
    with jax.enable_x64(True):
        opt = optim.rmsprop(eps_in_sqrt=eps_in_sqrt)  # Keras defaults: 1e-3, 0.9, 1e-7
        p = jax.tree.map(jnp.asarray, params)
        state = opt.init(p)
        for g in grads:
            updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, p)
            p = optax.apply_updates(p, updates)
        for k in want:
            np.testing.assert_allclose(p[k], want[k], rtol=1e-12, atol=1e-15)


def test_rmsprop_clipping():
    g = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}  # global norm 13
    params = {"a": np.zeros(2), "b": np.zeros(1)}
    clipped = {k: v * (2.0 / 13.0) for k, v in g.items()}
    want = ref.rmsprop(params, [clipped], 0.1, 0.9, 1e-7, True)
    unclipped = ref.rmsprop(params, [g], 0.1, 0.9, 1e-7, True)
    with jax.enable_x64(True):
        for clip_norm, expected in [(2.0, want), (None, unclipped), (13.5, unclipped)]:
            opt = optim.rmsprop(0.1, clip_norm=clip_norm)
            p = jax.tree.map(jnp.asarray, params)
            updates, _ = opt.update(jax.tree.map(jnp.asarray, g), opt.init(p), p)
            p = optax.apply_updates(p, updates)
            for k in expected:
                np.testing.assert_allclose(p[k], expected[k], rtol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_rmsprop_refuses_bad_clip_norm(bad):
    with pytest.raises(ValueError, match="clip_norm=") as err:
        optim.rmsprop(clip_norm=bad)
    assert f"clip_norm={bad}" in str(err.value)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        optim.clipped(optax.sgd(1.0), bad)


def test_clipped_sgd_steps_along_the_clipped_gradient():
    """SGD at 0.5 after clipping to 2 (a number, then a traced array); inf as an array clips
    nothing, and None is the transformation itself."""
    g = {"a": np.float32([3.0, 4.0]), "b": np.float32([12.0])}  # global norm 13
    params = {"a": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    sgd = optax.sgd(0.5)
    assert optim.clipped(sgd, None) is sgd

    def step(opt):
        return opt.update(g, opt.init(params), params)[0]

    by_number = step(optim.clipped(sgd, 2.0))
    by_array = jax.jit(lambda c: step(optim.clipped(sgd, c)))(jnp.float32(2.0))
    unclipped = jax.jit(lambda c: step(optim.clipped(sgd, c)))(jnp.float32(jnp.inf))
    for k in g:
        np.testing.assert_allclose(by_number[k], -0.5 * g[k] * 2.0 / 13.0, rtol=1e-6)
        np.testing.assert_allclose(by_array[k], -0.5 * g[k] * 2.0 / 13.0, rtol=1e-6)
        np.testing.assert_allclose(unclipped[k], -0.5 * g[k], rtol=1e-6)


# --- the char model and single steps -------------------------------------------------------------


@functools.cache
def _char_model(name):
    """``(model, loss_fn)``, one pair per cell: jitted functions of them compile once per file."""
    model = sequence_classifier(recurrent(cells.CELLS[name](8)), VOCAB, VOCAB)

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        return softmax_cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    return model, loss_fn


def _params(model, seed=0):
    """Random params of the model's shapes (no initialiser compiled: tests stay fast)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes
    )


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.integers(0, VOCAB, (n, SEQ_LEN)), jnp.int32),
        jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32),
    )


# The engine tests share one model, optimiser (RMSprop after clipping), data set and epoch, so
# that the reference loop's update and the epoch compile once for the whole file.
N, BATCH = 11, 4  # batches of 4, 4, 3: the last partial batch is kept
OPT = optim.rmsprop(1e-2, clip_norm=1.0)


@functools.cache
def _data():
    return _batch(N, seed=3)


@functools.cache
def _update():
    """The reference for every scan of steps: one jitted apply_update."""
    return jax.jit(functools.partial(train.apply_update, _char_model("simple_rnn")[1], OPT))


@functools.cache
def _epoch():
    loss_fn = _char_model("simple_rnn")[1]
    return train.make_trainer(loss_fn, OPT, batches.shuffled_epoch(_gather, N, BATCH), trace=True)


def _global_norm64(tree) -> float:
    return math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


def test_model_on_one_hot_equals_model_on_tokens():
    """The tutorial's one-hot inputs and our integer tokens give the same logits, every cell."""
    tokens = _batch(4)[0]
    models = [_char_model(name)[0] for name in ("simple_rnn", "lstm", "gru")]
    params = [_params(model, seed=i) for i, model in enumerate(models)]
    run = jax.jit(
        lambda ps, t: [
            (m.apply(p, t), m.apply(p, jax.nn.one_hot(t, VOCAB)))
            for m, p in zip(models, ps, strict=True)
        ]
    )
    for from_tokens, from_one_hot in run(params, tokens):
        assert from_tokens.shape == (4, VOCAB)
        np.testing.assert_allclose(from_tokens, from_one_hot, rtol=1e-6, atol=1e-6)


@functools.cache
def _step(name):
    """A jitted train step of the char model with RMSprop (lr 1e-2), one per cell and file."""
    return train.make_train_step(_char_model(name)[1], optim.rmsprop(1e-2))


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_train_step_lowers_loss_moves_every_param_compiles_once(name):
    model = _char_model(name)[0]
    step = _step(name)
    state = train.create_train_state(_params(model), optim.rmsprop(1e-2), jax.random.PRNGKey(1))
    batch, ones = _batch(16), jnp.ones(16)
    new, metrics = step(state, batch, ones)
    new2, metrics2 = step(new, batch, ones)
    assert step._cache_size() == 1  # the second call reuses the first compilation
    assert int(new2.step) == 2
    # metrics: the loss before the update (its value: test_padding_rows_change_nothing);
    # metrics2: the loss of the same batch after the first update.
    assert float(metrics2["loss"]) < float(metrics["loss"])
    for path, before, after in zip(
        jax.tree_util.tree_leaves_with_path(state.params),
        jax.tree.leaves(state.params),
        jax.tree.leaves(new.params),
        strict=True,
    ):
        assert np.any(np.asarray(before) != np.asarray(after)), f"{path[0]} did not move"
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "finite"} and bool(metrics["finite"])


def test_padding_rows_change_nothing():
    """A partial batch padded to full size: rows of weight 0 change nothing, whatever they hold,
    and the loss is the mean over the real rows (the update is checked against the formula on
    the real rows alone in test_apply_update_against_formula)."""
    model, loss_fn = _char_model("simple_rnn")
    step = _step("simple_rnn")  # compiled for batches of 16 by the test above (or now)
    state = train.create_train_state(_params(model), optim.rmsprop(1e-2), jax.random.PRNGKey(1))
    (inputs, labels), (junk_inputs, junk_labels) = _batch(16), _batch(16, seed=1)
    weights = jnp.asarray(np.arange(16) < 10, jnp.float32)
    a, m_a = step(state, (inputs, labels), weights)
    junk = (inputs.at[10:].set(junk_inputs[10:]), labels.at[10:].set(junk_labels[10:]))
    b, m_b = step(state, junk, weights)
    losses = np.asarray(jax.jit(loss_fn)(state.params, (inputs, labels))[0], np.float64)
    assert float(m_a["loss"]) == pytest.approx(np.mean(losses[:10]), rel=1e-5)
    assert float(m_b["loss"]) == pytest.approx(float(m_a["loss"]), rel=1e-6)
    assert float(m_b["grad_norm"]) == pytest.approx(float(m_a["grad_norm"]), rel=1e-6)
    _assert_trees_close(a.params, b.params)
    assert step._cache_size() == 1


def test_apply_update_against_formula():
    """``sums`` are weighted sums over the batch, ``examples`` the sum of the weights; the
    update is RMSprop after clipping of the real rows' mean-loss gradient (float64 formula)."""
    model, loss_fn = _char_model("simple_rnn")
    state = train.create_train_state(_params(model), OPT, jax.random.PRNGKey(0))
    batch = _batch(BATCH, seed=2)
    weights = jnp.array([1.0, 0.0, 1.0, 1.0])
    new, sums = _update()(state, batch, weights)
    losses, stats = jax.jit(loss_fn)(state.params, batch)
    real = np.array([0, 2, 3])
    assert set(sums) == {"loss", "accuracy", "examples", "grad_norm"}
    assert float(sums["examples"]) == 3.0
    assert float(sums["loss"]) == pytest.approx(float(np.sum(np.asarray(losses)[real])), rel=1e-6)
    assert float(sums["accuracy"]) == float(np.sum(np.asarray(stats["accuracy"])[real]))
    mean_loss = lambda p: jnp.mean(loss_fn(p, _gather(batch, real))[0])
    grads = jax.jit(jax.grad(mean_loss))(state.params)
    norm = _global_norm64(grads)
    assert float(sums["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert norm > 1.0  # so the clipping at 1.0 is part of the update checked here

    def flat(tree):
        return dict(enumerate(np.asarray(x, np.float64) for x in jax.tree.leaves(tree)))

    clipped = {k: g / norm for k, g in flat(grads).items()}
    want = ref.rmsprop(flat(state.params), [clipped], 1e-2, 0.9, 1e-7, True)
    got = flat(new.params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1
    np.testing.assert_array_equal(new.key, state.key)  # apply_update draws nothing


def _loop(update, state, taken):
    """A Python loop of jitted apply_update calls: the reference for every scan of updates."""
    rows = []
    for batch, weights in taken:
        state, sums = update(state, batch, weights)
        rows.append(jax.device_get(sums))
    return state, rows


def _check_against_loop(metrics, rows, stats=()):
    seen = sum(float(r["examples"]) for r in rows)
    loss = sum(float(r["loss"]) for r in rows) / seen
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
    for name in stats:
        want = sum(float(r[name]) for r in rows) / seen
        assert float(metrics[name]) == pytest.approx(want, rel=1e-5)
    norms = np.array([float(r["grad_norm"]) for r in rows])
    assert float(metrics["grad_norm_max"]) == pytest.approx(norms.max(), rel=1e-5)
    assert bool(metrics["finite"])
    # trace=True: each step's mean loss over its real examples and its pre-clip gradient norm.
    np.testing.assert_allclose(
        metrics["step_loss"], [float(r["loss"]) / float(r["examples"]) for r in rows], rtol=1e-5
    )
    np.testing.assert_allclose(metrics["step_grad_norm"], norms, rtol=1e-5)


def test_shuffled_epoch_equals_loop_of_updates():
    model = _char_model("simple_rnn")[0]
    data = _data()
    state = train.create_train_state(_params(model), OPT, jax.random.PRNGKey(5))
    run = _epoch()
    new, metrics = run(state, data)
    new2, _ = run(new, data)
    assert run._whole._cache_size() == 1  # the second call reuses the first compilation

    # The loop: the epoch splits its shuffle key from state.key, as documented; the last batch
    # padded with a weight-0 row (the same update as the 3 real rows alone, tested above).
    key, plan_key = jax.random.split(state.key)
    order = np.append(np.asarray(jax.random.permutation(plan_key, N)), 0)
    weights = np.ones(12, np.float32)
    weights[N:] = 0.0
    taken = [(_gather(data, order[i : i + 4]), weights[i : i + 4]) for i in (0, 4, 8)]
    s, rows = _loop(_update(), state, taken)
    assert [float(r["examples"]) for r in rows] == [4.0, 4.0, 3.0]
    assert int(new.step) == 3 == int(s.step)
    np.testing.assert_array_equal(new.key, key)
    _assert_trees_close((new.params, new.opt_state), (s.params, s.opt_state), 2e-5, 1e-6)
    _check_against_loop(metrics, rows, stats=("accuracy",))
    assert int(metrics["nonfinite_step"]) == -1
    assert set(metrics) == {
        "loss",
        "accuracy",
        "grad_norm_max",
        "finite",
        "nonfinite_step",
        "nonfinite_loss",
        "nonfinite_gradient",
        "step_loss",
        "step_grad_norm",
    }
    # A new shuffle every call, drawn from the state's key: same state, same epoch.
    again, _ = run(state, data)
    assert_bit_identical(again, new)
    assert not np.array_equal(new2.key, new.key)


def test_with_replacement_scan_equals_loop_of_updates():
    model, loss_fn = _char_model("simple_rnn")
    data, steps = _data(), 5
    state = train.create_train_state(_params(model, seed=2), OPT, jax.random.PRNGKey(9))
    draws = batches.with_replacement(_gather, N, BATCH, steps)
    new, metrics = train.make_trainer(loss_fn, OPT, draws, trace=True)(state, data)

    key, plan_key = jax.random.split(state.key)
    indices, _ = draws.plan(plan_key, data)  # (the draws, no step keys)
    indices = np.asarray(indices)
    assert indices.shape == (steps, BATCH) and indices.min() >= 0 and indices.max() < N
    taken = [(_gather(data, indices[i]), jnp.ones(BATCH)) for i in range(steps)]
    s, rows = _loop(_update(), state, taken)
    assert int(new.step) == steps == int(s.step)
    np.testing.assert_array_equal(new.key, key)
    _assert_trees_close((new.params, new.opt_state), (s.params, s.opt_state))
    _check_against_loop(metrics, rows, stats=("accuracy",))


@functools.partial(jax.jit, static_argnums=1)
def _sample_tokens(key, batch_size):
    """Fresh random char-model examples: ``(inputs (batch, SEQ_LEN), labels (batch,))``."""
    k_in, k_label = jax.random.split(key)
    return (
        jax.random.randint(k_in, (batch_size, SEQ_LEN), 0, VOCAB),
        jax.random.randint(k_label, (batch_size,), 0, VOCAB),
    )


def test_generated_batches_equal_loop_of_updates():
    model, loss_fn = _char_model("simple_rnn")
    steps = 4
    state = train.create_train_state(_params(model, seed=3), OPT, jax.random.PRNGKey(11))
    run = train.make_trainer(
        loss_fn, OPT, batches.generated(_sample_tokens, BATCH, steps), trace=True
    )
    new, metrics = run(state, None)

    # The documented key use: _, plan_key = split(state.key); k_i = split(plan_key, n)[i].
    key, plan_key = jax.random.split(state.key)
    taken = [(_sample_tokens(k, BATCH), jnp.ones(BATCH)) for k in jax.random.split(plan_key, steps)]
    assert not np.array_equal(taken[0][0][0], taken[1][0][0])  # fresh batches
    s, rows = _loop(_update(), state, taken)
    assert int(new.step) == steps == int(s.step)
    np.testing.assert_array_equal(new.key, key)
    _assert_trees_close((new.params, new.opt_state), (s.params, s.opt_state))
    _check_against_loop(metrics, rows, stats=("accuracy",))
    with pytest.raises(ValueError, match="batch_size=0"):
        batches.generated(_sample_tokens, 0, steps)


def test_evaluate_is_the_mean_over_all_examples_in_order():
    model, loss_fn = _char_model("simple_rnn")
    params, data = _params(model), _data()
    gathered = []

    def spy(d, idx):
        gathered.append(idx)  # traced once: one compiled scan, not a Python loop of batches
        return _gather(d, idx)

    evaluate = train.make_evaluate(loss_fn, batches.shuffled_epoch(spy, N, BATCH, shuffle=False))
    losses, stats = jax.jit(loss_fn)(params, data)
    metrics = evaluate(params, data)
    # The mean over all 11 examples, each once (not the mean of the three batch means).
    want = np.mean(np.asarray(losses, np.float64))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(float(np.mean(stats["accuracy"])))
    assert len(gathered) == 1 and set(metrics) == {"loss", "accuracy"}


# --- fit: metrics, checkpoints, resume, stop, NaN ------------------------------------------------


@functools.cache
def _counter_problem():
    """Linear toy: loss -w·x (x = 1) so SGD(1) adds exactly 1 to w per epoch; NaN once w > 2.5.

    Cached: the fit tests share one compiled epoch.
    """

    def loss_fn(params, batch):
        w = params["w"]
        loss = -w * batch["x"] + jnp.where(w > 2.5, jnp.nan, 0.0)
        return loss, {}

    opt = optax.sgd(1.0)
    data = {"x": jnp.ones(4)}
    run = train.make_trainer(loss_fn, opt, batches.shuffled_epoch(_gather, 4, 4))
    state = train.create_train_state({"w": jnp.zeros(())}, opt, jax.random.PRNGKey(0))
    return state, run, data


def _fit(state, trainer, data, *, workdir=None, meta=None, **kwargs):
    """:func:`rnn_jax.loop.fit` over ``workdir`` opened as a run directory with ``meta``."""
    with rundir.open_run(workdir, meta or {}) as run:
        return loop.fit(state, trainer, data, run, **kwargs)


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fit_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    state, run, data = _counter_problem()
    workdir = str(tmp_path)
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint") as err:
        _fit(state, run, data, iterations=5, workdir=workdir, meta={"config": {"a": 1}})
    # Which quantity, which step, which checkpoint is kept, what helps.
    message = str(err.value)
    assert message.startswith("iteration 4: the loss became NaN or infinite at step 4")
    assert "step 3 in" in message and "lower the learning rate" in message
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 3
    restored, meta = checkpoint.restore_checkpoint(ckpt, 3, state)
    assert float(restored.params["w"]) == 3.0 and int(restored.step) == 3
    assert meta["config"] == {"a": 1} and meta[rundir.PROGRESS_KEY]["iteration"] == 3
    rows = _lines(workdir)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [0.0, -1.0, -2.0] and [r["step"] for r in rows] == [1, 2, 3]
    assert rundir.read_history(workdir) == rows


def test_fit_resume_and_config_mismatch(tmp_path):
    state, run, data = _counter_problem()
    workdir, meta = str(tmp_path), {"config": {"units": 8}, "vocabulary": "ab"}
    _, history = _fit(state, run, data, iterations=1, workdir=workdir, meta=meta)
    assert [h["iteration"] for h in history] == [1]
    # A run killed after writing iteration 2's metrics line but before its checkpoint.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": 2, "loss": 99.0}) + "\n")
    ckpt = os.path.join(workdir, "checkpoints")
    snapshot = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}

    for bad_meta, name in [
        ({"config": {"units": 16}, "vocabulary": "ab"}, "units=16"),
        ({"config": {"units": 8}, "vocabulary": "abc"}, "vocabulary"),
    ]:
        with pytest.raises(WorkdirError, match=name) as err:
            _fit(state, run, data, iterations=2, workdir=workdir, meta=bad_meta)
        assert "pass another workdir" in str(err.value)
        assert {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)} == snapshot
        assert len(_lines(workdir)) == 2  # untouched by the refused run

    final, history = _fit(state, run, data, iterations=2, workdir=workdir, meta=meta)
    # The history holds the resumed run's row 1 and the new row 2 (not the killed run's).
    assert [h["iteration"] for h in history] == [1, 2]
    assert [h["loss"] for h in history] == [0.0, -1.0]
    assert float(final.params["w"]) == 2.0 and int(final.step) == 2
    assert _lines(workdir) == history


def test_fit_workdir_that_is_a_file(tmp_path):
    state, run, data = _counter_problem()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(WorkdirError, match="workdir="):
        _fit(state, run, data, iterations=1, workdir=str(a_file))
    assert a_file.read_text() == "x"


def test_fit_stop_ends_early_and_a_rerun_does_not_train(tmp_path):
    """Stop once the loss reaches -2 (iteration 3): iteration 4 would be NaN, so stopping there
    is what keeps the run free of exceptions, and the rerun must not train any further."""
    state, run, data = _counter_problem()
    workdir, asked = str(tmp_path), []

    def stop(metrics):
        asked.append(metrics["iteration"])
        return metrics["loss"] <= -2.0

    final, history = _fit(state, run, data, iterations=10, workdir=workdir, stop=stop)
    assert asked == [1, 2, 3]
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == [0.0, -1.0, -2.0]
    assert float(final.params["w"]) == 3.0 and int(final.step) == 3
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 3

    asked.clear()
    again, history2 = _fit(state, run, data, iterations=10, workdir=workdir, stop=stop)
    assert asked == [3]  # asked once, of the last row found; no iteration ran
    assert history2 == history
    assert float(again.params["w"]) == 3.0 and int(again.step) == 3
    assert checkpoint.latest_step(ckpt) == 3 and _lines(workdir) == history

    # Without a stop condition the rerun resumes, and meets the NaN of iteration 4.
    with pytest.raises(loop.NonFiniteLossError, match="iteration 4"):
        _fit(state, run, data, iterations=10, workdir=workdir)


def test_fit_resumed_run_is_bit_identical(tmp_path):
    """One iteration, stopped, then resumed to three: the same state and history as three at
    once, bit for bit (the shuffles come from the checkpointed key)."""
    model = _char_model("simple_rnn")[0]
    data, run = _data(), _epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))

    def on_iteration(_iteration, state, _metrics):
        return {"kernel_sum": float(jnp.sum(state.params["dense"]["kernel"]))}

    kwargs = dict(meta={"config": {"units": 8}}, on_iteration=on_iteration, epochs_per_iteration=2)
    whole, history = _fit(state, run, data, iterations=3, workdir=str(tmp_path / "a"), **kwargs)
    part, _ = _fit(state, run, data, iterations=1, workdir=str(tmp_path / "b"), **kwargs)
    resumed, history_b = _fit(state, run, data, iterations=3, workdir=str(tmp_path / "b"), **kwargs)
    assert int(part.step) == 6 and int(whole.step) == 18  # 3 batches per epoch, 2 per iteration
    assert_bit_identical(resumed, whole)

    def drop_seconds(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert drop_seconds(history_b) == drop_seconds(history)
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [6, 12, 18]
    assert history[-1]["kernel_sum"] == float(jnp.sum(whole.params["dense"]["kernel"]))
    assert len(history[-1]["step_loss"]) == 6  # the iteration's two epochs, as a JSON list
    # Without a workdir: the same run, nothing written.
    plain, history_c = _fit(state, run, data, iterations=3, **kwargs)
    assert_bit_identical(plain, whole)
    assert drop_seconds(history_c) == drop_seconds(history)


def test_fit_nan_before_any_checkpoint_names_no_checkpoint(tmp_path):
    state, run, data = _counter_problem()
    start = state._replace(params={"w": jnp.asarray(3.0)})  # NaN at the first step
    with pytest.raises(loop.NonFiniteLossError) as err:
        _fit(start, run, data, iterations=2, workdir=str(tmp_path))
    assert "no checkpoint had been written yet" in str(err.value)
    assert "last good" not in str(err.value)
    with pytest.raises(loop.NonFiniteLossError, match="nothing is saved without a workdir"):
        _fit(start, run, data, iterations=2)


# --- Clipping without overflow (a gradient of 1e25 is clipped, not zeroed) ------------------------


def test_global_norm_is_exact_where_float32_squares_overflow_or_underflow():
    rng = np.random.default_rng(0)
    for scale in (1e25, 1.0, 1e-25):
        tree = {"a": rng.standard_normal((7, 3)) * scale, "b": [rng.standard_normal(5) * scale]}
        want = math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree)))
        got = train.global_norm(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    big = {"a": jnp.full((4,), 1e25, jnp.float32)}
    assert not np.isfinite(float(optax.tree.norm(big)))  # what optax computes here
    assert not np.isfinite(float(train.global_norm({"a": jnp.array([1.0, jnp.nan])})))


def test_clip_by_global_norm_clips_to_max_norm_without_overflow():
    grads = {"a": jnp.full((4,), 1e25, jnp.float32), "b": jnp.full((2, 2), -3e24, jnp.float32)}
    clip = optim.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(float(train.global_norm(clipped)), 1.0, rtol=1e-5)
    direction = np.concatenate([np.full(4, 1e25), np.full(4, -3e24)])
    np.testing.assert_allclose(
        np.concatenate([np.ravel(clipped["a"]), np.ravel(clipped["b"])]),
        direction / np.linalg.norm(direction),
        rtol=1e-5,
    )
    small = {"a": jnp.array([0.3, 0.4])}
    passed, _ = clip.update(small, clip.init(small))
    np.testing.assert_array_equal(passed["a"], small["a"])  # under max_norm: unchanged
    unclipped = optim.clip_by_global_norm(jnp.inf)  # inf: no clipping, even of 1e25
    same, _ = unclipped.update(grads, unclipped.init(grads))
    np.testing.assert_array_equal(same["a"], grads["a"])


def test_plain_optax_clipping_freezes_a_gain3_rnn_and_ours_moves_it():
    """SimpleRNN with recurrent gain 3 on the adding problem at T = 200, float32: gradient
    entries near 1e24, whose squares overflow."""
    task = synthetic.adding_problem(200)
    model = sequence_classifier(
        cells.simple_rnn(32, recurrent_gain=3.0), task.input_dim, task.output_dim
    )

    def loss_fn(params, batch):
        xs, targets = batch
        return task.loss(model.apply(params, xs), targets), {}

    batch, weights = task.sample(jax.random.PRNGKey(7), 32), jnp.ones(32)
    params = model.init(jax.random.PRNGKey(0))
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert not np.isfinite(float(optax.tree.norm(grads)))  # the squares overflow
    assert 1e20 < float(train.global_norm(grads)) < 1e30
    moved = {}
    for name, clip in (("optax", optax.clip_by_global_norm(1.0)), ("ours", None)):
        clip = optim.clip_by_global_norm(1.0) if clip is None else clip
        opt = optax.chain(clip, optax.adam(1e-2))
        state = train.create_train_state(params, opt, jax.random.PRNGKey(1))
        update = jax.jit(lambda s, opt=opt: train.apply_update(loss_fn, opt, s, batch, weights))
        for _ in range(3):
            state, sums = update(state)
        assert np.isfinite(float(sums["grad_norm"]))  # the reported norm does not overflow
        moved[name] = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))
        )
    assert moved["optax"] == 0.0  # every update scaled by 1 / inf: frozen, silently
    assert moved["ours"] > 1e-3


def test_scan_updates_reports_the_first_nonfinite_step_and_what_it_was():
    state, run, data = _counter_problem()
    state = state._replace(params={"w": jnp.asarray(2.0)}, step=jnp.asarray(10, jnp.int32))
    state, metrics = run(state, data)  # w = 2: finite; the update makes it 3
    assert bool(metrics["finite"]) and int(metrics["nonfinite_step"]) == -1
    state, metrics = run(state, data)  # w = 3 > 2.5: the loss is NaN at the 12th update
    assert not bool(metrics["finite"])
    assert int(metrics["nonfinite_step"]) == 12
    assert bool(metrics["nonfinite_loss"])


def test_fit_resumes_from_the_newest_intact_checkpoint(tmp_path, caplog):
    state, run, data = _counter_problem()
    workdir = str(tmp_path)
    _fit(state, run, data, iterations=2, workdir=workdir)
    step2 = os.path.join(workdir, "checkpoints", "2")
    shutil.rmtree(os.path.join(step2, "state"))  # iteration 2's arrays are lost
    with caplog.at_level("WARNING"):
        final, history = _fit(state, run, data, iterations=2, workdir=workdir)
    assert any(
        "checkpoint 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records
    )
    # Iteration 2 was trained again from iteration 1's checkpoint: the same numbers as before.
    assert [r["iteration"] for r in history] == [1, 2] and float(final.params["w"]) == 2.0
    assert [r["iteration"] for r in _lines(workdir)] == [1, 2]


# --- Long epochs: calls of a few steps, progress lines, mid-epoch checkpoints -----------------


@functools.cache
def _long_epoch():
    """Six steps per epoch (batches of 2, 2, 2, 2, 2, 1), traced."""
    loss_fn = _char_model("simple_rnn")[1]
    return train.make_trainer(loss_fn, OPT, batches.shuffled_epoch(_gather, N, 2), trace=True)


def test_an_epoch_run_in_calls_equals_one_call():
    """Steps 0-3 then 4-5 (and 0-1, 2-3, 4-5) give the state of one whole call bit for bit,
    and the merged sums its metrics (the same per-step sums, added in another order)."""
    model = _char_model("simple_rnn")[0]
    data, steps = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=6), OPT, jax.random.PRNGKey(8))
    whole, metrics = steps(state, data)
    for sizes in ((4, 2), (2, 2, 2), (5, 1)):
        part, sums, first = state, None, 0
        for size in sizes:
            part, piece = steps.run(part, data, first, size)
            if first + size < steps.num_steps:  # the pass's key moves on at its end only
                np.testing.assert_array_equal(part.key, state.key)
            piece = jax.device_get(piece)
            sums, first = piece if sums is None else sums.merge(piece), first + size
        assert_bit_identical(part, whole)
        merged = sums.means()
        assert list(merged) == list(metrics)  # the same names, in the same (sorted) order
        np.testing.assert_array_equal(merged["step_loss"], metrics["step_loss"])
        assert float(merged["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
        assert float(merged["grad_norm_max"]) == float(metrics["grad_norm_max"])
        assert bool(merged["finite"]) and int(merged["nonfinite_step"]) == -1


def _host_sums(loss, accuracy, examples, norms, step_losses, nonfinite=(-1, False, False)):
    """Host sums as ``jax.device_get`` gives them: NumPy float32, int32 and bool values."""
    f32 = lambda x: np.asarray(x, np.float32)
    step, bad_loss, bad_gradient = nonfinite
    return metrics.Sums(
        totals={"accuracy": f32(accuracy), "loss": f32(loss)},
        examples=f32(examples),
        grad_norm_max=f32(max(norms)),
        nonfinite_step=np.asarray(step, np.int32),
        nonfinite_loss=np.asarray(bad_loss),
        nonfinite_gradient=np.asarray(bad_gradient),
        step_loss=f32(step_losses),
        step_grad_norm=f32(norms),
    )


def test_sums_merge_into_means_over_all_examples():
    """Two runs of 4 and 2 examples: means over the 6, the larger norm, the traces joined; a
    non-finite run's step is kept by every later merge, and only the first one's."""
    first = _host_sums(6.0, 2.0, 4.0, [1.5, 0.5], [1.0, 2.0])
    later = _host_sums(3.0, 1.0, 2.0, [2.5], [1.5])
    merged = first.merge(later).means()
    assert list(merged) == [
        "accuracy",
        "finite",
        "grad_norm_max",
        "loss",
        "nonfinite_gradient",
        "nonfinite_loss",
        "nonfinite_step",
        "step_grad_norm",
        "step_loss",
    ]
    assert merged["loss"] == 9.0 / 6.0 and merged["accuracy"] == 0.5
    assert merged["loss"].dtype == np.float32
    assert merged["grad_norm_max"] == 2.5 and bool(merged["finite"])
    assert int(merged["nonfinite_step"]) == -1
    np.testing.assert_array_equal(merged["step_loss"], [1.0, 2.0, 1.5])
    np.testing.assert_array_equal(merged["step_grad_norm"], [1.5, 0.5, 2.5])

    bad = _host_sums(np.nan, 1.0, 2.0, [0.5], [np.nan], nonfinite=(7, True, False))
    worse = _host_sums(1.0, 1.0, 2.0, [np.inf], [0.5], nonfinite=(9, False, True))
    for sums in (first.merge(bad), first.merge(bad).merge(later), bad.merge(worse)):
        assert not sums.finite
        assert (int(sums.nonfinite_step), bool(sums.nonfinite_loss)) == (7, True)
    assert set(metrics.Sums.STATUS) <= set(merged)
    untraced = first._replace(step_loss=None, step_grad_norm=None)
    assert "step_loss" not in untraced.merge(untraced).means()


def test_sums_read_back_from_a_checkpoints_flat_form():
    """A mid-epoch checkpoint holds the sums as one flat dict (the form written before the
    sums had a type of their own): ``from_dict`` reads it, ``as_dict`` writes it."""
    flat = {
        "accuracy": np.float32(2.0),
        "loss": np.float32(6.0),
        "examples": np.float32(4.0),
        "grad_norm_max": np.float32(1.5),
        "finite": np.bool_(True),
        "nonfinite_step": np.int32(-1),
        "nonfinite_loss": np.bool_(False),
        "nonfinite_gradient": np.bool_(False),
        "step_loss": np.float32([1.0, 2.0]),
        "step_grad_norm": np.float32([1.5, 0.5]),
    }
    sums = metrics.Sums.from_dict(flat)
    assert set(sums.totals) == {"accuracy", "loss"} and float(sums.examples) == 4.0
    assert_bit_identical(sums, _host_sums(6.0, 2.0, 4.0, [1.5, 0.5], [1.0, 2.0]))
    assert set(sums.as_dict()) == set(flat)
    assert_bit_identical(metrics.Sums.from_dict(sums.as_dict()), sums)


class _Interrupt(Exception):
    pass


def test_fit_checkpoints_inside_epochs_and_resumes_bit_identically(tmp_path):
    """Calls of 2 steps (3 per epoch), a checkpoint every 2 steps, a progress line after
    every call. A run interrupted right after its first mid-epoch checkpoint of iteration 2 and
    then resumed ends bit-identical to one never stopped, metrics and history included."""
    model = _char_model("simple_rnn")[0]
    data, run = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))
    kwargs = dict(
        meta={"config": {"units": 8}},
        steps_per_call=2,
        checkpoint_every=2,
        progress_seconds=1e-9,
    )
    lines = []
    whole, history = _fit(
        state, run, data, iterations=3, workdir=str(tmp_path / "a"), log=lines.append, **kwargs
    )
    progress = [line for line in lines if "steps (" in line]
    assert len(progress) == 3 * 2  # after the 1st and 2nd call of each epoch, not the last
    assert progress[0].startswith("iteration 1: 2/6 steps (33%), ")
    assert "examples/s, loss so far " in progress[0] and "iteration ETA " in progress[0]
    assert any(line.startswith("compiled the training steps in ") for line in lines)
    assert history[0]["compile_seconds"] > 0 and "compile_seconds" not in history[1]
    ckpt_a = os.path.join(str(tmp_path / "a"), "checkpoints")
    assert checkpoint.latest_step(ckpt_a) == 18

    workdir = str(tmp_path / "b")
    seen = []

    def interrupt_in_iteration_2(line):
        seen.append(line)
        if line.startswith("iteration 2: 4/6 steps"):  # after steps 8-10's call and checkpoint
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _fit(
            state, run, data, iterations=3, workdir=workdir, log=interrupt_in_iteration_2, **kwargs
        )
    ckpt_b = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt_b) == 10  # 6 (iteration 1) + 4 steps into iteration 2
    saved = checkpoint.restore_meta(ckpt_b, 10)[rundir.PROGRESS_KEY]
    assert (saved["iteration"], saved["epoch"], saved["steps"]) == (1, 0, 4)
    assert [r["iteration"] for r in rundir.read_history(workdir)] == [1]

    lines = []
    resumed, history_b = _fit(
        state, run, data, iterations=3, workdir=workdir, log=lines.append, **kwargs
    )
    assert lines[0].startswith(f"resuming from step 10 in {ckpt_b} (iteration 1 done, 4 of 6 ")
    assert_bit_identical(resumed, whole)

    def drop_seconds(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert drop_seconds(history_b) == drop_seconds(history)
    assert drop_seconds(rundir.read_history(workdir)) == drop_seconds(history)

    # A rerun has nothing to do and says so.
    lines = []
    again, history_c = _fit(
        state, run, data, iterations=3, workdir=workdir, log=lines.append, **kwargs
    )
    assert_bit_identical(again, whole)
    assert history_c == rundir.read_history(workdir)
    assert lines[-1].startswith("all 3 iterations are done (the checkpoint in ")
    assert "nothing to do; raise iterations to train further" in lines[-1]


def test_fit_refuses_non_positive_step_counts():
    state, run, data = _counter_problem()
    for name in ("steps_per_call", "checkpoint_every"):
        with pytest.raises(ValueError, match=f"{name}=0 must be a positive number of steps"):
            _fit(state, run, data, iterations=1, **{name: 0})


def test_fit_resumes_a_checkpoint_written_before_mid_epoch_ones(tmp_path):
    """Checkpoints were once indexed by iteration, with no position in their meta: checkpoint
    1 is then iteration 1 done, and the run goes on from there to the same end."""
    model = _char_model("simple_rnn")[0]
    data, run = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=9), OPT, jax.random.PRNGKey(3))
    meta = {"config": {"units": 8}}
    whole, _ = _fit(state, run, data, iterations=2, meta=meta)
    after_one, _ = run(state, data)
    checkpoint.save_checkpoint(str(tmp_path / "checkpoints"), 1, after_one, meta)
    lines = []
    resumed, _ = _fit(
        state, run, data, iterations=2, workdir=str(tmp_path), meta=meta, log=lines.append
    )
    assert lines[0].startswith("resuming from step 1 in ") and "(iteration 1 done)" in lines[0]
    assert_bit_identical(resumed, whole)


def test_an_epoch_interrupted_and_resumed_keeps_its_training_seconds(tmp_path, monkeypatch):
    """A clock that moves one second per reading makes each call of updates one second long:
    an epoch of 3 calls asked to stop after 2 checkpoints them with 2 s counted and raises
    Interrupted; resumed, its row says 3 s, as the run never stopped does (a resumed epoch
    whose clock started again at 0 would say 1 s)."""
    readings = itertools.count()
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(readings)))
    model = _char_model("simple_rnn")[0]
    data, trainer = _data(), _epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))
    kwargs = dict(iterations=1, steps_per_call=1)
    _, whole = _fit(state, trainer, data, workdir=str(tmp_path / "whole"), **kwargs)
    asked = []

    def interrupted():
        asked.append(1)
        return len(asked) == 2

    workdir = str(tmp_path / "run")
    with pytest.raises(rundir.Interrupted) as err:
        _fit(state, trainer, data, workdir=workdir, interrupted=interrupted, **kwargs)
    assert err.value.step == 2 and checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 2
    progress = checkpoint.restore_meta(os.path.join(workdir, "checkpoints"), 2)
    assert progress[rundir.PROGRESS_KEY]["seconds"] == 2.0
    final, resumed = _fit(state, trainer, data, workdir=workdir, **kwargs)
    assert whole[0]["seconds"] == resumed[0]["seconds"] == 3.0
    assert int(final.step) == 3


def test_iterations_of_steps_are_cut_at_pass_ends_and_resume_bit_identically(tmp_path):
    """Iterations of 4 steps over passes of 6 end at steps 4, 6, 10, 12, 16: a pass's end
    cuts one short. Every row's metrics are the means over its own steps (its trace is those
    steps'), and a run stopped after two iterations and resumed to five ends bit-identical to
    one that never stopped, rows included."""
    model = _char_model("simple_rnn")[0]
    data, trainer = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))
    kwargs = dict(meta={"config": {"units": 8}}, steps_per_iteration=4, steps_per_call=3)
    whole, history = _fit(state, trainer, data, iterations=5, workdir=str(tmp_path / "a"), **kwargs)
    assert [row["step"] for row in history] == [4, 6, 10, 12, 16]
    assert [len(row["step_loss"]) for row in history] == [4, 2, 4, 2, 4]
    # Each row's loss is the mean over its examples (batches of 2, the pass's last of 1).
    for row, first in zip(history, [0, 4, 0, 4, 0], strict=True):
        weights = [1 if first + i == 5 else 2 for i in range(len(row["step_loss"]))]
        want = np.average(np.asarray(row["step_loss"], np.float64), weights=weights)
        assert row["loss"] == pytest.approx(want, rel=1e-6)
    # The same updates as five passes' worth of plain calls: 16 steps of the same passes.
    plain = state
    for _ in range(2):
        plain, _ = trainer(plain, data)
    plain, _ = trainer.run(plain, data, 0, 4)
    assert_bit_identical(whole, plain)

    _fit(state, trainer, data, iterations=2, workdir=str(tmp_path / "b"), **kwargs)
    resumed, history_b = _fit(
        state, trainer, data, iterations=5, workdir=str(tmp_path / "b"), **kwargs
    )
    assert_bit_identical(resumed, whole)

    def drop_seconds(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert drop_seconds(history_b) == drop_seconds(history)


def test_max_train_seconds_ends_the_run_cleanly_and_a_larger_one_goes_on(tmp_path, monkeypatch):
    """A clock that moves one second per reading makes each call one second long. With
    max_train_seconds=3 and calls of 1 step, the run ends after its 3rd step: the row says
    so, the state is checkpointed there, a rerun with the same budget has nothing to do, and a
    rerun with none trains on to the same state as a run never limited."""
    readings = itertools.count()
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(readings)))
    model = _char_model("simple_rnn")[0]
    data, trainer = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))
    kwargs = dict(meta={"config": {"units": 8}}, steps_per_call=1, iterations=2)
    whole, _ = _fit(state, trainer, data, workdir=str(tmp_path / "whole"), **kwargs)
    workdir = str(tmp_path / "limited")
    lines = []
    limited, history = _fit(
        state, trainer, data, workdir=workdir, max_train_seconds=3, log=lines.append, **kwargs
    )
    assert int(limited.step) == 3
    assert [(r["iteration"], r["step"], r["seconds"]) for r in history] == [(1, 3, 3.0)]
    assert history[0]["stopped"] == "max_train_seconds"
    assert any("max_train_seconds=3 reached after 3.0 s of training, at step 3" in x for x in lines)
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 3
    lines = []
    again, _ = _fit(
        state, trainer, data, workdir=workdir, max_train_seconds=3, log=lines.append, **kwargs
    )
    assert int(again.step) == 3
    assert lines == [
        "the run has trained 3 s of max_train_seconds=3: nothing to do; raise "
        "max_train_seconds to train further"
    ]
    # Unlimited, the run goes on: iteration 2 ends at the pass's end (step 6), iteration 3 at
    # the next (step 12), where the run never limited ended its 2 iterations.
    more = {**kwargs, "iterations": 3}
    resumed, history = _fit(state, trainer, data, workdir=workdir, **more)
    assert [r["step"] for r in history] == [3, 6, 12]
    assert_bit_identical(resumed, whole)


def test_best_keeps_the_state_of_the_lowest_score(tmp_path):
    """best=score keeps the state of the iteration with the lowest score in best/, with its
    row; an iteration that scores higher leaves it."""
    model = _char_model("simple_rnn")[0]
    data, trainer = _data(), _long_epoch()
    state = train.create_train_state(_params(model, seed=4), OPT, jax.random.PRNGKey(2))
    scores = iter([3.0, 1.0, 2.0])
    states = {}

    def on_iteration(iteration, state, _metrics):
        states[iteration] = jax.device_get(state)
        return {"score": next(scores)}

    workdir = str(tmp_path)
    with rundir.open_run(workdir, {"config": {}}) as run:
        assert run.restore_best(state) is None
        _, history = loop.fit(
            state,
            trainer,
            data,
            run,
            iterations=3,
            on_iteration=on_iteration,
            best=lambda row: row["score"],
        )
        best, row = run.restore_best(state)
    assert_bit_identical(best, states[2])
    assert row == history[1] and row["score"] == 1.0
    assert os.listdir(os.path.join(workdir, rundir.BEST)) == [str(row["step"])]
