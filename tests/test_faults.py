"""The fault table of docs/reliability.md, walked on the command line of the char-LM experiment.

Each case starts ``python -m experiments.char_lm`` on a tiny corpus (usually on a copy of a
finished run's workdir, damaged first) and asserts the exit status, the one line it prints
(an error line on stderr, or what the run said it did) and that no file of the workdir was
lost or changed: a refused run leaves it byte for byte; a run that recovers only adds (a
damaged step is set aside as ``<step>.replaced``, never deleted) and ends with the state of an
uninterrupted run, bit for bit. Then ``kill -9`` at chosen and random points (during a
checkpoint write, in the middle of an epoch) followed by reruns must end bit-identical to a run
never stopped, with a whole ``metrics.jsonl``.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from damage import delete_array_metadata, delete_arrays, flip, garbage_meta, truncate
from helpers import assert_bit_identical, mount_tmpfs, snapshot, tiny_text, tmpfs, unmount

from experiments import char_lm
from rnn_jax import checkpoint, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(units=8, batch_size=64, num_preds=12)
ITERATIONS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(tiny_text(0, 40))
    return path


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> tuple[pathlib.Path, char_lm.Result]:
    """A finished run's workdir (written in process) and its result."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    config = char_lm.Config(text=str(corpus), iterations=ITERATIONS, **TINY)
    return workdir, char_lm.run(config, str(workdir), out=lambda *_: None)


def _args(corpus, directory, **flags) -> list[str]:
    flags = {"text": corpus, "iterations": ITERATIONS, **TINY, "workdir": directory, **flags}
    return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture
def launch(start_experiment) -> Callable[[list[str]], subprocess.Popen]:
    """``python -m experiments.char_lm ARGS`` (tests/conftest.py)."""
    return lambda args: start_experiment("char_lm", *args)


def _steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _final_state(workdir: pathlib.Path, like):
    ckpt = str(workdir / "checkpoints")
    return checkpoint.restore_checkpoint(ckpt, checkpoint.latest_step(ckpt), like)[0]


# The only fields of a metrics row that differ between a run and its rerun: wall times.
WALL = ("seconds", "compile_seconds", "examples_per_second")


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in WALL} for row in rundir.read_history(workdir)]


