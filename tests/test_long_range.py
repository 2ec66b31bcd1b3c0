"""experiments.long_range in process: a tiny sweep against separate runs of the trainer, its
files, the Config's validation, and one command line.

The trainer itself (rnn_jax.train.make_task_trainer: vmapped over seeds and clip norms, against
a hand-written clipped Adam loop) is tested in tests/test_train.py."""

import csv
import dataclasses
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from experiments import long_range
from rnn_jax import cells
from rnn_jax.synthetic import adding_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def bad_flag(start_experiment):
    """The one command-line test, started with the module so that its interpreter start-up
    overlaps the in-process tests: a bad --clip_norm is one line on stderr and exit status 1."""
    return start_experiment("long_range", "--clip_norm=0", "--workdir=unused")


TINY = long_range.Config(
    cells=("lstm",),
    lengths=(4,),
    seeds=2,
    steps=4,
    eval_every=2,
    batch_size=4,
    test_size=16,
    units=3,
    clip_norm=0.5,
)


def test_short_sweep_in_process(tmp_path):
    lines = []
    rows = long_range.run(TINY, str(tmp_path), out=lines.append)
    table = lines[-1]
    assert "| adding | lstm | 4 | none | 0.1667 |" in table
    assert "| adding | lstm | 4 | 0.5 | 0.1667 |" in table
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["config"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    (res,) = results["results"]
    assert res["clip_norms"] == [None, 0.5]  # JSON has no inf: null is the unclipped twin
    assert res["rows"] == json.loads(json.dumps(rows))
    test = np.asarray(res["test_loss"])  # (clip settings, seeds, evaluations)
    assert test.shape == (2, 2, 3)
    assert [r["clip"] for r in rows] == ["none", 0.5]

    # The runs start from the experiment's own initialisation and test set: at step 0 every run
    # of a seed has that model's test MSE, whatever its clip setting.
    task = adding_problem(4)
    model, _, params, _, (test_xs, test_targets) = long_range.prepare(
        task, cells.lstm(TINY.units), TINY
    )
    for s in range(TINY.seeds):
        outputs = model.apply(jax.tree.map(lambda a, s=s: a[s], params), test_xs)
        mse = np.mean((np.asarray(outputs)[:, 0] - np.asarray(test_targets)) ** 2)
        np.testing.assert_allclose(test[:, s, 0], [mse, mse], rtol=1e-5)
    for row, tests in zip(rows, test):
        assert np.all(np.isfinite(tests)) and np.all(tests > 0)
        np.testing.assert_allclose(row["final_test_median"], np.median(tests[:, -1]), rtol=1e-6)
        np.testing.assert_allclose(row["final_test_min"], np.min(tests[:, -1]), rtol=1e-6)
        np.testing.assert_allclose(row["final_over_baseline"], row["final_test_median"] * 6)
        np.testing.assert_allclose(row["baseline"], 1 / 6)
        expected = [2 * int(np.argmax(t < 0.05)) if np.any(t < 0.05) else None for t in tests]
        assert row["first_solved"] == expected
        assert row["solved"] == f"{sum(e is not None for e in expected)}/2"
        assert 0 < row["grad_norm_median"] <= row["grad_norm_p99"] <= row["grad_norm_max"]
        # The fraction of steps whose pre-clip norm exceeds the clip, in both twins.
        assert row["frac_above_clip"] in {k / (2 * TINY.steps) for k in range(2 * TINY.steps + 1)}
    # Clipping was active (pre-clip norms above 0.5), so the clipped twin ends elsewhere.
    assert rows[1]["frac_above_clip"] > 0 and not np.allclose(test[0, :, -1], test[1, :, -1])

    with open(tmp_path / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["clip"] for r in saved] == ["none", "0.5"]
    np.testing.assert_allclose(float(saved[1]["final_test_median"]), rows[1]["final_test_median"])
    assert (tmp_path / "curves_adding.png").stat().st_size > 1000


def test_clip_settings():
    assert TINY.clip_norms() == [math.inf, 0.5]
    assert dataclasses.replace(TINY, compare_unclipped=False).clip_norms() == [0.5]
    # clip_norm unset means no clipping: only the unclipped runs, whatever compare_unclipped.
    for compare in (True, False):
        config = dataclasses.replace(TINY, clip_norm=None, compare_unclipped=compare)
        assert config.clip_norms() == [math.inf]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"clip_norm": 0.0}, "clip_norm=0.0 must be finite and > 0"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0 must be finite and > 0"),
        ({"clip_norm": math.inf}, "clip_norm=inf must be finite and > 0"),
        ({"cells": ("lstm", "tcn")}, "cells=('lstm', 'tcn'): 'tcn' is not one of"),
        ({"cells": ()}, "cells=() must not be empty"),
        ({"cells": ("gru", "gru")}, "cells=('gru', 'gru') lists 'gru' more than once"),
        ({"task": "parity"}, "task='parity': 'parity' is not one of"),
        ({"lengths": (1, 4)}, "lengths=(1, 4): the adding problem needs T >= 2"),
        ({"lengths": (0,)}, "lengths=(0,) must be a non-empty list of numbers > 0"),
        ({"steps": 5}, "steps=5 must be a multiple of eval_every=2"),
        ({"seeds": 0}, "seeds=0 must be finite and > 0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001 must be finite and > 0"),
        ({"optimizer": "sgd"}, "optimizer='sgd': 'sgd' is not one of"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(TINY, **changes)


def test_config_accepts_copy_delay_one():
    config = dataclasses.replace(TINY, task="copy", lengths=(1, 3))
    assert config.lengths == (1, 3)


def test_bad_flag_is_one_line_and_exit_1(bad_flag):
    _, err = bad_flag.communicate(timeout=300)
    assert bad_flag.returncode == 1
    assert err.strip() == "error: --clip_norm=0.0 must be finite and > 0", err
    assert not os.path.exists(os.path.join(ROOT, "unused"))
