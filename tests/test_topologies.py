"""experiments.topologies and experiments.compare_topologies end to end, in process, tiny."""

import dataclasses
import json
import math
import os

import pytest

from experiments import compare_topologies, topologies
from experiments.topologies import Config, resolve, run
from rnn_jax.data import TextError

TINY = dict(
    units=8,
    steps=4,
    eval_every=2,
    batch_size=8,
    digits=2,
    train_examples=200,
    test_examples=50,
    count_per_length=8,
    train_max_len=4,
    test_max_len=8,
    seq_len=16,
    window_step=16,
)
TIMING = ("seconds", "elapsed_seconds", "compile_seconds")


def _written(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _check_run(rows, lines, workdir, topology, cell, steps):
    """What every run writes and prints, whatever its topology."""
    assert [r["step"] for r in rows] == steps
    assert _written(workdir) == json.loads(json.dumps(rows))  # returned == logged
    assert all(math.isfinite(r["loss"]) and r["grad_norm_max"] > 0 for r in rows)
    assert all(r["topology"] == topology and r["cell"] == cell for r in rows)
    elapsed = [r["elapsed_seconds"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert 0 < os.path.getsize(os.path.join(workdir, "learning_curve.png")) < 200_000
    assert sum(line.startswith("step ") for line in lines) >= 1
    metric, target = topologies.METRICS[topology], topologies.TARGETS[topology]
    assert f"final {metric} {rows[-1][metric]:.4f} at step {steps[-1]}" in "\n".join(lines)
    hit = next((r["step"] for r in rows if r[metric] >= target), None)
    reported = [line for line in lines if line.startswith(f"first reached {target} ")]
    assert len(reported) == (hit is not None)
    if hit is not None:
        assert reported[0].startswith(f"first reached {target} at step {hit} (")


def _cased_tail(path: str, val_fraction: float) -> str:
    """The held-out end of the cased book, by str methods: the lines between the Gutenberg
    markers less the closing "End of Project Gutenberg" line; strip, ASCII, join non-empty."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    closing = max(i for i in range(start, end) if lines[i].startswith("End of Project"))
    lines = ["".join(c for c in line.strip() if c.isascii()) for line in lines[start + 1 : closing]]
    text = " ".join(line for line in lines if line)
    return text[round(len(text) * (1 - val_fraction)) :]


@pytest.mark.parametrize(
    "topology,cell", [("one_to_many", "lstm"), ("seq2seq", "gru"), ("synced", "simple_rnn")]
)
def test_topology_runs_end_to_end(topology, cell, tmp_path, alice_path):
    lines = []
    config = Config(topology=topology, cell=cell, **TINY)
    rows = run(config, str(tmp_path), out=lines.append)
    _check_run(rows, lines, tmp_path, topology, cell, [2, 4])
    # Checkpoints are indexed by optimiser step.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    last = rows[-1]
    if topology == "one_to_many":
        # digits=2: 90 training and 10 held-out numbers; exact match is a count over them.
        assert 10 * last["test_exact_match"] == pytest.approx(round(10 * last["test_exact_match"]))
        assert 90 * last["train_exact_match"] == pytest.approx(
            round(90 * last["train_exact_match"])
        )
        for sample in last["samples"]:
            number, _ = sample.split(" -> ")
            assert 0 <= int(number) < 100
    elif topology == "seq2seq":
        assert 50 * last["test_exact_match"] == pytest.approx(round(50 * last["test_exact_match"]))
        for sample in last["samples"]:
            question, answer = sample.split(" = ")
            assert set(question) <= set("0123456789+") and set(answer) <= set("0123456789")
    else:
        # The baselines on Alice's held-out tenth (docs/topologies.md), independently: the
        # all-lower-case guess is right wherever the character is not upper-case.
        tail = _cased_tail(alice_path, 0.1)
        assert last["baseline_accuracy"] == pytest.approx(
            sum(not c.isupper() for c in tail) / len(tail), abs=1e-12
        )
        assert round(last["baseline_accuracy"], 4) == 0.9615
        assert round(last["rule_accuracy"], 4) == 0.9701
        assert round(last["rule_upper_f1"], 3) == 0.414
        p, r = last["val_upper_precision"], last["val_upper_recall"]
        assert last["val_upper_f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        assert len(last["samples"][0]) == 160


def test_many_to_one_stops_at_target_resumes_bit_identically_and_compares(tmp_path):
    config = Config(topology="many_to_one", cell="simple_rnn", **{**TINY, "steps": 6})
    fresh, resumed = str(tmp_path / "fresh"), str(tmp_path / "resumed")
    lines = []
    full = run(config, fresh, out=lines.append)
    _check_run(full, lines, fresh, "many_to_one", "simple_rnn", [2, 4, 6])
    last = full[-1]
    # Test words: 2 per even length 2..8; seen lengths 2 and 4, longer 6 and 8.
    by_length = last["accuracy_by_length"]
    assert list(by_length) == ["2", "4", "6", "8"]  # JSON keys
    assert last["seen_accuracy"] == pytest.approx((by_length["2"] + by_length["4"]) / 2)
    assert last["longer_accuracy"] == pytest.approx((by_length["6"] + by_length["8"]) / 2)

    # Stopped at the first evaluation that meets stop_at (accuracy 0.05 is met by any model
    # that is not always wrong).
    lines = []
    stopped = run(dataclasses.replace(config, stop_at=0.05), resumed, out=lines.append)
    assert [r["step"] for r in stopped] == [2]
    assert "seen_accuracy reached stop_at=0.05; stopped" in lines
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    # A rerun finds the target met and trains nothing.
    lines = []
    again = run(dataclasses.replace(config, stop_at=0.05), resumed, out=lines.append)
    assert again == stopped and not any(line.startswith("step ") for line in lines)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]

    # Without stop_at it resumes: bit-identical to the uninterrupted run, its clock continued.
    rows = run(config, resumed, out=lambda line: None)
    assert rows[0] == stopped[0]
    assert _without_timing(rows) == _without_timing(full)
    assert rows[1]["elapsed_seconds"] > rows[0]["elapsed_seconds"]
    assert _written(resumed) == json.loads(json.dumps(rows))

    # Both runs in one figure, named by their topology, relative to the workdir.
    figures = tmp_path / "figures"
    path = compare_topologies.run(
        compare_topologies.Config(runs=(fresh, resumed)), str(figures), out=lambda line: None
    )
    assert path == str(figures / "topology_many_to_one.png") and os.path.getsize(path) > 0
    named = compare_topologies.Config(runs=(fresh,), figure="x.png")
    assert compare_topologies.run(named, str(figures), out=lambda line: None).endswith("x.png")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "topology": "synced"}))
    with pytest.raises(ValueError, match="mix the topologies"):
        compare_topologies.run(compare_topologies.Config(runs=(fresh, str(other))), str(figures))
    with pytest.raises(ValueError, match=r"runs=.*no metrics.jsonl"):
        compare_topologies.run(compare_topologies.Config(runs=(str(tmp_path),)), str(figures))
    char_lm_run = tmp_path / "char_lm"  # a run of another experiment: its rows have no topology
    char_lm_run.mkdir()
    (char_lm_run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ValueError, match=r"'.*char_lm' is not a run of experiments.topologies"):
        compare_topologies.run(compare_topologies.Config(runs=(str(char_lm_run),)), str(figures))
    with pytest.raises(ValueError, match=r"runs=\(\) must list"):
        compare_topologies.Config()


def test_unset_fields_take_the_topology_and_cell_defaults():
    for cell, steps, lr in (("simple_rnn", 20000, 3e-3), ("gru", 8000, 1e-2)):
        config = resolve(Config(topology="seq2seq", cell=cell))
        got = (config.steps, config.learning_rate, config.units, config.digits)
        assert got == (steps, lr, 128, 3)
        assert (config.eval_every, config.batch_size) == (250, 128)
    config = resolve(Config(topology="many_to_one", units=7, learning_rate=0.5))
    assert (config.units, config.learning_rate, config.steps, config.digits) == (7, 0.5, 3000, None)
    assert resolve(Config(topology="one_to_many")).digits == 4
    # Checks that need the defaults run again on the resolved config.
    unresolved = Config(topology="seq2seq", train_examples=999_000)
    with pytest.raises(ValueError, match="train_examples=999000 and test_examples=5000"):
        resolve(unresolved)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(clip_norm=0.0), r"clip_norm=0.0 must be finite and > 0"),
        (dict(clip_norm=math.inf), r"clip_norm=inf must be finite"),
        (dict(topology="tree"), r"topology='tree'"),
        (dict(cell="rnn"), r"cell='rnn'"),
        (dict(units=0), r"units=0 must be finite and > 0"),
        (dict(steps=100, eval_every=30), r"steps=100 must be a multiple of eval_every=30"),
        (dict(train_max_len=5), r"train_max_len=5 must be even"),
        (dict(train_max_len=12, test_max_len=10), r"test_max_len=10 must be >= train_max_len=12"),
        (dict(count_per_length=7), r"count_per_length=7 must be even"),
        (dict(topology="one_to_many", digits=7), r"digits=7: one_to_many"),
        (dict(digits=1, train_examples=90, test_examples=20), r"train_examples=90 and test_"),
        (dict(stop_at=1.5), r"stop_at=1.5 must be in \(0, 1\]"),
        (dict(decay_start=-0.1), r"decay_start=-0.1 must be in \[0, 1\]"),
        (dict(val_fraction=1.0), r"val_fraction=1.0 must be in \(0, 1\)"),
        (dict(seed=-1), r"seed=-1"),
    ],
)
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Config(**fields)


def test_clip_norm_none_is_no_clipping_and_a_missing_text_names_text(tmp_path):
    assert Config(clip_norm=None).clip_norm is None
    with pytest.raises(TextError, match=r"^text='.*nope.txt' does not exist"):
        run(Config(topology="synced", text=str(tmp_path / "nope.txt")), str(tmp_path / "w"))


def test_cli_bad_flag_is_one_line_and_exit_1(tmp_path, start_experiment):
    # --clip_norm=0 meant "no clipping" before; now clipping is off only when the flag is unset.
    proc = start_experiment("topologies", "--clip_norm=0", f"--workdir={tmp_path}")
    proc.stdout, proc.stderr = proc.communicate(timeout=900)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: --clip_norm=0.0 must be finite and > 0"]
