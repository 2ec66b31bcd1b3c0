"""The workdir lock against real second processes, and the metrics log across torn writes."""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys

import pytest

from rnn_jax import workdir as wd

# A second run: loads workdir.py by path (no JAX import, so it starts fast), takes the lock,
# says so, and holds it until its stdin closes.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("workdir", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.lock_workdir(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _start_holder(workdir: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, wd.__file__, workdir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A generous bound, not a timing: a holder that never starts fails the test, never hangs it.
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else "(nothing within 600 s)"
    if line != "locked\n":
        proc.kill()
        pytest.fail(f"the holder did not take the lock: {line!r} {proc.communicate()[1]}")
    return proc


def _finish(proc: subprocess.Popen) -> int:
    """Closes the holder's stdin (or it was killed), waits, and closes its pipes."""
    proc.communicate(timeout=900)
    return proc.returncode


def _snapshot(directory) -> dict:
    """Every path under ``directory`` with its bytes and modification time."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path, content = os.path.join(root, name), None
            with contextlib.suppress(IsADirectoryError), open(path, "rb") as f:
                content = f.read()
            found[os.path.relpath(path, directory)] = (content, os.stat(path).st_mtime_ns)
    return found


def test_lock_refuses_a_second_process_naming_its_pid_and_writing_nothing(tmp_path):
    workdir = tmp_path / "run"
    holder = _start_holder(str(workdir))
    try:
        (workdir / "metrics.jsonl").write_bytes(b'{"iteration": 1}\n')
        before = _snapshot(workdir)
        with pytest.raises(wd.WorkdirBusy) as e, wd.lock_workdir(str(workdir)):
            pytest.fail("took a lock that another process holds")
        after = _snapshot(workdir)
    finally:
        returncode = _finish(holder)
    message = str(e.value)
    assert f"pid {holder.pid} " in message
    assert f"workdir={str(workdir)!r}" in message
    assert "pass another workdir" in message
    assert after == before
    assert returncode == 0
    # Released by the holder's clean exit: the lock is free and its record emptied.
    assert (workdir / ".lock").read_bytes() == b""
    with wd.lock_workdir(str(workdir)):
        pass


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    holder = _start_holder(workdir)
    holder.send_signal(signal.SIGKILL)
    assert _finish(holder) == -signal.SIGKILL
    with wd.lock_workdir(workdir) as path:
        with open(path) as f:
            record = json.load(f)
        assert record["pid"] == os.getpid()
    assert f"pid {holder.pid} " in caplog.text
    assert "took over the lock" in caplog.text


def test_lock_is_reentrant_in_one_process_and_released_after_the_outer_block(tmp_path):
    workdir = str(tmp_path / "a" / "b")
    with wd.lock_workdir(workdir) as path:
        assert path == os.path.join(workdir, ".lock")
        record = (tmp_path / "a" / "b" / ".lock").read_bytes()
        # As a script holding the lock around fit, which takes it again by another path.
        with wd.lock_workdir(str(tmp_path / "a" / ".." / "a" / "b")):
            pass
        assert (tmp_path / "a" / "b" / ".lock").read_bytes() == record
        holder = subprocess.run(
            [sys.executable, "-c", HOLDER, wd.__file__, workdir],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert holder.returncode == 1
        assert f"WorkdirBusy: workdir={workdir!r} is in use by another run: pid {os.getpid()} " in (
            holder.stderr
        )
    with open(path, "rb") as f:
        assert f.read() == b""
    # A body that raises still releases the lock.
    with pytest.raises(KeyError), wd.lock_workdir(workdir):
        raise KeyError("x")
    assert _finish(_start_holder(workdir)) == 0


def test_lock_refuses_an_empty_workdir_and_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with (
        pytest.raises(ValueError, match=r"workdir='' is empty: pass a directory"),
        wd.lock_workdir(""),
    ):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"workdir='file' is a file"), wd.lock_workdir("file"):
        pass
    assert sorted(os.listdir(tmp_path)) == ["file"]


ROWS = [
    {"iteration": 1, "loss": 2.5, "accuracy": [0.1, 1e-300], "note": "two\nlines, é"},
    {"iteration": 2, "loss": 1.25, "step": 2**40, "nested": {"a": None, "b": True}},
]


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert wd.read_log(str(path)) == []
    for row in ROWS:
        wd.append_log(str(path), row)
    assert wd.read_log(str(path)) == ROWS
    assert path.read_bytes().count(b"\n") == 2  # a newline in a string stays escaped


def test_rewrite_keeps_only_the_given_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for row in ROWS:
        wd.append_log(str(path), row)
    wd.rewrite_log(str(path), ROWS[:1])
    assert wd.read_log(str(path)) == ROWS[:1]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    wd.rewrite_log(str(path), [])
    assert path.read_bytes() == b""


@pytest.mark.parametrize("torn", [b'{"iteration": 3, "lo', b'{"note": "\xc3', b"  "])
def test_a_torn_last_line_is_dropped_and_the_file_repaired(tmp_path, caplog, torn):
    path = tmp_path / "metrics.jsonl"
    good = b'{"iteration": 1}\n{"iteration": 2}\n'
    path.write_bytes(good + torn)
    assert wd.read_log(str(path), repair=False) == [{"iteration": 1}, {"iteration": 2}]
    assert path.read_bytes() == good + torn
    assert wd.read_log(str(path)) == [{"iteration": 1}, {"iteration": 2}]
    assert path.read_bytes() == good
    assert "dropped a torn last line" in caplog.text
    assert str(path) in caplog.text
    wd.append_log(str(path), {"iteration": 3})
    assert wd.read_log(str(path)) == [{"iteration": 1}, {"iteration": 2}, {"iteration": 3}]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iteration": 1}\n{"iteration": 2}')
    assert wd.read_log(str(path)) == [{"iteration": 1}, {"iteration": 2}]
    assert path.read_bytes() == b'{"iteration": 1}\n{"iteration": 2}\n'
    assert "no newline" in caplog.text
    assert "repaired" in caplog.text


@pytest.mark.parametrize(
    "bad, number",
    [
        (b'{"iteration": 1}\nnot json\n{"iteration": 3}\n', 2),
        (b'{"iteration": 1}\n\n{"iteration": 2}\n{"iteration": 3, "lo\n', 4),
        (b'[1, 2]\n{"iteration": 2}\n', 1),
    ],
)
def test_a_damaged_complete_line_is_named_and_left_alone(tmp_path, bad, number):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(bad)
    with pytest.raises(ValueError) as e:
        wd.read_log(str(path))
    message = str(e.value)
    assert f"{str(path)!r} line {number} is not a JSON object" in message
    assert "fix or delete that line, or pass a new workdir" in message
    assert path.read_bytes() == bad


def test_storage_problems_are_named_from_errno_or_text():
    import errno

    assert (
        wd.storage_problem(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    )
    assert wd.storage_problem(OSError(errno.EROFS, "x")) == "the filesystem is read-only"
    # orbax re-raises tensorstore's error as a ValueError carrying the errno in its text.
    wrapped = ValueError("RESOURCE_EXHAUSTED: Failed to write 71008 bytes [os_error_code='28']")
    assert wd.storage_problem(Exception("outer").with_traceback(None)) is None
    try:
        raise RuntimeError("while saving") from wrapped
    except RuntimeError as e:
        assert wd.storage_problem(e) == "the disk is full"
    assert wd.storage_problem(ValueError("something else")) is None


def test_a_failed_append_is_one_clear_error_and_the_log_stays_readable(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "metrics.jsonl")
    wd.append_log(path, {"iteration": 1})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        wd.WorkdirError, match=r"cannot append to '.*metrics.jsonl': the disk is full"
    ):
        wd.append_log(path, {"iteration": 2})
    with pytest.raises(wd.WorkdirError, match=r"cannot rewrite .*: the disk is full"):
        wd.rewrite_log(path, [{"iteration": 1}])
    monkeypatch.undo()
    assert not os.path.exists(path + ".tmp")  # the failed rewrite's temporary file is gone
    assert wd.read_log(path)[0] == {"iteration": 1}
