"""tools/authors.py: the authors' SHAC++ run from their checkout into a run folder like ours (docs/authors.md).
The end-to-end test needs a checkout: SHACPP_AUTHORS_CHECKOUT=DIR python -m pytest -q test_authors.py"""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from shacpp import make_env, reset

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root
TOOL = os.path.join(HERE, "tools", "authors.py")
CHECKOUT = os.environ.get("SHACPP_AUTHORS_CHECKOUT", "")
ENV = {k: v for k, v in os.environ.items() if k != "SHACPP_AUTHORS_CHECKOUT"} | {"OMP_NUM_THREADS": "1"}
TINY = ["--scenario", "dispersion", "--n-agents", "1", "--arch", "mlp", "--num-envs", "8", "--num-steps", "4",
        "--episodes", "2", "--eval-every", "2", "--eval-envs", "4", "--eval-steps", "8"]
COLUMNS = ["episode", "global_step", "time", "eval_return", "max_return", "normalized_return", "solved_fraction"]


def run(args, cwd, timeout=120):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, [{k: float(v) for k, v in row.items()} for row in reader]


@pytest.mark.slow
@pytest.mark.skipif(not CHECKOUT, reason="SHACPP_AUTHORS_CHECKOUT is unset: set it to a checkout of "
                                         "https://github.com/f14-bertolotti/shacpp (with pip install click tqdm)")
def test_authors_run_writes_a_run_folder_like_ours(tmp_path):
    folder = tmp_path / "runs" / "authors_run"
    result = run(["--checkout", CHECKOUT, *TINY, "--run-dir", str(folder)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    with open(folder / "args.json") as f:
        saved = json.load(f)
    assert saved["implementation"] == "authors" and saved["algorithm"] == "shacpp"
    assert (saved["scenario"], saved["n_agents"], saved["arch"], saved["num_envs"], saved["episodes"]) == (
        "dispersion", 1, "mlp", 8, 2)
    assert "authors_commit" in saved and saved["policy_dropout"] is not None  # their default, resolved
    assert (folder / "authors" / "eval.log").exists()  # their own files, in the subfolder

    columns, evals = rows(folder / "eval.csv")
    assert columns[:len(COLUMNS)] == COLUMNS and evals
    # our max_return of the same configuration: dispersion pays each food once, n_agents foods
    expected = reset(make_env("dispersion", 1, 4, torch.device("cpu"), seed=1))[1].mean().item()
    for row in evals:
        assert row["episode"] == 2 and row["global_step"] == 2 * 8 * 4 and row["time"] > 0
        assert row["max_return"] == pytest.approx(expected)
        assert math.isfinite(row["normalized_return"])
        assert row["normalized_return"] == pytest.approx(row["eval_return"] / row["max_return"], abs=1e-5)
        assert 0 <= row["solved_fraction"] <= 1 and 0 <= row["eval_return"] <= row["max_return"]
    _, train = rows(folder / "train.csv")
    assert [row["episode"] for row in train] == [1, 2]

    plotted = subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), str(tmp_path / "runs"), "--out",
                              str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=120, env=ENV)
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    assert "SHAC++ (authors' code)" in plotted.stdout and (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("checkout, message", [
    (None, "no checkout of the authors' code"),
    ("does-not-exist", "is not a folder"),
    (".", "holds no src/experiments.py"),
])
def test_missing_checkout_is_one_line(checkout, message, tmp_path):
    result = run([*(["--checkout", checkout] if checkout else []), *TINY], tmp_path, timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not os.listdir(tmp_path)  # no run folder
