"""Throughput benchmark: env steps per second of a training script next to raw VMAS stepping of the same
configuration, measured in one run.  Example: python bench.py --script ppo.py --scenarios dispersion transport"""
import csv
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import tyro

from ppo import make_env, reset, step  # the environment factory is identical in every training script


@dataclass
class Args:
    script: str = "ppo.py"
    """training script to measure"""
    scenarios: list[str] = field(default_factory=lambda: ["dispersion", "transport"])
    """scenarios to measure"""
    n_agents: list[int] = field(default_factory=lambda: [1, 3])
    """agent counts to measure"""
    arch: str = "mlp"
    """architecture passed to the training script"""
    num_envs: int = 512
    """parallel environments (the paper's 512)"""
    num_steps: int = 32
    """steps per rollout (the paper's 32)"""
    episodes: int = 30
    """training episodes per measurement; the first fifth is dropped as warm-up"""
    extra: str = ""
    """further arguments for the training script, as one string"""


def raw_seconds_per_rollout(scenario: str, n: int, num_envs: int, num_steps: int, rollouts: int = 10) -> float:
    """Median seconds for num_steps steps of the bare simulator with uniform random actions."""
    env = make_env(scenario, n, num_envs, "cpu", seed=0)
    reset(env)
    times = []
    for _ in range(rollouts):
        start = time.perf_counter()
        for _ in range(num_steps):
            step(env, torch.rand(num_envs, n, 2) * 2 - 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_seconds_per_episode(args: Args, scenario: str, n: int) -> float:
    """Median seconds per training episode (rollout and updates) from the script's own train.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(args.script), "--scenario", scenario, "--n-agents", str(n), "--arch",
               args.arch, "--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps), "--episodes",
               str(args.episodes), "--eval-every", str(10 ** 9), "--eval-steps", "1", *args.extra.split()]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        (path,) = glob.glob(os.path.join(tmp, "runs", "*", "train.csv"))
        with open(path) as f:
            t = [float(row["time"]) for row in csv.DictReader(f)]
    deltas = [b - a for a, b in zip(t, t[1:])][args.episodes // 5:]
    return statistics.median(deltas)


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"| scenario | agents | raw VMAS steps/s | {args.script} steps/s | ratio | {args.script} s/episode |")
    print("|---|---|---|---|---|---|")
    for scenario in args.scenarios:
        for n in args.n_agents:
            raw = args.num_envs * args.num_steps / raw_seconds_per_rollout(scenario, n, args.num_envs, args.num_steps)
            per_episode = train_seconds_per_episode(args, scenario, n)
            train = args.num_envs * args.num_steps / per_episode
            print(f"| {scenario} | {n} | {raw:,.0f} | {train:,.0f} | {train / raw:.2f} | {per_episode:.3f} |", flush=True)