# --- The table ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """One row: ``damage(workdir, tmp) -> extra flags`` on a copy of a finished run (or on no
    workdir at all, ``finished=False``); the exit status; a regex that the error line (status
    1) or a line of the output (status 0) must match."""

    name: str
    damage: Callable[[pathlib.Path, pathlib.Path], dict]
    status: int
    says: str
    finished: bool = True
    # Recovering rows: the run resumes from the newest step (0), or the one before it (1, the
    # newest being damaged), or trains nothing (None).
    resumes_from: int | None = None
    # Recovering rows: metrics.jsonl ends as the finished run's (or stays absent).
    whole_log: bool = True


def _latest(workdir):
    return workdir / "checkpoints" / str(_steps(workdir)[-1])


def _damaged_latest(hurt, **kwargs):
    def damage(workdir, tmp):
        hurt(_latest(workdir), **kwargs)
        return {"iterations": ITERATIONS}

    return damage


def _all_damaged(workdir, tmp):
    for step in _steps(workdir):
        flip(workdir / "checkpoints" / str(step), every=True)
    return {}


def _torn_metrics(workdir, tmp):
    with open(workdir / "metrics.jsonl", "ab") as f:
        f.write(b'{"iteration": 4, "loss": 1.2')  # a kill during the write of a next row
    return {}


def _bad_metrics_line(workdir, tmp):
    lines = (workdir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = b"this is not json\n"
    (workdir / "metrics.jsonl").write_bytes(b"".join(lines))
    return {}


def _other_text_same_vocabulary(workdir, tmp):
    # The same characters and length, another order: only the digest tells them apart.
    original = (tmp / "corpus.txt").read_text()
    shuffled = "\n".join(reversed(original.splitlines())) + "\n"
    (tmp / "other.txt").write_text(shuffled)
    return {"text": tmp / "other.txt"}


def _utf16(workdir, tmp):
    (tmp / "utf16.txt").write_text(tiny_text(0, 40), encoding="utf-16")
    return {"text": tmp / "utf16.txt"}


def _binary(workdir, tmp):
    (tmp / "blob.bin").write_bytes(bytes(range(256)) * 64)
    return {"text": tmp / "blob.bin"}


def _flag(**flags):
    return lambda workdir, tmp: flags


def _other_config(workdir, tmp):
    return {"units": 16}


def _workdir_is_a_file(workdir, tmp):
    shutil.rmtree(workdir)
    workdir.write_text("not a directory\n")
    return {}


def _directory(name):
    def damage(workdir, tmp):
        path = workdir / name
        if path.exists():
            path.unlink()
        path.mkdir()
        return {}

    return damage


def _read_only_workdir(workdir, tmp):
    mount_tmpfs(tmp / "ro", "ro,size=64k")  # unmounted by test_fault
    return {"workdir": tmp / "ro" / "new"}


def _fifo(workdir, tmp):
    os.mkfifo(tmp / "fifo")  # no writer: reading it would wait for ever
    return {"text": tmp / "fifo"}


def _cache_is_a_file(workdir, tmp):
    (tmp / "cache").write_text("not a directory")
    return {"compilation_cache": tmp / "cache"}


def _no_metrics(workdir, tmp):
    (workdir / "metrics.jsonl").unlink()
    return {}


FAULTS = [
    # A flip in raw array bytes fails the digest; one in the database's own records fails
    # the read: either way the step is named as damaged and skipped.
    Fault(
        "flipped_bytes",
        _damaged_latest(flip, every=True),
        0,
        r"checkpoint \d+ in '.*' is damaged \((its arrays do not match their digest|cannot read)",
        resumes_from=1,
    ),
    Fault(
        "truncated_arrays",
        _damaged_latest(truncate, every=True),
        0,
        r"is damaged \(cannot read its array",
        resumes_from=1,
    ),
    Fault(
        "no_array_metadata",
        _damaged_latest(delete_array_metadata),
        0,
        r"metadata is missing",
        resumes_from=1,
    ),
    Fault(
        "no_state_dir", _damaged_latest(delete_arrays), 0, r"its array directory", resumes_from=1
    ),
    Fault(
        "garbage_meta",
        _damaged_latest(garbage_meta),
        0,
        r"cannot read its meta: UnicodeDecodeError",
        resumes_from=1,
    ),
    Fault(
        "all_damaged", _all_damaged, 1, r"^error: no intact checkpoint in '.*': all 3 are damaged"
    ),
    Fault("torn_metrics_line", _torn_metrics, 0, r"metrics\.jsonl.*torn"),
    Fault(
        "bad_metrics_line",
        _bad_metrics_line,
        1,
        r"^error: .*metrics\.jsonl.* line 2 ",
    ),
    Fault(
        "other_text_same_vocabulary",
        _other_text_same_vocabulary,
        1,
        r"^error: --workdir='.*' holds the results of char_lm with another configuration \(.*"
        r"--text=\.\.\.: sha256 ",
    ),
    Fault("other_config", _other_config, 1, r"^error: .*--units=16 differs from the earlier 8"),
    Fault("utf16_text", _utf16, 1, r"^error: --text='.*' is UTF-16 \(little-endian\) text.*iconv"),
    Fault("binary_text", _binary, 1, r"^error: --text='.*' looks like a binary file"),
    Fault("nan_temperature", _flag(temperature="nan"), 1, r"^error: --temperature=nan must be"),
    Fault("inf_epsilon", _flag(epsilon="inf"), 1, r"^error: --epsilon=inf must be finite"),
    Fault("nan_clip_norm", _flag(clip_norm="nan"), 1, r"^error: --clip_norm=nan must be finite"),
    Fault(
        "zero_checkpoint_every", _flag(checkpoint_every=0), 1, r"^error: --checkpoint_every=0 must"
    ),
    Fault("empty_workdir", _flag(workdir=""), 1, r"^error: --workdir='' is empty", finished=False),
    Fault("workdir_is_a_file", _workdir_is_a_file, 1, r"^error: --workdir='.*' is a file"),
    Fault(
        "metrics_is_a_directory", _directory("metrics.jsonl"), 1, r"metrics\.jsonl is a directory"
    ),
    Fault("samples_is_a_directory", _directory("samples.txt"), 1, r"samples\.txt is a directory"),
    Fault(
        "new_workdir_on_a_read_only_disk",
        _read_only_workdir,
        1,
        r"^error: --workdir='.*/new' cannot be created \(the filesystem is read-only\)",
        finished=False,
    ),
    Fault(
        "new_workdir_under_proc",
        _flag(workdir="/proc/rnn_jax_run"),
        1,
        r"^error: --workdir='/proc/rnn_jax_run' cannot be created",
        finished=False,
    ),
    Fault("huge_seed", _flag(seed="99999999999999999999"), 1, r"^error: --seed=\d+ must be an"),
    Fault(
        "dev_zero_text", _flag(text="/dev/zero"), 1, r"^error: --text='/dev/zero' is not a regular"
    ),
    Fault("fifo_text", _fifo, 1, r"^error: --text='.*fifo' is not a regular file"),
    Fault("tiny_clip_norm", _flag(clip_norm="1e-50"), 1, r"^error: --clip_norm=1e-50 is below"),
    Fault("tiny_learning_rate", _flag(learning_rate="1e-50"), 1, r"^error: --learning_rate=1e-50"),
    Fault("tiny_epsilon", _flag(epsilon="1e-50"), 1, r"^error: --epsilon=1e-50 is below"),
    Fault(
        "compilation_cache_is_a_file",
        _cache_is_a_file,
        0,
        r"^warning: running without the compilation cache: '.*cache' cannot be written",
    ),
    Fault(
        "rerun_without_metrics",
        _no_metrics,
        0,
        r"^all 3 iterations are done .*: nothing to do",
        whole_log=False,
    ),
    Fault(
        "rerun_of_a_finished_run",
        _flag(),
        0,
        r"^all 3 iterations are done .*: nothing to do; raise iterations to train further$",
    ),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_fault(fault, finished, corpus, tmp_path, launch):
    finished_dir, result = finished
    workdir = tmp_path / "run"
    shutil.copy(corpus, tmp_path / "corpus.txt")
    if fault.finished:
        shutil.copytree(finished_dir, workdir)
    before_damage = snapshot(workdir) if fault.finished else None
    flags = fault.damage(workdir, tmp_path)
    before = snapshot(workdir) if workdir.is_dir() else None
    if workdir.is_file():
        before = workdir.read_bytes()
    proc = launch(_args(tmp_path / "corpus.txt", workdir, **flags))
    try:
        stdout, stderr = proc.communicate(timeout=900)  # a bound against a hang, not a timing
    finally:
        if os.path.ismount(tmp_path / "ro"):
            unmount(tmp_path / "ro")
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == fault.status, stderr
    if fault.status == 1:
        # One error line, the last; before it on stdout at most the corpus's summary.
        assert [e for e in errors if e.startswith("error:")] == errors[-1:], stderr
        summary = re.compile(r"^\d+ characters(, \d+ held out)?, vocabulary of ")
        assert all(summary.match(line) for line in stdout.splitlines()), stdout
        assert _matches(fault.says, errors[-1]), errors[-1]
        # Refused: the workdir is exactly as it was (or still absent).
        if before is None:
            assert not workdir.exists() or flags.get("workdir") == ""
        elif isinstance(before, bytes):
            assert workdir.read_bytes() == before
        else:
            assert snapshot(workdir) == before
        return
    lines = stdout.splitlines() + stderr.splitlines()
    assert any(_matches(fault.says, line) for line in lines), stdout + stderr
    steps = _steps(finished_dir)
    resumed = [line for line in lines if line.startswith("resuming from step ")]
    if fault.resumes_from is None:
        assert resumed == [], resumed
    else:
        assert len(resumed) == 1 and resumed[0].startswith(
            f"resuming from step {steps[-1 - fault.resumes_from]} in "
        ), resumed
    # Recovered: every file of the finished run is still there, unchanged or set aside
    # (a damaged step), and the run ends where the uninterrupted one did, bit for bit.
    after = snapshot(workdir)
    for name, content in before_damage.items():
        if name == "metrics.jsonl":
            continue
        kept = after.get(name)
        if name == "samples.txt":  # appended to, never rewritten
            assert kept.startswith(content), name
            continue
        if kept != content:
            step, rest = name.split("/", 2)[1], name.split("/", 2)[2:]
            aside = os.path.join("checkpoints", f"{step}.replaced", *rest)
            assert after.get(aside) == before.get(name), name
    assert_bit_identical(_final_state(workdir, result.state), result.state)
    if fault.whole_log:
        assert _rows(workdir) == _rows(finished_dir)
    else:  # nothing trained, nothing rebuilt: the log stays absent, samples.txt as it was
        assert not (workdir / "metrics.jsonl").exists()
        assert after["samples.txt"] == before_damage["samples.txt"]


def _matches(pattern: str, line: str) -> bool:
    return re.search(pattern, line) is not None


# --- Disk full and read-only: a real small filesystem (tmpfs), where this machine may mount ---


def _allocated_kb(directory: pathlib.Path) -> int:
    """What ``directory`` takes on disk, in kB (``du``: whole 4 kB blocks, as tmpfs counts)."""
    out = subprocess.run(["du", "-sk", str(directory)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_disk_full_then_freed_and_read_only(finished, corpus, tmp_path, launch):
    """A disk of twice a checkpoint's size on disk (tmpfs stores one in less, so one to three
    fit, where a run keeps three): a save fails with one line, the partial step removed, the
    previous ones intact.
    Remounted read-only: one line, nothing changed. With room again the run finishes as if
    never stopped."""
    finished_dir, _ = finished
    step_kb = _allocated_kb(finished_dir / "checkpoints" / str(_steps(finished_dir)[-1]))
    with tmpfs(tmp_path / "disk", f"size={2 * step_kb}k") as disk:
        workdir = disk / "run"
        args = _args(corpus, workdir, iterations=5)
        proc = launch(args)
        stdout, stderr = proc.communicate(timeout=900)
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and [e for e in errors if "error" in e] == errors[-1:], stderr
        found = re.match(
            r"^error: cannot write checkpoint (\d+) in '.*': the disk is full; the previous "
            r"checkpoints are intact \(newest: step (\d+)\), and what the failed save left is "
            r"removed when the run resumes\. Free space .* rerun the same command to resume$",
            errors[-1],
        )
        assert found, errors[-1]
        failed, newest = int(found.group(1)), int(found.group(2))
        assert _steps(workdir)[-1] == newest < failed, _steps(workdir)
        kept = snapshot(workdir)

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = launch(args)
        stdout, stderr = proc.communicate(timeout=900)
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and [e for e in errors if "error" in e] == errors[-1:], stderr
        assert "Read-only file system" in errors[-1] and errors[-1].startswith("error: --workdir=")
        assert snapshot(workdir) == kept

        subprocess.run(["mount", "-o", "remount,rw,size=8m", str(disk)], check=True)
        proc = launch(args)
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr
        assert f"resuming from step {newest} " in stdout
        resumed = rundir.read_history(str(workdir))
        assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5]
        # What the failed save left is gone: the directory holds whole steps only.
        assert all(name.isdigit() for name in os.listdir(workdir / "checkpoints"))
        digest = _state_digest(workdir)

    clean = tmp_path / "clean"
    proc = launch(_args(corpus, clean, iterations=5))
    proc.communicate(timeout=900)
    assert proc.returncode == 0
    assert digest == _state_digest(clean)


def _state_digest(workdir: pathlib.Path) -> str:
    """The sha256 of the newest checkpoint's arrays, as saved beside them (equal digests:
    bit-identical states)."""
    step = checkpoint.latest_step(str(workdir / "checkpoints"))
    meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    return meta[checkpoint.DIGEST_KEY]["state_sha256"]


# --- Two runs, one workdir ------------------------------------------------------------------


def test_second_run_on_a_busy_workdir_is_refused_writing_nothing(
    finished, corpus, tmp_path, launch
):
    workdir = tmp_path / "run"
    first = launch(_args(corpus, workdir, iterations=1000, progress_seconds=0.01))
    try:
        _wait_for(first, "Iteration #: 1")
        before = _settled(snapshot(workdir))
        second = launch(_args(corpus, workdir, iterations=1000))
        _, stderr = second.communicate(timeout=900)
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert second.returncode == 1 and [e for e in errors if "error" in e] == errors[-1:]
        assert f"is in use by another run: pid {first.pid} on host " in errors[-1]
        # Nothing written by the second run: the files are the first run's (which goes on,
        # its temporary files coming and going as it writes).
        after = _settled(snapshot(workdir))
        assert set(before) <= set(after)
    finally:
        first.kill()
        first.communicate()


def _settled(files: dict) -> dict:
    """``files`` without those a running run writes and renames away (``*.tmp``, orbax's
    temporary step directories)."""
    return {
        k: v
        for k, v in files.items()
        if not k.endswith(".tmp") and ".orbax-checkpoint-tmp" not in k
    }


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 900) -> list[str]:
    """Reads ``proc``'s stdout until a line contains ``text``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"ended before {text!r}: {proc.stderr.read()}")
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} within {timeout} s")


