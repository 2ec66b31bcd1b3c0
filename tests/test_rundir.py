"""A run's directory as one object: whose run it holds, what a resumed run may change, the
newest intact checkpoint read once, the log cut to it, files of the wrong kind named, and the
lock held for as long as it is open."""

import json
import os
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import snapshot

from rnn_jax import checkpoint, rundir, workdir

META = {"experiment": "toy", "config": {"units": 4, "lr": 0.1}}


class _State(NamedTuple):
    step: jax.Array
    w: jax.Array


def _state(step: int, value: float = 1.0) -> _State:
    return _State(jnp.int32(step), jnp.full((3,), value, jnp.float32))


def _train(path, iterations, meta=META, value=1.0):
    """A toy run: one row and one checkpoint per iteration, resumed where it stands."""
    with rundir.open_run(str(path), meta) as run:
        state = run.restore(_state(0, value))
        for iteration in range(run.position.iteration + 1, iterations + 1):
            state = _state(iteration, value * iteration)
            run.log({"iteration": iteration, "loss": 1.0 / iteration})
            run.save(state, rundir.Position(iteration))
        return run.history, state, run.resumed


def test_a_run_resumes_its_own_directory_and_reads_the_newest_step_once(tmp_path, monkeypatch):
    history, state, resumed = _train(tmp_path / "run", 2)
    assert [r["iteration"] for r in history] == [1, 2] and resumed is None
    reads = []
    real_read = checkpoint.Checkpoints.read
    monkeypatch.setattr(
        checkpoint.Checkpoints,
        "read",
        lambda self, step: reads.append(step) or real_read(self, step),
    )
    history, state, resumed = _train(tmp_path / "run", 4)
    assert reads == [2] and resumed == 2  # the newest step, read once
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    assert float(state.w[0]) == 4.0
    with open(tmp_path / "run" / "run.json") as f:
        assert json.load(f) == META
    assert [r["iteration"] for r in rundir.read_history(str(tmp_path / "run"))] == [1, 2, 3, 4]


def test_rows_logged_after_the_last_checkpoint_are_trained_again(tmp_path):
    _train(tmp_path / "run", 2)
    workdir.append_log(str(tmp_path / "run" / "metrics.jsonl"), {"iteration": 3, "loss": 9.0})
    with rundir.open_run(str(tmp_path / "run"), META) as run:
        assert run.position == rundir.Position(2) and run.resumed == 2
        assert [r["iteration"] for r in run.history] == [1, 2]
    assert [r["iteration"] for r in rundir.read_history(str(tmp_path / "run"))] == [1, 2]


@pytest.mark.parametrize(
    "other,named",
    [
        ({"experiment": "another", "config": {"units": 4, "lr": 0.1}}, "toy, not of another"),
        ({"experiment": "toy", "config": {"units": 8, "lr": 0.1}}, "units=8 differs from the"),
    ],
)
def test_another_experiment_or_configuration_is_refused_and_nothing_changes(tmp_path, other, named):
    _train(tmp_path / "run", 2)
    before = snapshot(tmp_path / "run")
    with pytest.raises(workdir.WorkdirError) as err:
        _train(tmp_path / "run", 3, meta=other)
    message = str(err.value)
    assert message.startswith(f"workdir={str(tmp_path / 'run')!r} holds the results of toy")
    assert named in message and "pass another workdir" in message and "\n" not in message
    assert snapshot(tmp_path / "run") == before


def test_a_directory_without_a_record_is_checked_against_its_checkpoint(tmp_path):
    _train(tmp_path / "run", 1)
    os.remove(tmp_path / "run" / "run.json")  # as a directory written before records
    with pytest.raises(checkpoint.CheckpointError, match="units=8 differs from the earlier 4"):
        _train(tmp_path / "run", 2, meta={"experiment": "toy", "config": {"units": 8, "lr": 0.1}})
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    "name,kind",
    [("metrics.jsonl", "a directory"), ("run.json", "a directory"), ("checkpoints", "a file")],
)
def test_a_file_of_the_wrong_kind_is_one_line(tmp_path, name, kind):
    path = tmp_path / "run"
    path.mkdir()
    if kind == "a directory":
        (path / name).mkdir()
    else:
        (path / name).write_text("x")
    before = sorted(os.listdir(path))
    with pytest.raises(workdir.WorkdirError) as err:
        _train(path, 1)
    assert str(err.value).startswith(f"workdir={str(path)!r}: {name} is {kind}")
    assert sorted(os.listdir(path)) == sorted([*before, ".lock"])  # the lock, taken first
    assert (path / ".lock").read_bytes() == b""  # released


_HOLDER_PROBE = """
import sys
from rnn_jax import workdir
try:
    with workdir.lock_workdir(sys.argv[1]):
        print("free")
except workdir.WorkdirBusy as e:
    print("busy")
"""


def test_the_directory_is_locked_while_the_run_is_open(tmp_path):
    def probe():
        done = subprocess.run(
            [sys.executable, "-c", _HOLDER_PROBE, str(tmp_path / "run")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        return done.stdout.strip()

    with rundir.open_run(str(tmp_path / "run"), META):
        assert probe() == "busy"
    assert probe() == "free"


def test_appended_files_are_never_rewritten(tmp_path):
    with rundir.open_run(str(tmp_path / "run"), META) as run:
        run.append("samples.txt", "one\n")
    with rundir.open_run(str(tmp_path / "run"), META) as run:
        run.append("samples.txt", "two\n")
    assert (tmp_path / "run" / "samples.txt").read_text() == "one\ntwo\n"


def test_no_path_writes_nothing():
    with rundir.open_run(None, META) as run:
        run.log({"iteration": 1})
        run.save(_state(1), rundir.Position(1))
        run.append("samples.txt", "x")
        assert run.restore("like") == "like" and run.history == [{"iteration": 1}]


def test_position_round_trips_through_json_exactly():
    sums = {"loss": np.float32(1.0) / np.float32(3.0), "examples": np.int32(7)}
    position = rundir.Position(2, 1, 30, sums, 1.5)
    back = rundir.Position.from_meta(
        {rundir.PROGRESS_KEY: json.loads(json.dumps(position.to_json()))}, 99
    )
    assert back[:3] == (2, 1, 30) and back.seconds == 1.5
    for k, v in sums.items():
        assert back.sums[k].dtype == v.dtype and back.sums[k].tobytes() == np.asarray(v).tobytes()
    assert rundir.Position.from_meta({}, 5) == rundir.Position(5)
