"""Orbax round trip of a whole TrainState bit for bit; bad paths give a CheckpointError; a
damaged step (flipped, truncated or missing files, garbage meta) is reported by path, never used,
and the newest intact step is found."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from damage import FAULTS, flip
from helpers import assert_bit_identical

from rnn_jax import cells, checkpoint, optim, train
from rnn_jax.models import recurrent, sequence_classifier


def _state(name="lstm", seed=0, units=6):
    """A TrainState of the char model's structure (RMSprop after clipping), every leaf random."""
    model = sequence_classifier(recurrent(cells.CELLS[name](units)), 5, 5)
    opt = optim.rmsprop(clip_norm=1.0)
    abstract = jax.eval_shape(
        lambda key: train.create_train_state(model.init(key), opt, key), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))
        return jnp.asarray(rng.integers(0, 2**31 - 1, leaf.shape).astype(leaf.dtype))

    return jax.tree.map(fill, abstract)


@pytest.mark.parametrize("name", ["simple_rnn", "lstm", "gru"])
def test_round_trip_bit_for_bit(tmp_path, name):
    state = _state(name)
    meta = {"config": {"units": 6, "clip_norm": None, "eps_in_sqrt": True}, "vocabulary": " ab\n"}
    checkpoint.save_checkpoint(str(tmp_path), 3, state, meta)
    assert checkpoint.latest_step(str(tmp_path)) == 3
    like = _state(name, seed=1)  # same structure, other values
    restored, restored_meta = checkpoint.restore_checkpoint(str(tmp_path), 3, like)
    assert_bit_identical(restored, state)
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
        assert not isinstance(err.value, checkpoint.DamagedCheckpointError)
        assert "damaged" not in str(err.value)
    intact = checkpoint.newest_intact(str(tmp_path))  # another model, not damage
    assert (intact.step, intact.skipped) == (1, [])


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


# --- Digests and damaged steps ------------------------------------------------------------