# --- kill -9 ------------------------------------------------------------------------------


# The experiment in a child whose second checkpoint commit is killed: orbax has written the
# step whole to its temporary directory and is about to rename it into place.
_KILLED_AT_COMMIT = """
import os, runpy, signal, sys
real_rename, commits = os.rename, []

def rename(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)).isdigit():
        commits.append(dst)
        if len(commits) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *args, **kwargs)

os.rename = rename
sys.argv = ["char_lm", *sys.argv[1:]]
runpy.run_module("experiments.char_lm", run_name="__main__")
"""


def test_kill_9_anywhere_resumes_bit_identically(corpus, tmp_path, launch):
    """The tiny corpus (30 steps per epoch) in calls of 5 steps, a checkpoint every 10 steps
    and after every iteration: killed as a checkpoint is committed (the step written whole,
    not yet renamed into place), in the middle of an epoch (after a progress line, its
    mid-epoch checkpoint written) and after an iteration's line, each followed by a rerun;
    the last rerun finishes. Every kill is placed by what the run has done, never by a clock.
    The final state and metrics.jsonl equal those of a run never stopped, and the epoch
    resumed mid-way keeps the training seconds counted before the kill."""
    text = corpus
    flags = dict(iterations=3, steps_per_call=5, checkpoint_every=10, progress_seconds=0.001)
    config = char_lm.Config(
        text=str(text), **{**TINY, **flags, "progress_seconds": None, "checkpoint_every": None}
    )
    reference = char_lm.run(config, str(tmp_path / "reference"), out=lambda *_: None)
    workdir = tmp_path / "run"
    args = _args(text, workdir, **flags)

    # 1. As a checkpoint is committed.
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_COMMIT, *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert _steps(workdir) == [10]  # the first step; the second was not renamed into place

    # 2. In the middle of an epoch, after its mid-epoch checkpoint: a progress line follows it.
    proc = launch(args)
    _wait_for(proc, "steps (")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    newest = _steps(workdir)[-1]
    progress = checkpoint.restore_meta(str(workdir / "checkpoints"), newest)[rundir.PROGRESS_KEY]
    assert progress["steps"] > 0, progress  # inside an epoch
    counted = (progress["iteration"] + 1, progress["seconds"])

    # 3. After iteration 2's line, before or after its checkpoint.
    proc = launch(args)
    _wait_for(proc, "Iteration #: 2")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    proc = launch(args)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert_bit_identical(_final_state(workdir, reference.state), reference.state)
    rows = rundir.read_history(str(workdir))
    assert [{k: v for k, v in r.items() if k not in WALL} for r in rows] == [
        {k: v for k, v in r.items() if k not in WALL} for r in reference.history
    ]
    iteration, seconds = counted
    assert rows[iteration - 1]["seconds"] >= seconds  # the clock went on from the checkpoint


