"""RMSprop against its formula, the train step, the fused epoch against a loop of steps, fit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

from rnn_jax import cells, checkpoint, train
from rnn_jax.losses import accuracy, masked_mean, softmax_cross_entropy
from rnn_jax.models import rnn_classifier

VOCAB, SEQ_LEN = 7, 5


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
        opt = train.rmsprop(eps_in_sqrt=eps_in_sqrt)  # Keras defaults: 1e-3, 0.9, 1e-7
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
    with jax.enable_x64(True):
        opt = train.rmsprop(0.1, clip_norm=2.0)
        p = jax.tree.map(jnp.asarray, params)
        updates, _ = opt.update(jax.tree.map(jnp.asarray, g), opt.init(p), p)
        p = optax.apply_updates(p, updates)
        for k in want:
            np.testing.assert_allclose(p[k], want[k], rtol=1e-12)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_norm"):
            train.rmsprop(clip_norm=bad)


def test_losses_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3])
    np.testing.assert_allclose(
        softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
        ref.cross_entropy(logits.astype(np.float64), labels),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(accuracy(logits, labels), logits.argmax(-1) == labels)
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    values = jnp.arange(6.0)
    assert float(masked_mean(values, mask)) == pytest.approx((0 + 2 + 3) / 3)
    assert float(masked_mean(values, np.zeros(6, bool))) == 0.0


def _char_model(name):
    model = rnn_classifier(cells.CELLS[name](8), VOCAB, VOCAB)

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


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_train_step_lowers_loss_moves_every_param_compiles_once(name):
    model, loss_fn = _char_model(name)
    opt = train.rmsprop(1e-2)
    state = train.create_train_state(_params(model), opt, jax.random.PRNGKey(1))
    step = train.make_train_step(loss_fn, opt)
    batch = _batch(16)
    new, metrics = step(state, batch)
    new2, metrics2 = step(new, batch)
    assert step._cache_size() == 1  # the second call reuses the first compilation
    assert int(new2.step) == 2
    mean_loss = jax.jit(lambda p: jnp.mean(loss_fn(p, batch)[0]))
    loss0 = float(mean_loss(state.params))
    assert float(metrics["loss"]) == pytest.approx(loss0, rel=1e-5)
    assert float(metrics2["loss"]) < loss0
    assert float(mean_loss(new2.params)) < float(metrics2["loss"])
    for path, before, after in zip(
        jax.tree_util.tree_leaves_with_path(state.params),
        jax.tree.leaves(state.params),
        jax.tree.leaves(new.params),
        strict=True,
    ):
        assert np.any(np.asarray(before) != np.asarray(after)), f"{path[0]} did not move"
    assert set(metrics) == {"loss", "accuracy", "grad_norm"}


def test_padding_weights_equal_the_smaller_batch():
    """The last partial batch: rows of weight 0 change nothing; the mean is over real rows."""
    model, loss_fn = _char_model("gru")
    opt = train.rmsprop(1e-2)
    state = train.create_train_state(_params(model), opt, jax.random.PRNGKey(1))
    step = train.make_train_step(loss_fn, opt)
    (inputs, labels), (junk_inputs, junk_labels) = _batch(5), _batch(5, seed=1)
    weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    a, m_a = step(state, (inputs, labels), weights)
    junk = (inputs.at[3:].set(junk_inputs[3:]), labels.at[3:].set(junk_labels[3:]))
    b, m_b = step(state, junk, weights)
    losses = jax.jit(loss_fn)(state.params, (inputs, labels))[0]
    assert float(m_a["loss"]) == pytest.approx(float(np.mean(np.asarray(losses)[:3])), rel=1e-6)
    assert float(m_b["loss"]) == pytest.approx(float(m_a["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert step._cache_size() == 1


def test_fused_epoch_equals_loop_of_steps():
    model, loss_fn = _char_model("simple_rnn")
    opt = train.rmsprop(1e-2, clip_norm=1.0)
    n, batch_size = 11, 4  # batches of 4, 4, 3: the last partial batch is kept
    data = _batch(n, seed=3)
    get_batch = lambda d, idx: jax.tree.map(lambda a: a[idx], d)
    state = train.create_train_state(_params(model), opt, jax.random.PRNGKey(5))
    epoch = train.make_epoch(loss_fn, opt, get_batch, n, batch_size)
    new, metrics = epoch(state, data)
    new2, _ = epoch(new, data)
    assert epoch._cache_size() == 1

    # The loop: the epoch splits its shuffle key from state.key, as documented.
    key, shuffle_key = jax.random.split(state.key)
    order = np.asarray(jax.random.permutation(shuffle_key, n))
    step = train.make_train_step(loss_fn, opt)
    s, loss_sum, acc_sum = state, 0.0, 0.0
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        s, m = step(s, get_batch(data, idx))
        loss_sum += float(m["loss"]) * len(idx)
        acc_sum += float(m["accuracy"]) * len(idx)
    assert int(new.step) == 3 == int(s.step)
    np.testing.assert_array_equal(new.key, key)
    for a, b in zip(
        jax.tree.leaves((new.params, new.opt_state)),
        jax.tree.leaves((s.params, s.opt_state)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(loss_sum / n, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(acc_sum / n, rel=1e-5)
    assert bool(metrics["finite"])
    # A new shuffle every epoch, drawn from the state's key: same state, same epoch.
    again, _ = epoch(state, data)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(new2.key, new.key)


def test_evaluate_is_the_mean_over_all_examples():
    model, loss_fn = _char_model("lstm")
    params = _params(model)
    data = _batch(10, seed=4)
    evaluate = train.make_evaluate(loss_fn, lambda d, idx: jax.tree.map(lambda a: a[idx], d), 10, 4)
    losses, stats = jax.jit(loss_fn)(params, data)
    metrics = evaluate(params, data)
    assert float(metrics["loss"]) == pytest.approx(float(jnp.mean(losses)), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(float(jnp.mean(stats["accuracy"])), rel=1e-6)


# --- fit: metrics, checkpoints, resume, NaN ---------------------------------------------------


def _counter_problem():
    """Linear toy: loss -w·x (x = 1) so SGD(1) adds exactly 1 to w per epoch; NaN once w > 2.5."""

    def loss_fn(params, batch):
        w = params["w"]
        loss = -w * batch["x"] + jnp.where(w > 2.5, jnp.nan, 0.0)
        return loss, {}

    opt = optax.sgd(1.0)
    data = {"x": jnp.ones(4)}
    epoch = train.make_epoch(loss_fn, opt, lambda d, i: jax.tree.map(lambda a: a[i], d), 4, 4)
    state = train.create_train_state({"w": jnp.zeros(())}, opt, jax.random.PRNGKey(0))
    return state, epoch, data


def test_fit_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    state, epoch, data = _counter_problem()
    workdir = str(tmp_path)
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint") as err:
        train.fit(state, epoch, data, iterations=5, workdir=workdir, meta={"config": {"a": 1}})
    assert "iteration 4" in str(err.value) and "--learning_rate" in str(err.value)
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 3
    restored, meta = checkpoint.restore_checkpoint(ckpt, 3, state)
    assert float(restored.params["w"]) == 3.0 and int(restored.step) == 3
    assert meta == {"config": {"a": 1}}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]


def test_fit_resume_and_config_mismatch(tmp_path):
    state, epoch, data = _counter_problem()
    workdir, meta = str(tmp_path), {"config": {"units": 8}, "vocabulary": "ab"}
    _, history = train.fit(state, epoch, data, iterations=1, workdir=workdir, meta=meta)
    assert [h["iteration"] for h in history] == [1]
    # A run killed after writing iteration 2's metrics line but before its checkpoint.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": 2, "loss": 0.0}) + "\n")
    ckpt = os.path.join(workdir, "checkpoints")
    snapshot = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}

    for bad_meta, flag in [
        ({"config": {"units": 16}, "vocabulary": "ab"}, "--units"),
        ({"config": {"units": 8}, "vocabulary": "abc"}, "vocabulary"),
    ]:
        with pytest.raises(checkpoint.CheckpointError, match=flag) as err:
            train.fit(state, epoch, data, iterations=2, workdir=workdir, meta=bad_meta)
        assert "--workdir" in str(err.value)
        assert {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)} == snapshot
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            assert len(f.readlines()) == 2  # untouched by the refused run

    final, history = train.fit(state, epoch, data, iterations=2, workdir=workdir, meta=meta)
    assert [h["iteration"] for h in history] == [2]
    assert float(final.params["w"]) == 2.0 and int(final.step) == 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[1]["loss"] == -1.0
