"""Data parallelism: 8 virtual CPU devices train exactly as one device does.

The tests see 8 CPU devices in process (tests/conftest.py sets ``jax_num_cpu_devices``).
Tolerance (float32): after two fused epochs the
8-device parameters and optimiser state equal the 1-device ones to ``rtol=1e-5, atol=1e-6``;
only the order of the float32 gradient sums differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import char_lm
from rnn_jax import cells, optim, parallel, train
from rnn_jax.batches import shuffled_epoch
from rnn_jax.losses import accuracy, softmax_cross_entropy
from rnn_jax.models import recurrent, sequence_classifier

DEVICES = 8
VOCAB, SEQ_LEN = 7, 5
RTOL, ATOL = 1e-5, 1e-6
eight = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason="needs 8 devices (tests/conftest.py asks JAX for 8 CPU devices)",
)


def _problem(cell_name="gru", n=50, seed=0):
    """A char model on random tokens: (model, loss_fn, data, get_batch)."""
    layer = recurrent(cells.CELLS[cell_name](8), unroll_steps=True)
    model = sequence_classifier(layer, VOCAB, VOCAB)

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        return softmax_cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    rng = np.random.default_rng(seed)
    batch = (
        rng.integers(0, VOCAB, (n, SEQ_LEN)).astype(np.int32),
        rng.integers(0, VOCAB, n).astype(np.int32),
    )
    return model, loss_fn, batch, lambda d, idx: jax.tree.map(lambda a: a[idx], d)


def _assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def _replicated_on_all(tree, mesh):
    return all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
        for leaf in jax.tree.leaves(tree)
    )


@eight
def test_eight_devices_epoch_equals_one_device():
    """Two fused epochs, batch 12 (not a multiple of 8: padded to 16 with weight 0), 50 examples.

    The batch axis is what is split, whatever the cell: one cell per test (GRU here, LSTM for
    the step, SimpleRNN for the experiment) covers the three.
    """
    model, loss_fn, batch, get_batch = _problem("gru")
    opt = optim.rmsprop(1e-2, clip_norm=1.0)
    state = train.create_train_state(model.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
    mesh = parallel.make_mesh(DEVICES)
    assert mesh.size == DEVICES
    seen = []

    def spy(d, idx):  # the sharding the compiler gives each gathered batch
        got = get_batch(d, idx)
        jax.debug.inspect_array_sharding(got[0], callback=seen.append)
        return got

    one = train.make_trainer(loss_fn, opt, shuffled_epoch(get_batch, 50, 12))
    many = train.make_trainer(loss_fn, opt, shuffled_epoch(spy, 50, 12, mesh=mesh), mesh=mesh)
    s1, s8 = state, state
    for _ in range(2):
        s1, m1 = one(s1, batch)
        s8, m8 = many(s8, batch)
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=RTOL, atol=ATOL)
    assert int(s8.step) == int(s1.step) == 10
    np.testing.assert_array_equal(s8.key, s1.key)
    _assert_trees_close(s8.params, s1.params)
    _assert_trees_close(s8.opt_state, s1.opt_state)
    assert _replicated_on_all((s8.params, s8.opt_state), mesh)
    # Each device holds 2 of the 16 rows (12 examples + 4 padding) of every batch.
    assert seen and all(s.shard_shape((16, SEQ_LEN)) == (2, SEQ_LEN) for s in seen)


@eight
def test_eight_devices_train_step():
    model, loss_fn, batch, _ = _problem("lstm", n=13)
    opt = optim.rmsprop(1e-2)
    state = train.create_train_state(model.init(jax.random.PRNGKey(2)), opt, jax.random.PRNGKey(3))
    mesh = parallel.make_mesh(DEVICES)
    want, m1 = train.make_train_step(loss_fn, opt)(state, batch)
    step = train.make_train_step(loss_fn, opt, mesh=mesh)
    got, m8 = step(state, batch)  # 13 rows: padded to 16 inside the step
    placed, weights = parallel.shard_batch(batch, mesh)  # or padded and split on the host
    assert weights.shape == (16,) and float(weights.sum()) == 13.0
    got2, _ = step(state, placed, weights)
    for new in (got, got2):
        _assert_trees_close(new.params, want.params)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=RTOL, atol=ATOL)


@eight
def test_eight_devices_char_lm_matches_one_device(tmp_path):
    """num_devices=0 (all 8) against 1: same losses and validation loss, same final params."""
    rng = np.random.default_rng(0)
    words = "the sky was falling and alice saw a white rabbit".split()
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(30)))
    runs = {}
    for n in (1, 0):
        config = char_lm.Config(
            text=str(path),
            units=8,
            seq_len=5,
            batch_size=20,
            iterations=2,
            num_preds=5,
            num_devices=n,
            val_fraction=0.2,
        )
        runs[n] = char_lm.run(config, None, out=lambda *a: None)
    (s1, h1, _), (s8, h8, _) = runs[1], runs[0]
    for a, b in zip(h1, h8, strict=True):
        for k in ("loss", "accuracy", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL)
    _assert_trees_close(s8.params, s1.params)


def test_num_devices_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"^num_devices=9999, .*XLA_FLAGS"):
        parallel.make_mesh(9999)
    with pytest.raises(ValueError, match=r"^num_devices=-1 "):
        parallel.make_mesh(-1)
    with pytest.raises(ValueError, match=r"^num_devices=-2 "):
        char_lm.Config(num_devices=-2)
    with pytest.raises(ValueError, match=r"^compute_dtype='float16'"):
        char_lm.Config(compute_dtype="float16")


def test_padding_rows_change_nothing():
    """pad_batch's weight-0 copies leave the update exactly as it was (any device count)."""
    model, loss_fn, batch, _ = _problem("simple_rnn", n=5)
    opt = optax.sgd(0.1)
    state = train.create_train_state(model.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
    padded, weights = parallel.pad_batch(batch, jnp.ones(5), 8)
    assert weights.tolist() == [1.0] * 5 + [0.0] * 3
    np.testing.assert_array_equal(padded[0][5:], np.broadcast_to(batch[0][:1], (3, SEQ_LEN)))
    step = train.make_train_step(loss_fn, opt)
    want, _ = step(state, batch)
    got, _ = step(state, padded, weights)
    _assert_trees_close(got.params, want.params)
    # A one-device mesh runs the same program as no mesh.
    mesh_step = train.make_train_step(loss_fn, opt, mesh=parallel.make_mesh(1))
    for a, b in zip(jax.tree.leaves(mesh_step(state, batch)[0]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_bfloat16_option_sets_every_matmul(compute_dtype):
    """bfloat16: every dot of the loss and its gradient takes bf16 inputs, f32 accumulation."""
    config = char_lm.Config(cell="lstm", units=8, seq_len=SEQ_LEN)
    _, model = char_lm.make_model(config, VOCAB)
    loss_fn = char_lm.make_loss(model, compute_dtype)
    params = model.init(jax.random.PRNGKey(0))
    _, _, batch, _ = _problem(n=4)
    grad = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)[0]))
    hlo = jax.jit(grad).lower(params).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) >= 4  # recurrent and dense products, forward and backward
    bf16 = [d for d in dots if "lhs_precision_type = bf16" in d and "accumulation_type = f32" in d]
    assert len(bf16) == (len(dots) if compute_dtype == "bfloat16" else 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grad(params)))