META = {"config": {"units": 16, "clip_norm": None}, "vocabulary": " ab\n"}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A directory with steps 1, 2, 3 of an LSTM(16) state (its two kernels are large enough
    to lie in their own data file, not inline in orbax's index), each step's values distinct;
    and those states."""
    directory = str(tmp_path_factory.mktemp("three_steps"))
    states = {}
    for step in (1, 2, 3):
        states[step] = _state("lstm", seed=step, units=16)._replace(step=jnp.int32(step))
        checkpoint.save_checkpoint(directory, step, states[step], META)
    return directory, states


def _copy(three_steps, tmp_path) -> str:
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(three_steps[0], directory)
    return directory


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_latest_step_is_reported_and_skipped(three_steps, tmp_path, fault):
    directory, states = _copy(three_steps, tmp_path), three_steps[1]
    like = _state("lstm", seed=9, units=16)
    damage, why = FAULTS[fault]
    damage(pathlib.Path(directory, "3"))

    with pytest.raises(checkpoint.DamagedCheckpointError) as err:
        checkpoint.restore_checkpoint(directory, 3, like)
    path = os.path.join(directory, "3")
    assert str(err.value).startswith(f"checkpoint 3 in {path!r} is damaged (")
    assert why in err.value.why
    assert "does not match this model" not in str(err.value)
    assert isinstance(err.value, checkpoint.CheckpointError)  # what the CLI reports in a line

    found = checkpoint.newest_intact(directory)
    assert found.step == 2
    # (Which array's read fails first, and so the reason, varies between reads.)
    [line] = found.skipped
    assert line.startswith(f"checkpoint 3 in {path!r} is damaged (") and why in line
    assert line.endswith("); skipped")
    restored, meta = checkpoint.restore_checkpoint(directory, found.step, like)
    assert_bit_identical(restored, states[2])
    assert meta == META

    if fault == "garbage_meta":
        with pytest.raises(
            checkpoint.DamagedCheckpointError, match="cannot read its meta: UnicodeDecodeError"
        ):
            checkpoint.restore_meta(directory, 3)
    else:
        assert checkpoint.restore_meta(directory, 3) == META  # the meta item is whole


def test_no_intact_step(three_steps, tmp_path):
    directory = _copy(three_steps, tmp_path)
    for step, fault in [(1, "garbage_meta"), (2, "truncated"), (3, "flipped")]:
        FAULTS[fault][0](pathlib.Path(directory, str(step)))
    found = checkpoint.newest_intact(directory)
    assert found.step is None
    assert [line.split(" is damaged")[0] for line in found.skipped] == [
        f"checkpoint {step} in {os.path.join(directory, str(step))!r}" for step in (3, 2, 1)
    ]
    assert all(line.endswith("; skipped") for line in found.skipped)
    assert checkpoint.newest_intact(str(tmp_path / "missing")) == (None, [])
    assert not (tmp_path / "missing").exists()


def test_intact_steps_and_resaving_a_damaged_step(three_steps, tmp_path):
    directory, states = _copy(three_steps, tmp_path), three_steps[1]
    assert checkpoint.newest_intact(directory).step == 3
    flip(pathlib.Path(directory, "3"))
    assert checkpoint.newest_intact(directory).step == 2
    # A run resumed from step 2 saves its own step 3; the damaged one is kept aside.
    checkpoint.save_checkpoint(directory, 3, states[1], META)
    assert os.path.isdir(os.path.join(directory, "3.replaced"))
    assert checkpoint.newest_intact(directory)[1:] == ([],)
    assert checkpoint.newest_intact(directory).step == 3
    restored, _ = checkpoint.restore_checkpoint(directory, 3, states[3])
    assert_bit_identical(restored, states[1])


def test_damaged_step_is_damaged_whatever_model_asks(three_steps, tmp_path):
    """A damaged step restored into another model's shapes: the advice is about the damage,
    not "use the configuration it was written with"."""
    directory = _copy(three_steps, tmp_path)
    flip(pathlib.Path(directory, "3"))
    with pytest.raises(checkpoint.DamagedCheckpointError, match="do not match their digest"):
        checkpoint.restore_checkpoint(directory, 3, _state("gru", units=16))
    with pytest.raises(checkpoint.CheckpointError, match="does not match this model"):
        checkpoint.restore_checkpoint(directory, 2, _state("gru", units=16))


def test_digest_is_sha256_of_paths_dtypes_shapes_and_bytes(tmp_path):
    """The saved digest against hashlib fed by hand, in the documented order (sorted paths)."""
    state = {"b": jnp.arange(3, dtype=jnp.int32), "a": [jnp.float32(1.5)]}
    meta = {"z": (1, 2), "a": "x"}
    checkpoint.save_checkpoint(str(tmp_path), 1, state, meta)
    with open(tmp_path / "1" / "meta" / "metadata") as f:
        digest = json.load(f)["_digest"]
    expected = hashlib.sha256(
        b"a/0\0float32\0()\0"
        + np.float32(1.5).tobytes()
        + b"b\0int32\0(3,)\0"
        + np.arange(3, dtype=np.int32).tobytes()
    )
    assert digest["state_sha256"] == expected.hexdigest()
    assert digest["meta_sha256"] == hashlib.sha256(b'{"a":"x","z":[1,2]}').hexdigest()
    restored, restored_meta = checkpoint.restore_checkpoint(str(tmp_path), 1, state)
    assert_bit_identical(restored, state)
    assert restored_meta == {"z": [1, 2], "a": "x"}  # as JSON reads back; no "_digest"


def test_one_changed_weight_is_detected(tmp_path):
    """Step 2's arrays differ from step 1's in one float, by one ulp: given step 1's digest,
    step 2 is damaged; the digests themselves differ."""
    state = _state("gru", units=16)
    kernel = np.asarray(state.params["rnn"]["recurrent_kernel"]).copy()
    kernel[3, 7] = np.nextafter(kernel[3, 7], np.float32(np.inf))
    changed = state._replace(
        params={**state.params, "rnn": {**state.params["rnn"], "recurrent_kernel": kernel}}
    )
    assert checkpoint._state_digest(changed) != checkpoint._state_digest(state)
    directory = str(tmp_path)
    checkpoint.save_checkpoint(directory, 1, state, META)
    checkpoint.save_checkpoint(directory, 2, changed, META)
    shutil.copy(tmp_path / "1" / "meta" / "metadata", tmp_path / "2" / "meta" / "metadata")
    with pytest.raises(checkpoint.DamagedCheckpointError, match="do not match their digest"):
        checkpoint.restore_checkpoint(directory, 2, state)
    assert checkpoint.newest_intact(directory).step == 1


def test_step_saved_before_digests_is_accepted(tmp_path, caplog):
    """A step written by the previous save (no "_digest" in its meta) still restores: runs
    begun before digests must resume; a warning says it could not be checked."""
    state = _state()
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, options=options, item_names=("state", "meta")) as mngr:
        mngr.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(META)
            ),
        )
    found = checkpoint.newest_intact(str(tmp_path))
    assert (found.step, found.skipped) == (1, [])
    restored, meta = checkpoint.restore_checkpoint(str(tmp_path), 1, state)
    assert_bit_identical(restored, state)
    assert meta == META and checkpoint.restore_meta(str(tmp_path), 1) == META
    assert "has no digest" in caplog.text


def test_meta_with_the_digest_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="_digest"):
        checkpoint.save_checkpoint(str(tmp_path), 1, _state(), {"_digest": "mine"})
    assert not (tmp_path / "1").exists()


def test_a_full_disk_is_one_line_and_the_failed_save_is_cleaned_on_reopening(tmp_path, monkeypatch):
    """Orbax's write fails as tensorstore reports ENOSPC, after creating its temporary
    directory: one CheckpointWriteError naming the disk, the previous step intact; the next
    writable opening of the directory (a resumed run) removes what the save left (the real disk
    is in tests/test_faults.py, where a tmpfs mounts)."""
    directory = str(tmp_path / "checkpoints")
    state = _state("gru", units=4)
    checkpoint.save_checkpoint(directory, 1, state, {"a": 1})
    before = sorted(os.listdir(directory))
    real_save = ocp.CheckpointManager.save

    def full(_self, step, *_args, **_kwargs):
        os.makedirs(os.path.join(directory, f"{step}.orbax-checkpoint-tmp-1234", "state"))
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: Failed to write 512 '
            "bytes to file 8: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save_checkpoint(directory, 2, state, {"a": 1})
    assert str(err.value) == (
        f"cannot write checkpoint 2 in {directory!r}: the disk is full; the previous "
        "checkpoints are intact (newest: step 1), and what the failed save left is removed "
        "when the run resumes. Free space (or make the directory writable) and rerun the same "
        "command to resume"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert checkpoint.newest_intact(directory).step == 1  # reading changes nothing
    assert sorted(os.listdir(directory)) == sorted([*before, "2.orbax-checkpoint-tmp-1234"])
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    with checkpoint.Checkpoints(directory) as checkpoints:
        checkpoints.save(2, state, {"a": 2})  # orbax's clean-up is done before its first save
    assert sorted(os.listdir(directory)) == sorted([*before, "2"])
    restored, meta = checkpoint.restore_checkpoint(directory, 2, state)
    assert meta == {"a": 2}
    assert_bit_identical(restored, state)
    # Any other failure is not dressed up as a disk problem.
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.save_checkpoint(directory, 3, state, {"a": 1})


_PROCESS_STATE = """
import logging, pathlib, sys, threading
from absl import logging as absl_logging
import numpy as np
from damage import truncate
from rnn_jax import checkpoint

def snapshot():
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(name) for name in list(root.manager.loggerDict)]
    hooks = (sys.unraisablehook, sys.excepthook, threading.excepthook)
    levels = [(logger.name, logger.level, list(logger.filters)) for logger in loggers]
    handlers = [(h, h.level, list(h.filters)) for x in loggers[1:] for h in x.handlers]
    return hooks, levels, handlers

directory = pathlib.Path(sys.argv[1])
state = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}
checkpoint.save_checkpoint(str(directory), 1, state, {"a": 1})  # orbax sets itself up here
before = snapshot()
checkpoint.save_checkpoint(str(directory), 2, state, {"a": 2})
truncate(directory / "2", every=True)
for _ in range(5):  # a failed read leaves others behind, some of the time
    found = checkpoint.newest_intact(str(directory))
    assert found.step == 1 and "damaged" in found.skipped[0], found
restored, meta = checkpoint.restore_checkpoint(str(directory), 1, state)
assert meta == {"a": 1} and (restored["w"] == state["w"]).all()
assert snapshot() == before, (before, snapshot())
print("unchanged")
"""


def test_the_library_changes_nothing_of_the_process(tmp_path):
    """Save, damage and restore from a plain Python process: the unraisable and exception hooks
    and every logger's level and filters are as they were after orbax's own first set-up
    (orbax adds an absl handler to the root logger: that one is not ours)."""
    run = subprocess.run(
        [sys.executable, "-c", _PROCESS_STATE, str(tmp_path / "checkpoints")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.dirname(__file__)},
    )
    assert run.returncode == 0 and run.stdout == "unchanged\n", run.stderr[-3000:]
