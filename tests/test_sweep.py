"""sweep.py: a tiny grid on the local pool, one run killed half way, then the relaunch skips the finished run and
resumes the killed one from its last.pt; and the SLURM script of a dry run. Run: python -m pytest -q"""
import os
import signal
import subprocess
import sys
import time

import pytest

from test_smoke import ENV, HERE, read_csv

pytestmark = pytest.mark.slow

GRID = ["--scripts", "ppo.py", "--scenarios", "dispersion", "--n-agents", "1", "--archs", "mlp", "--workers", "2"]
TINY = "--num-envs 8 --num-steps 4 --eval-envs 4 --eval-steps 8 --minibatch-size 16 --eval-every 2"


def sweep(tmp_path, *args, background=False):
    cmd = [sys.executable, os.path.join(HERE, "sweep.py"), *GRID, "--root", "grid", *args]
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)


def test_relaunch_skips_finished_and_resumes_killed(tmp_path):
    out = sweep(tmp_path, "--seeds", "1", f"--extra={TINY} --episodes 4")
    assert out.returncode == 0, out.stdout + out.stderr
    first = tmp_path / "grid" / "dispersion__1__mlp__ppo__1"
    assert (first / "finished").exists()
    rows_before = read_csv(first / "train.csv")

    # seed 2 is longer; kill it (SIGKILL, as a lost node would) once it has written a checkpoint
    proc = sweep(tmp_path, "--seeds", "1", "2", f"--extra={TINY} --episodes 60", background=True)
    second = tmp_path / "grid" / "dispersion__1__mlp__ppo__2"
    deadline = time.time() + 120
    while time.time() < deadline and not (second / "last.pt").exists():
        time.sleep(0.2)
    assert (second / "last.pt").exists()
    pids = subprocess.run(["pgrep", "-f", "run-dir grid/dispersion__1__mlp__ppo__2"], capture_output=True,
                          text=True).stdout.split()
    (pid,) = [p for p in pids if os.path.realpath(f"/proc/{p}/cwd") == os.path.realpath(tmp_path)]  # this test's
    os.kill(int(pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "dispersion__1__mlp__ppo__2: exit status -9" in out, out
    assert "skip    grid/dispersion__1__mlp__ppo__1 (finished)" in out
    killed_at = len(read_csv(second / "train.csv"))
    assert not (second / "finished").exists() and 0 < killed_at < 60

    out = sweep(tmp_path, "--seeds", "1", "2", f"--extra={TINY} --episodes 60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skip    grid/dispersion__1__mlp__ppo__1 (finished)" in out.stdout
    assert "resume  grid/dispersion__1__mlp__ppo__2" in out.stdout
    assert read_csv(first / "train.csv") == rows_before  # the finished run was left alone
    episodes = [int(r["episode"]) for r in read_csv(second / "train.csv")]
    assert episodes == list(range(1, 61)) and (second / "finished").exists()
    log = open(str(second) + ".log").read()
    assert "--checkpoint grid/dispersion__1__mlp__ppo__2" in log and "from episode 1\n" in log
    assert "from episode 1\n" not in log.split("--checkpoint")[1]  # the relaunch went on from the checkpoint


def test_slurm_dry_run_prints_a_job_array(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--slurm", "--dry-run", "--workers", "20"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    # the paper's grid: 3 scripts x 4 scenarios x 3 agent counts x 2 archs x 3 seeds, less shac on 2 scenarios
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --array=0-179%20" in script
    assert '--task "$SLURM_ARRAY_TASK_ID"' in script and "scontrol requeue" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell
    assert not os.path.exists(tmp_path / "runs")
