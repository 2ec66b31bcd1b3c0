"""The char-RNN end to end: the experiment script, exact resume, every bad input, Alice."""

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from rnn_jax import char_lm, checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(units=8, batch_size=64, num_preds=12)
TINY_FLAGS = ["--units=8", "--batch_size=64", "--num_preds=12"]


def _tiny_text():
    rng = np.random.default_rng(0)
    words = "the sky was falling and alice saw a white rabbit run down into the hole".split()
    lines = [" ".join(rng.choice(words, 10)).capitalize() + "." for _ in range(40)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(_tiny_text())
    return str(path)


def _run(args, timeout=240):
    """``python -m experiments.char_lm ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.char_lm", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _run_many(arg_lists):
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(_run, arg_lists))


def _snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- The script end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, text_path):
    """Two iterations of the experiment on the tiny text: ``(workdir, completed process)``."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    proc = _run([f"--text={text_path}", f"--workdir={workdir}", "--iterations=2", *TINY_FLAGS])
    return workdir, proc


def test_experiment_end_to_end(cli_run):
    workdir, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Iteration #: 1" in out and "Iteration #: 2" in out
    rows = _rows(workdir)
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert {
            "loss",
            "accuracy",
            "bits_per_char",
            "seconds",
            "examples_per_second",
            "seed",
            "generated",
        } <= set(r)
        assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
        assert len(r["seed"]) == 10 and len(r["generated"]) == 12
        assert f'Generating from seed: "{r["seed"]}"' in out
        assert r["seed"] + r["generated"] in out  # the tutorial's print: seed then generation
    assert rows[1]["loss"] < rows[0]["loss"] < math.log(len(set(_tiny_text().lower())))
    with open(os.path.join(workdir, "samples.txt")) as f:
        assert rows[1]["seed"] + "|" + rows[1]["generated"] in f.read()
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 2


def test_experiment_resumes_from_last_iteration(cli_run, text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(cli_run[0], workdir)
    proc = _run([f"--text={text_path}", f"--workdir={workdir}", "--iterations=3", *TINY_FLAGS])
    assert proc.returncode == 0, proc.stderr
    assert "Iteration #: 3" in proc.stdout and "Iteration #: 2" not in proc.stdout
    rows = _rows(workdir)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[:2] == _rows(cli_run[0])


def _mismatch(cli_run, tmp_path, args):
    workdir = str(tmp_path / "run")
    shutil.copytree(cli_run[0], workdir)
    before = _snapshot(workdir)
    proc = _run([f"--workdir={workdir}", "--iterations=3", *args])
    assert proc.returncode != 0
    assert _snapshot(workdir) == before, "the refused run changed the existing workdir"
    return proc.stderr


def test_checkpoint_with_other_config_is_refused(cli_run, text_path, tmp_path):
    err = _mismatch(
        cli_run,
        tmp_path,
        [f"--text={text_path}", "--units=16", "--batch_size=64", "--num_preds=12"],
    )
    assert "--units" in err and "--workdir" in err and "Traceback" not in err


def test_checkpoint_with_other_vocabulary_is_refused(cli_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Zebras quietly jump over the lazy fox. " * 40)
    err = _mismatch(cli_run, tmp_path, [f"--text={other}", *TINY_FLAGS])
    assert "vocabulary" in err and "Traceback" not in err
    assert "--text" in err, (
        f"the vocabulary comes from --text, but the message does not say so:\n{err}"
    )


# --- Bad input: a clear message naming the flag, exit code non-zero, nothing written --------


def test_bad_inputs_exit_with_a_message_naming_the_flag(tmp_path, text_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    short = tmp_path / "short.txt"
    short.write_text("Too short\n")
    cases = [
        ([f"--text={tmp_path / 'missing.txt'}"], "--text"),
        ([f"--text={empty}"], "--text"),
        ([f"--text={binary}"], "--text"),
        ([f"--text={short}"], "--seq_len"),
        ([f"--text={text_path}", "--units=0"], "--units"),
        ([f"--text={text_path}", "--seq_len=0"], "--seq_len"),
        ([f"--text={text_path}", "--learning_rate=0"], "--learning_rate"),
        ([f"--text={text_path}", "--learning_rate=nan"], "--learning_rate"),
        ([f"--text={text_path}", "--clip_norm=-1"], "--clip_norm"),
        ([f"--text={text_path}", "--val_fraction=1.5"], "--val_fraction"),
        ([f"--text={text_path}", "--temperature=-0.5"], "--temperature"),
        ([f"--text={text_path}", "--cell=transformer"], "--cell"),
        # NaN from the first epoch: stops, says so, names the flag, saves nothing.
        ([f"--text={text_path}", "--learning_rate=1e38"], ("NaN", "--learning_rate")),
    ]
    workdirs = [str(tmp_path / f"run{i}") for i in range(len(cases))]
    procs = _run_many(
        [
            [f"--workdir={w}", *TINY_FLAGS, *args]
            for w, (args, _) in zip(workdirs, cases, strict=True)
        ]
    )
    problems = []
    for (args, want), proc in zip(cases, procs, strict=True):
        want = (want,) if isinstance(want, str) else want
        if (
            proc.returncode == 0
            or any(w not in proc.stderr for w in want)
            or "Traceback" in proc.stderr
        ):
            problems.append(f"{args}: exit {proc.returncode}, stderr:\n{proc.stderr[-600:]}")
    assert not problems, "\n\n".join(problems)
    for w in workdirs:
        assert checkpoint.latest_step(os.path.join(w, "checkpoints")) is None


def test_seed_text_outside_vocabulary_names_the_flag(text_path, tmp_path):
    proc = _run(
        [
            f"--text={text_path}",
            f"--workdir={tmp_path / 'run'}",
            *TINY_FLAGS,
            "--seed_text=the sky was falling?",
        ]
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "'?'" in proc.stderr
    assert "--seed_text" in proc.stderr, f"the message does not name --seed_text:\n{proc.stderr}"


def test_short_seed_text_is_refused_before_training():
    with pytest.raises(ValueError, match="--seed_text"):
        char_lm.Config(seed_text="abc").validate()  # seq_len 10: fail before the first epoch


def test_workdir_that_is_a_file(text_path, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    proc = _run([f"--text={text_path}", f"--workdir={a_file}", *TINY_FLAGS])
    assert proc.returncode != 0
    assert a_file.read_text() == "my notes"
    assert "--workdir" in proc.stderr and "Traceback" not in proc.stderr, (
        f"--workdir pointing at a file should be a clear error, got:\n{proc.stderr[-800:]}"
    )


def test_alice_download_offline_names_text(tmp_path):
    code = (
        "import sys, urllib.error, urllib.request\n"
        "def offline(*a, **k):\n"
        "    raise urllib.error.URLError('no network')\n"
        "urllib.request.urlopen = offline\n"
        "from absl import app\n"
        "from experiments import char_lm\n"
        f"char_lm._DATA_DIR = {str(tmp_path / 'data')!r}\n"
        f"app.run(char_lm.main, argv=['char_lm', '--workdir={tmp_path / 'run'}'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--text" in proc.stderr and "no network" in proc.stderr
    assert not (tmp_path / "data" / "alice_in_wonderland.txt").exists()


def test_bad_text_in_process(tmp_path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    for path, match in [(tmp_path / "missing", "does not exist"), (binary, "binary")]:
        with pytest.raises(char_lm.data_lib.TextError, match=match):
            char_lm.train_and_evaluate(char_lm.Config(**TINY), str(tmp_path / "run"), str(path))
    assert not (tmp_path / "run").exists()


# --- Exact resume and NaN recovery (in process) ----------------------------------------------


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_path):
    """An uninterrupted 3-iteration run: ``(state, history)``."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    state, history, _ = char_lm.train_and_evaluate(
        char_lm.Config(iterations=3, **TINY), workdir, text_path, out=_quiet
    )
    return state, history


def _assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def _strip_timing(history):
    return [
        {k: v for k, v in h.items() if k not in ("seconds", "examples_per_second")} for h in history
    ]


def test_stopped_and_resumed_run_is_bit_identical(reference, text_path, tmp_path):
    workdir = str(tmp_path)
    _, first, _ = char_lm.train_and_evaluate(
        char_lm.Config(iterations=1, **TINY), workdir, text_path, out=_quiet
    )
    state, rest, _ = char_lm.train_and_evaluate(
        char_lm.Config(iterations=3, **TINY), workdir, text_path, out=_quiet
    )
    assert [h["iteration"] for h in rest] == [2, 3]
    _assert_bit_identical(state, reference[0])
    assert _strip_timing(first + rest) == _strip_timing(reference[1])


def test_nan_keeps_last_good_checkpoint_and_resume_recovers(
    reference, text_path, tmp_path, monkeypatch
):
    real_make_epoch = train.make_epoch

    def poisoned_make_epoch(*args, **kwargs):
        epoch, calls = real_make_epoch(*args, **kwargs), []

        def run(state, data):
            calls.append(1)
            if len(calls) == 3:  # a parameter goes bad during iteration 3
                params = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan), state.params)
                state = state._replace(params=params)
            return epoch(state, data)

        return run

    workdir = str(tmp_path)
    config = char_lm.Config(iterations=3, **TINY)
    monkeypatch.setattr(train, "make_epoch", poisoned_make_epoch)
    with pytest.raises(train.NonFiniteLossError, match="iteration 3.*last good checkpoint"):
        char_lm.train_and_evaluate(config, workdir, text_path, out=_quiet)
    monkeypatch.setattr(train, "make_epoch", real_make_epoch)

    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoint.latest_step(ckpt) == 2
    restored, meta = checkpoint.restore_checkpoint(ckpt, 2, reference[0])
    assert int(restored.step) == 2 * int(reference[0].step) // 3
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(restored.params))
    assert meta["config"]["units"] == 8
    assert [r["iteration"] for r in _rows(workdir)] == [1, 2]

    state, rest, _ = char_lm.train_and_evaluate(config, workdir, text_path, out=_quiet)
    assert [h["iteration"] for h in rest] == [3]
    _assert_bit_identical(state, reference[0])


# --- The tutorial's recipe on the shared Alice text ----------------------------------------


def test_alice_loss_falls(alice_path):
    lines = []
    state, history, vocab = char_lm.train_and_evaluate(
        char_lm.Config(iterations=2, num_preds=20), None, alice_path, out=lines.append
    )
    first, second = history[0]["loss"], history[1]["loss"]
    assert 40 <= vocab.size <= 70
    assert first < math.log(vocab.size)  # learned something during epoch 1
    assert second < first - 0.1
    assert second < 2.3
    assert any(line.startswith("Iteration #: 2") for line in lines)