def test_ctrl_c_and_sigterm_checkpoint_and_say_how_to_resume(corpus, tmp_path, launch):
    """SIGINT, then SIGTERM on the rerun: each stops at the next call boundary with a
    checkpoint of that step, one line and exit status 130 / 143; the last rerun ends
    bit-identical to a run never stopped."""
    flags = dict(iterations=4, steps_per_call=5, progress_seconds=0.001)
    config = char_lm.Config(text=str(corpus), **{**TINY, **flags, "progress_seconds": None})
    reference = char_lm.run(config, str(tmp_path / "reference"), out=lambda *_: None)
    workdir = tmp_path / "run"
    args = _args(corpus, workdir, **flags)
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = launch(args)
        _wait_for(proc, "steps (")  # training, between two calls
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=900)
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == status, stderr
        found = re.fullmatch(
            r"interrupted at step (\d+); rerun the same command to resume", errors[-1]
        )
        assert found and "Traceback" not in stderr, stderr
        assert _steps(workdir)[-1] == int(found.group(1))
    proc = launch(args)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert_bit_identical(_final_state(workdir, reference.state), reference.state)
    assert _rows(workdir) == [
        {
            k: v
            for k, v in r.items()
            if k not in ("seconds", "compile_seconds", "examples_per_second")
        }
        for r in reference.history
    ]


