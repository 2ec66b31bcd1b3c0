"""Orbax round trip of a whole TrainState bit for bit; bad paths give a CheckpointError."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, checkpoint, train
from rnn_jax.models import recurrent, sequence_classifier


def _state(name="lstm", seed=0):
    """A TrainState of the char model's structure (RMSprop after clipping), every leaf random."""
    model = sequence_classifier(recurrent(cells.CELLS[name](6)), 5, 5)
    opt = train.rmsprop(clip_norm=1.0)
    abstract = jax.eval_shape(
        lambda key: train.create_train_state(model.init(key), opt, key), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))
        return jnp.asarray(rng.integers(0, 2**31 - 1, leaf.shape).astype(leaf.dtype))

    return jax.tree.map(fill, abstract)


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_round_trip_bit_for_bit(tmp_path, name):
    state = _state(name)
    meta = {"config": {"units": 6, "clip_norm": None, "eps_in_sqrt": True}, "vocabulary": " ab\n"}
    checkpoint.save_checkpoint(str(tmp_path), 3, state, meta)
    assert checkpoint.latest_step(str(tmp_path)) == 3
    like = _state(name, seed=1)  # same structure, other values
    restored, restored_meta = checkpoint.restore_checkpoint(str(tmp_path), 3, like)
    _assert_identical(restored, state)
    assert isinstance(restored, train.TrainState)
    assert restored_meta == meta
    assert checkpoint.restore_meta(str(tmp_path), 3) == meta


def test_keeps_newest_and_latest_step(tmp_path):
    state = _state()
    assert checkpoint.latest_step(str(tmp_path / "none")) is None
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(
            str(tmp_path), step, state._replace(step=jnp.int32(step)), {}, max_to_keep=2
        )
    assert checkpoint.latest_step(str(tmp_path)) == 4
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]
    restored, _ = checkpoint.restore_checkpoint(str(tmp_path), 3, state)
    assert int(restored.step) == 3


def test_other_model_is_a_clear_error(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), 1, _state("lstm"), {})
    for like in (_state("gru"), _state("simple_rnn")):
        with pytest.raises(checkpoint.CheckpointError, match="does not match") as err:
            checkpoint.restore_checkpoint(str(tmp_path), 1, like)
        assert "new workdir" in str(err.value)


def test_bad_paths_are_clear_errors(tmp_path):
    state = _state()
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="not a directory") as err:
        checkpoint.save_checkpoint(str(a_file), 1, state, {})
    assert f"directory={str(a_file)!r}" in str(err.value)
    assert a_file.read_text() == "not a directory"

    checkpoint.save_checkpoint(str(tmp_path / "ok"), 1, state, {})
    missing = tmp_path / "missing"
    for directory, step in [(str(missing), 1), (str(tmp_path / "ok"), 2), (str(a_file), 1)]:
        try:
            checkpoint.restore_checkpoint(directory, step, state)
        except Exception as e:  # any type: which one is what this test checks
            assert isinstance(e, checkpoint.CheckpointError), (
                f"restoring step {step} from {directory!r} raised {type(e).__name__}: {e}; "
                "expected a CheckpointError saying there is no such checkpoint"
            )
            assert f"step={step}" in str(e) and f"directory={directory!r}" in str(e)
        else:
            raise AssertionError(f"restoring step {step} from {directory!r} did not fail")
    assert not missing.exists(), "restoring from a missing directory must not create it"
