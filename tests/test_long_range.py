"""experiments.long_range in process: a tiny sweep against separate runs of the trainer, its
files, every registry cell through a tiny sweep, the budget's steps, the Config's validation,
and one command line.

The trainer itself (rnn_jax.sweep.make_task_trainer: vmapped over seeds and clip norms, against
a hand-written clipped RMSprop loop) is tested in tests/test_sweep.py."""

import csv
import dataclasses
import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from damage import flip
from helpers import snapshot

from experiments import long_range
from rnn_jax import cells, registry
from rnn_jax.checkpoint import CheckpointError, DamagedCheckpointError, restore_meta
from rnn_jax.sweep import make_task_trainer
from rnn_jax.synthetic import adding_problem
from rnn_jax.trees import named_leaves
from rnn_jax.workdir import WorkdirError

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
    # Another sweep in the same workdir is refused, naming both; the first one's results stay.
    kept = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.csv")}
    other = dataclasses.replace(TINY, cells=("gru",))
    with pytest.raises(WorkdirError) as err:
        long_range.run(other, str(tmp_path), out=lines.append)
    message = str(err.value)
    assert "holds the results of long_range with another configuration" in message
    assert "cells=['gru'] differs from the earlier ['lstm']" in message and "\n" not in message
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    table = lines[-1]
    assert "| adding | lstm | 4 | none | 4 | 0.1667 |" in table
    assert "| adding | lstm | 4 | 0.5 | 4 | 0.1667 |" in table
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["config"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    (res,) = results["results"]
    assert res["clip_norms"] == [None, 0.5]  # JSON has no inf: null is the unclipped twin
    assert res["steps"] == 4 and res["grad_norm"] is None  # save_grad_norms is off
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
    # The trained params are saved per (cell, T), axes (clip setting, seed), in init's structure,
    # as the checkpoint of the steps trained.
    saved = long_range.params_path(str(tmp_path), "lstm", 4)
    assert os.listdir(saved) == ["4"]
    trained = long_range.load_params(saved, params, step=4)
    assert jax.tree.structure(trained) == jax.tree.structure(params)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
        assert after.shape == (2, *before.shape)
        assert not np.allclose(after[0], before)
    for row, tests in zip(rows, test):
        assert row["steps"] == TINY.steps
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
    assert (tmp_path / "summary_adding.png").stat().st_size > 1000
    # The comparison table: the last clip setting's row, one column per (task, T).
    solved, final = rows[1]["solved"], rows[1]["final_test_median"]
    lines = long_range.comparison_table([str(tmp_path)]).splitlines()
    assert lines[0] == "| cell | adding T=4 |"
    assert lines[2].startswith(f"| lstm | {solved}") and f" · {final:.3g} · 4 |" in lines[2]
    train_s = results["results"][0]["timings"]["train_s"]
    lines = long_range.comparison_table([str(tmp_path)], seconds=True).splitlines()
    assert lines[2].endswith(f" · {final:.3g} · 4 / {train_s:.0f} s |")
    # A rerun in another workdir replaces the entry it repeats and adds the ones it has new.
    rerun_dir = tmp_path / "rerun"
    rerun_dir.mkdir()
    rerun = json.loads(json.dumps(results))
    rerun["results"][0]["steps"] = 8
    rerun["results"].append({**rerun["results"][0], "T": 9, "steps": 6})
    with open(rerun_dir / "results.json", "w") as f:
        json.dump(rerun, f)
    lines = long_range.comparison_table([str(tmp_path), str(rerun_dir)]).splitlines()
    assert lines[0] == "| cell | adding T=4 | adding T=9 |" and len(lines) == 3
    assert f" · {final:.3g} · 8 | " in lines[2] and lines[2].endswith(" · 6 |")
    merged = long_range.merged_results([str(tmp_path), str(rerun_dir)], "adding")
    assert [(r["T"], r["steps"], r["eval_every"]) for r in merged] == [(4, 8, 2), (9, 6, 2)]
    assert long_range.merged_results([str(tmp_path)], "copy") == []
    long_range.plot_merged(tmp_path / "merged.png", "adding", [str(tmp_path), str(rerun_dir)])
    assert (tmp_path / "merged.png").stat().st_size > 1000
    # A label gives a workdir's cells rows of their own: the rerun no longer replaces T=4.
    both, labels = [str(tmp_path), str(rerun_dir)], {str(rerun_dir): "(rerun)"}
    lines = long_range.comparison_table(both, labels=labels).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| lstm", "| lstm (rerun)"]
    assert lines[2].endswith(f" · {final:.3g} · 4 |  |")
    assert " · 8 | " in lines[3] and lines[3].endswith(" · 6 |")
    merged = long_range.merged_results(both, "adding", labels)
    assert sorted((r["cell"], r["T"], r["steps"]) for r in merged) == [
        ("lstm", 4, 4),
        ("lstm (rerun)", 4, 8),
        ("lstm (rerun)", 9, 6),
    ]
    with pytest.raises(ValueError, match="'elsewhere', which is not one of the workdirs"):
        long_range.comparison_table(both, labels={"elsewhere": "x"})


REGISTRY_TINY = long_range.Config(
    lengths=(5,),
    seeds=2,
    steps=4,
    eval_every=2,
    batch_size=2,
    test_size=4,
    units=3,
    clip_norm=None,
    calibration_steps=2,
    save_grad_norms=True,
)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_registry_cell_traces_through_the_sweep(tmp_path, name):
    """Each cell of rnn_jax.registry goes through a sweep's program (T = 5, 2 seeds, traced,
    not compiled: compiling all eleven trainers costs ~100 s of CPU here) and its params
    through save_params/load_params, bit for bit. One cell trains for real below, LRU in
    tests/test_gradients.py (trained_from)."""
    task = adding_problem(5)
    cell = registry.named_cell(name, REGISTRY_TINY.units, task.length)
    _, train, params, keys, test = long_range.prepare(task, cell, REGISTRY_TINY)
    clips = jax.numpy.asarray(REGISTRY_TINY.clip_norms())
    over_seeds = jax.vmap(train, in_axes=(0, 0, None, None, None))
    trained, curves = jax.eval_shape(
        jax.vmap(over_seeds, in_axes=(None, None, 0, None, None)), params, keys, clips, *test
    )
    assert curves.test_loss.shape == (1, 2, 3)  # (clip settings, seeds, evaluations)
    assert curves.grad_norm.shape == (1, 2, 4)
    assert jax.tree.structure(trained) == jax.tree.structure(params)
    # The registry's params with a clip-setting axis in front, each setting its own values.
    saved = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1]), params)
    long_range.save_params(tmp_path / "params", 4, saved, [math.inf, 0.5])
    loaded = long_range.load_params(tmp_path / "params", params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_saved_params_are_a_digest_checked_checkpoint(tmp_path):
    """save_params keeps every step (a rerun's params of as many steps set the earlier aside);
    load_params takes the most steps by default, any step by number; flipped bytes are named
    and refused with every file kept; a missing directory, or an .npz left by an earlier
    version, is one line saying what to do."""
    like = {"dense": {"bias": jnp.zeros((2, 1))}, "rnn": {"kernel": jnp.zeros((2, 3, 4))}}
    first, second, third = (
        jax.tree.map(lambda a, i=i: jnp.full((2, *a.shape), float(i)), like) for i in (1, 2, 3)
    )
    directory = long_range.params_path(str(tmp_path), "gru", 7)
    assert directory == str(tmp_path / "params" / "gru_T7")
    long_range.save_params(directory, 40, first, [math.inf, 0.5])
    long_range.save_params(directory, 20, second, [math.inf, 0.5])
    assert restore_meta(directory, 40) == {"clip_norms": [None, 0.5]}

    def values(step=None):
        loaded = long_range.load_params(directory, like, step)
        return {path: float(np.unique(x)[0]) for path, x in named_leaves(loaded)}

    assert values() == {("dense", "bias"): 1.0, ("rnn", "kernel"): 1.0}
    assert values(20) == {("dense", "bias"): 2.0, ("rnn", "kernel"): 2.0}
    long_range.save_params(directory, 40, third, [math.inf, 0.5])
    assert sorted(os.listdir(directory)) == ["20", "40", "40.replaced"]
    assert values() == {("dense", "bias"): 3.0, ("rnn", "kernel"): 3.0}

    flip(pathlib.Path(directory) / "40", every=True)
    kept = snapshot(tmp_path)
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint 40 in .* is damaged \(") as e:
        long_range.load_params(directory, like)
    assert e.value.path == os.path.join(directory, "40")
    assert snapshot(tmp_path) == kept
    assert values(20) == {("dense", "bias"): 2.0, ("rnn", "kernel"): 2.0}

    old = long_range.params_path(str(tmp_path), "lstm", 4)
    os.makedirs(os.path.dirname(old), exist_ok=True)
    np.savez(f"{old}.npz", **{"['rnn']['kernel']": np.zeros((2, 2, 3, 4))})
    with pytest.raises(CheckpointError, match=r"lstm_T4\.npz holds params saved as \.npz by an "):
        long_range.load_params(old, like)
    with pytest.raises(CheckpointError, match=r"there are no saved params in .*gru_T8"):
        long_range.load_params(long_range.params_path(str(tmp_path), "gru", 8), like)


def test_budget_sizes_the_steps(tmp_path):
    """With budget_s, the steps come from a timed calibration: the smallest budget trains one
    eval_every; every step's gradient norm is saved with save_grad_norms."""
    config = dataclasses.replace(REGISTRY_TINY, cells=("simple_rnn",), budget_s=1e-9)
    lines = []
    (row,) = long_range.run(config, str(tmp_path), out=lines.append)
    assert row["steps"] == 2 and row["cell"] == "simple_rnn"
    assert re.fullmatch(r"simple_rnn: [0-9.]+ s per step at T=5", lines[0])
    with open(tmp_path / "results.json") as f:
        (res,) = json.load(f)["results"]
    assert res["steps"] == 2 and set(res["timings"]) == {"compile_s", "train_s"}
    assert np.shape(res["grad_norm"]) == (1, 2, 2)  # (clip settings, seeds, steps)
    assert np.all(np.isfinite(res["grad_norm"])) and np.all(np.isfinite(res["test_loss"]))


def test_budget_steps():
    config = dataclasses.replace(TINY, steps=20, budget_s=1.0)
    assert long_range.budget_steps(config, 0.1) == 10  # 10 steps fit: a multiple of 2
    assert long_range.budget_steps(config, 0.15) == 6  # 6.7 fit: rounded down
    assert long_range.budget_steps(config, 10.0) == 2  # none fit: one eval_every
    assert long_range.budget_steps(config, 1e-4) == 20  # at most steps


def test_clip_settings():
    assert TINY.clip_norms() == [math.inf, 0.5]
    assert dataclasses.replace(TINY, compare_unclipped=False).clip_norms() == [0.5]
    # clip_norm unset means no clipping: only the unclipped runs, whatever compare_unclipped.
    for compare in (True, False):
        config = dataclasses.replace(TINY, clip_norm=None, compare_unclipped=compare)
        assert config.clip_norms() == [math.inf]


FORM = "must each be name=factor, a new name and a finite factor >= 0"


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
        ({"budget_s": 0.0}, "budget_s=0.0 must be finite and > 0"),
        ({"calibration_steps": 0}, "calibration_steps=0 must be finite and > 0"),
        ({"lr_factors": ("nu_log",)}, f"{FORM}: 'nu_log' is not"),
        ({"lr_factors": ("kernel=-1",)}, f"{FORM}: 'kernel=-1' is not"),
        ({"lr_factors": ("kernel=nan",)}, f"{FORM}: 'kernel=nan' is not"),
        ({"lr_factors": ("kernel=1", "kernel=2")}, f"{FORM}: 'kernel=2' is not"),
        # TINY's only cell is an LSTM: it has no nu_log.
        ({"lr_factors": ("nu_log=0.5",)}, "none of the cells has a parameter called 'nu_log'"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(TINY, **changes)


def test_lr_factors_scale_the_first_adam_step():
    """Adam's first update is ``−lr · g / (|g| + ε)``, ``lr·sign(g)`` wherever ``|g| ≫ ε``: with
    lr_factors each parameter's step is ``factor × lr`` in size, the rest ``lr``."""
    lr, factors = 0.01, {"nu_log": 0.5, "theta_log": 0.25}
    task = adding_problem(6)
    model, train = make_task_trainer(
        registry.named_cell("lru", 4, task.length),
        task,
        optimizer=long_range.make_optimizer("adam", lr, factors),
        num_steps=1,
        eval_every=1,
        batch_size=8,
    )
    params = model.init(jax.random.PRNGKey(0))
    test = task.sample(jax.random.PRNGKey(1), 8)
    new, _ = jax.jit(train)(params, jax.random.PRNGKey(2), jnp.inf, *test)
    moved = dict(named_leaves(new))
    for path, before in named_leaves(params):
        after = moved[path]
        size = np.abs(np.asarray(after) - np.asarray(before)) / (lr * factors.get(path[-1], 1))
        assert np.all(size < 1 + 1e-4), path  # float32 rounding of params near 1
        assert np.median(size) > 0.99, path


def test_lr_factor_zero_freezes_a_parameter_over_many_steps(tmp_path):
    """nu_log=0,theta_log=0: the sweep's LRU keeps its eigenvalues while every other parameter
    trains; minGRU, which has neither, trains with no factor (and no error)."""
    config = dataclasses.replace(
        REGISTRY_TINY,
        cells=("min_gru", "lru"),
        lr_factors=("nu_log=0", "theta_log=0"),
        steps=6,
    )
    assert long_range.parse_lr_factors(config.lr_factors) == {"nu_log": 0.0, "theta_log": 0.0}
    task = adding_problem(5)
    lru = registry.named_cell("lru", config.units, task.length)
    assert long_range.cell_lr_factors(config, lru, task.input_dim) == {
        "nu_log": 0.0,
        "theta_log": 0.0,
    }
    min_gru = registry.named_cell("min_gru", config.units, task.length)
    assert long_range.cell_lr_factors(config, min_gru, task.input_dim) == {}
    long_range.run(config, str(tmp_path), out=lambda line: None)
    for name in config.cells:
        cell = registry.named_cell(name, config.units, task.length)
        _, _, initial, _, _ = long_range.prepare(task, cell, config)
        trained = long_range.load_params(long_range.params_path(tmp_path, name, 5), initial)
        final = dict(named_leaves(trained))
        for path, before in named_leaves(initial):
            after = final[path]
            frozen = path[-1] in ("nu_log", "theta_log")
            # after: (clip settings, seeds, ...); before: (seeds, ...)
            moved = np.abs(np.asarray(after)[-1] - np.asarray(before)).max()
            assert (moved == 0.0) if frozen else (moved > 1e-4), (name, path, moved)


def test_lru_r_min_sets_the_ring_of_initial_moduli():
    """build_cell: LRU's |λ| = exp(−exp(ν)) start on [lru_r_min, 0.999]; the other cells and
    an unset lru_r_min are the registry's."""
    config = dataclasses.replace(REGISTRY_TINY, cells=("lru", "gru_chrono"), lru_r_min=0.99)
    cell = long_range.build_cell(config, "lru", 7)
    params = cell.init(jax.random.PRNGKey(0), 2)
    assert params["nu_log"].shape == (config.units,)
    cell = long_range.build_cell(dataclasses.replace(config, units=500), "lru", 7)
    modulus = np.exp(-np.exp(np.asarray(cell.init(jax.random.PRNGKey(0), 2)["nu_log"])))
    assert modulus.min() >= 0.99 - 1e-6 and modulus.max() <= 0.999 + 1e-6
    assert np.mean(modulus > 0.995) > 0.3  # |λ|² uniform on [0.98, 0.998]: 0.47 expected
    default = long_range.build_cell(
        dataclasses.replace(config, lru_r_min=None, units=500), "lru", 7
    )
    modulus = np.exp(-np.exp(np.asarray(default.init(jax.random.PRNGKey(0), 2)["nu_log"])))
    assert modulus.min() < 0.92 and np.mean(modulus > 0.995) < 0.1  # [0.9, 0.999]: 0.04
    chrono = long_range.build_cell(config, "gru_chrono", 7).init(jax.random.PRNGKey(0), 2)
    want = registry.named_cell("gru_chrono", config.units, 7).init(jax.random.PRNGKey(0), 2)
    for a, b in zip(jax.tree.leaves(chrono), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    for bad in (-0.1, 0.999, 1.0):
        with pytest.raises(ValueError, match=re.escape(f"lru_r_min={bad} must be in [0, 0.999)")):
            dataclasses.replace(config, lru_r_min=bad)


def test_config_accepts_copy_delay_one():
    config = dataclasses.replace(TINY, task="copy", lengths=(1, 3))
    assert config.lengths == (1, 3)


def test_bad_flag_is_one_line_and_exit_1(bad_flag):
    _, err = bad_flag.communicate(timeout=900)
    assert bad_flag.returncode == 1
    assert err.strip() == "error: --clip_norm=0.0 must be finite and > 0", err
    assert not os.path.exists(os.path.join(ROOT, "unused"))


def test_a_sweep_that_cannot_fit_in_memory_is_refused_before_it_runs(tmp_path, monkeypatch):
    """XLA's estimate of the compiled program against the memory free: over it, one line
    naming the sequence length and what to lower, before anything is allocated or written."""
    monkeypatch.setattr(long_range, "_free_memory", lambda: 1_000)  # 1 kB free
    with pytest.raises(ValueError) as err:
        long_range.run(TINY, str(tmp_path / "run"), out=lambda line: None)
    message = str(err.value)
    found = re.match(
        r"^lengths: at sequences of 4 steps the sweep's program needs about ([0-9.]+) GB "
        r"\(XLA's estimate\) and 0\.0 GB are free; shorten lengths",
        message,
    )
    assert found and "\n" not in message, message
    assert not (tmp_path / "run" / "results.json").exists()
