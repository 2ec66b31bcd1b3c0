"""benchmarks/shakespeare.py --from_json: results files run apart (one per core) merged into
one, the summary recomputed over every run."""

import json
import statistics
import subprocess
import sys

import pytest


def _run(name, best_block, core_round=0):
    curve = [[10.0, 50, 2.0, 1.95, 2.1], [20.0, 100, best_block, best_block - 0.04, 1.9]]
    return {
        "name": name,
        "flags": {"cell": name, "units": 8, "learning_rate": 1e-3},
        "parameters": 1000,
        "updates_per_second": 5.0,
        "chars_per_second": 20480.0 + 100 * best_block,
        "train_seconds": 20.0,
        "wall_seconds": 30.0,
        "peak_rss_mb": 500.0 + 10 * best_block,
        "final_block": best_block + 0.01,
        "final_stream": best_block - 0.03,
        "best_block": best_block,
        "best_stream": best_block - 0.04,
        "best_step": 100,
        "curve": curve,
        "sample": "# the best state\nabc\n",
        "round": core_round,
    }


def _part(budget, core, runs):
    return {
        "budget": budget,
        "cpu": "test",
        "core": core,
        "rounds": 1,
        "common": {},
        "command": f"python -m benchmarks.shakespeare --core={core}",
        "runs": runs,
        "summary": [],
    }


def _merge(tmp_path, parts):
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    out, plot = tmp_path / "merged.json", tmp_path / "merged.png"
    command = [sys.executable, "-m", "benchmarks.shakespeare"]
    command += [f"--from_json={','.join(map(str, paths))}", f"--out={out}", f"--plot={plot}"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    return proc, out, plot


def test_from_json_merges_runs_and_recomputes_the_summary(tmp_path):
    a = _part(175.0, 0, [_run("gru", 1.5), _run("gru", 1.7, 1)])
    b = _part(175.0, 1, [_run("gru", 1.6), _run("lstm", 1.8)])
    proc, out, plot = _merge(tmp_path, [a, b])
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(out.read_text())
    assert [(r["name"], r["core"], r["best_block"]) for r in merged["runs"]] == [
        ("gru", 0, 1.5),
        ("gru", 0, 1.7),
        ("gru", 1, 1.6),
        ("lstm", 1, 1.8),
    ]
    assert merged["core"] == "0 and 1"
    assert merged["command"] == [a["command"], b["command"]]
    gru, lstm = merged["summary"]
    assert (gru["name"], gru["rounds"], lstm["rounds"]) == ("gru", 3, 1)
    assert merged["rounds"] == 3
    assert gru["min_best_block"] == 1.5
    assert gru["median_best_block"] == pytest.approx(1.6)
    assert gru["median_best_stream"] == pytest.approx(1.56)
    assert gru["peak_rss_mb"] == pytest.approx(517.0)  # the largest of the three
    assert gru["chars_per_second"] == pytest.approx(statistics.median([20630, 20650, 20640]))
    # the table: min / median where a contender ran more than once, its one score otherwise
    assert "| gru | 3 |" in proc.stdout and "1.5000 / 1.6000" in proc.stdout
    assert "| lstm | 1 |" in proc.stdout and "| 1.8000 |" in proc.stdout
    assert plot.stat().st_size > 1000


def test_from_json_refuses_files_of_different_budgets(tmp_path):
    a = _part(175.0, 0, [_run("gru", 1.5)])
    b = _part(1800.0, 1, [_run("gru", 1.4)])
    proc, out, _ = _merge(tmp_path, [a, b])
    assert proc.returncode != 0
    assert "budgets differ" in proc.stderr
    assert not out.exists()


def test_schedule_interleaves_rounds_and_seeds_each_round():
    from benchmarks.shakespeare import schedule

    contenders = {"a": {"units": 8}, "b": {"units": 4, "seed": 7}}
    assert schedule(contenders, rounds=2, seed=3) == [
        (0, "a", {"seed": 3, "units": 8}),
        (0, "b", {"seed": 7, "units": 4}),
        (1, "a", {"seed": 4, "units": 8}),
        (1, "b", {"seed": 7, "units": 4}),
    ]
    assert contenders == {"a": {"units": 8}, "b": {"units": 4, "seed": 7}}  # not changed


def test_from_json_merging_a_merged_file_keeps_one_flat_list_of_commands(tmp_path):
    a = _part(175.0, 0, [_run("gru", 1.5)])
    b = _part(175.0, 1, [_run("gru", 1.6)])
    c = _part(175.0, 0, [_run("lstm", 1.8)])
    first = _part(175.0, "0 and 1", [_run("gru", 1.5), _run("gru", 1.6)])
    first["command"] = [a["command"], b["command"]]
    proc, out, _ = _merge(tmp_path, [first, c])
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(out.read_text())
    assert merged["command"] == [a["command"], b["command"], c["command"]]
    assert [r["best_block"] for r in merged["runs"]] == [1.5, 1.6, 1.8]