# --- The other experiments' command lines: a workdir that holds another run's results --------

_SWEEP = (
    "--cells=lstm",
    "--lengths=4",
    "--seeds=2",
    "--steps=4",
    "--eval_every=2",
    "--batch_size=4",
    "--test_size=16",
    "--units=3",
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, start_experiment) -> pathlib.Path:
    """A finished long_range sweep's workdir (the command line, tiny)."""
    workdir = tmp_path_factory.mktemp("sweep") / "run"
    proc = start_experiment("long_range", *_SWEEP, f"--workdir={workdir}")
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    return workdir


@pytest.mark.parametrize(
    "case,says",
    [
        ("another_sweep", r"holds the results of long_range with another configuration \(.*"),
        ("probe_into_its_sweep", r"holds the results of long_range, not of gradient_flow"),
        ("probe_damaged_params", r"checkpoint 4 in '.*/params/lstm_T4/4' is damaged \(.*"),
        ("probe_npz_params", r"lstm_T4\.npz holds params saved as \.npz .* rerun its sweep"),
        ("too_long_for_memory", r"^error: lengths: at sequences of 1000000 steps .* GB are free"),
        ("compare_a_char_lm_run", r"is not a run of experiments\.topologies"),
    ],
)
def test_other_experiments_refuse_in_one_line(
    case, says, sweep, finished, tmp_path, launch, start_experiment
):
    """Each refusal is one line, exit 1, and every file of the workdir it names is kept."""
    workdir = tmp_path / "run"
    shutil.copytree(sweep, workdir)
    if case == "another_sweep":  # the same sweep with another cell, in the same workdir
        args = ("long_range", *_SWEEP[1:], "--cells=gru", f"--workdir={workdir}")
    elif case.startswith("probe_"):
        params = workdir / "params" / "lstm_T4"
        if case == "probe_damaged_params":
            flip(params / "4", every=True)
        elif case == "probe_npz_params":  # as an earlier long_range saved them
            shutil.rmtree(params)
            params.with_suffix(".npz").write_bytes(b"PK\x05\x06" + bytes(18))
        flow = workdir if case == "probe_into_its_sweep" else tmp_path / "flow"
        args = (
            "gradient_flow",
            "--configs=lstm",
            "--lengths=4",
            "--units=3",
            "--seeds=2",
            f"--trained_from={workdir}",
            f"--workdir={flow}",
        )
    elif case == "too_long_for_memory":
        workdir = tmp_path / "long"
        args = ("long_range", "--cells=gru", "--lengths=1000000", "--seeds=1", "--test_size=1")
        args += (f"--workdir={workdir}",)
    else:
        shutil.rmtree(workdir)
        shutil.copytree(finished[0], workdir)
        args = ("compare_topologies", f"--runs={workdir}", f"--workdir={tmp_path / 'figures'}")
    before = snapshot(workdir) if workdir.exists() else {}
    proc = start_experiment(*args)
    _, stderr = proc.communicate(timeout=900)
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, stderr
    assert [e for e in errors if e.startswith("error:")] == errors[-1:], stderr
    assert re.search(says, errors[-1]), errors[-1]
    assert (snapshot(workdir) if workdir.exists() else {}) == before
