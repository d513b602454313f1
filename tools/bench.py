"""Throughput benchmark: env steps per second of a training script next to raw VMAS stepping of the same
configuration, measured in one run.  Example: python tools/bench.py --script ppo.py --scenarios dispersion transport
With --shacpp-steady: SHAC++ seconds per episode at the paper's settings once the caches are full, from measured
phase costs (see shacpp_steady_state). With --world-attention: one training step of SHAC++'s world model with its
masked attention over all n (T + 1) tokens against the same attention computed on its structure (docs/speed.md)."""
import csv
import glob
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import shacpp

from ppo import make_env, reset, step  # the environment factory is identical in every training script


@dataclass
class Args:
    script: str = "ppo.py"
    """training script to measure"""
    scenarios: list[str] = field(default_factory=lambda: ["dispersion", "transport"])
    """scenarios to measure"""
    n_agents: list[int] = field(default_factory=lambda: [1, 3])
    """agent counts to measure"""
    arch: list[str] = field(default_factory=lambda: ["mlp"])
    """architectures to measure"""
    num_envs: int = 512
    """parallel environments (the paper's 512)"""
    num_steps: int = 32
    """steps per rollout (the paper's 32)"""
    episodes: int = 30
    """training episodes per measurement; the first fifth is dropped as warm-up"""
    extra: str = ""
    """further arguments for the training script, as one string"""
    shacpp_steady: bool = False
    """measure SHAC++ in steady state (full caches) instead of a script's throughput"""
    repeats: int = 3
    """--shacpp-steady, --world-attention: timed training steps per model (median)"""
    world_attention: bool = False
    """compare the world model's masked attention with the structured one (--n-agents, --num-steps, --repeats)"""
    probe: str = ""
    """internal: `masked,n` or `structured,n`, time one world-model step in this process and print it as JSON"""


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


def run_measured(cmd: list[str], cwd: str | None = None) -> tuple[str, float]:
    """Run a command to its end; its standard output and its own peak resident memory in MiB (os.wait4's ru_maxrss)."""
    process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(cmd)} failed")
    return out, usage.ru_maxrss / 1024


def train_log(args: Args, script: str, scenario: str, n: int, arch: str, extra: list[str]) -> tuple[list[dict], float]:
    """The train.csv rows of a short run of a training script (no evaluation), and its peak memory in MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(script), "--scenario", scenario, "--n-agents", str(n), "--arch", arch,
               "--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps), "--episodes",
               str(args.episodes), "--eval-every", str(10 ** 9), "--eval-steps", "1", *extra]
        _, peak = run_measured(cmd, cwd=tmp)
        (path,) = glob.glob(os.path.join(tmp, "runs", "*", "train.csv"))
        with open(path) as f:
            return list(csv.DictReader(f)), peak


def train_seconds_per_episode(args: Args, scenario: str, n: int, arch: str) -> float:
    """Median seconds per training episode (rollout and updates) from the script's own train.csv."""
    t = [float(row["time"]) for row in train_log(args, args.script, scenario, n, arch, args.extra.split())[0]]
    return statistics.median([b - a for a, b in zip(t, t[1:])][args.episodes // 5:])


def seconds_per_step(model, loss_fn, repeats: int) -> float:
    """Median seconds of one Adam step of `model` on `loss_fn()` (a fresh random minibatch each time)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        start = time.perf_counter()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def shacpp_steady_state(args: Args, scenario: str, n: int, arch: str) -> dict:
    """SHAC++ at the paper's settings once its caches are full (30000 items each, 10 epochs of minibatches of 1000,
    every 10 episodes): the policy episode (rollout, imagination, policy step) is the median of a real run's
    rollout_time + policy_time; each model's training step is timed on random data of the real shapes, and a full
    cache costs 10 x 30 such steps per model, once per 10 episodes."""
    rows, peak = train_log(args, "shacpp.py", scenario, n, arch, ["--model-every", "1000000"])
    policy = statistics.median(float(r["rollout_time"]) + float(r["policy_time"]) for r in rows[2:])
    obs_dim = make_env(scenario, n, 1, "cpu", seed=0).observation_space[0].shape[0]
    B, T = 1000, args.num_steps
    world, reward = shacpp.WorldModel(n, obs_dim, T), shacpp.RewardModel(arch, n, obs_dim)
    value = shacpp.make_network(arch, n, obs_dim, 1)
    steps = {
        "world": seconds_per_step(world, lambda: world(torch.randn(B, n, obs_dim), torch.randn(B, T, n, 2)).square()
                                  .mean(), args.repeats),
        "reward": seconds_per_step(reward, lambda: reward(torch.randn(B, n, obs_dim), torch.randn(B, n, 2),
                                                          torch.randn(B, n, obs_dim)).square().mean(), args.repeats),
        "value": seconds_per_step(value, lambda: value(torch.randn(B, n, obs_dim)).square().mean(), args.repeats),
    }
    per_training = 10 * 30000 // B  # epochs x batches of a full cache
    return dict(policy=policy, **steps, episode=policy + per_training * sum(steps.values()) / 10, peak=peak)


def structured_layer(layer: torch.nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """One of the world model's encoder layers (post-norm, ReLU, one head) on tokens x (B, T + 1, n, d), with its
    attention computed on the mask's structure: token (t, i) attends to its own agent's steps u <= t and to the other
    agents at step t, (T + 1) + n - 1 keys instead of (T + 1) n, all in one softmax: the same function as the mask."""
    attention, (S, n, d) = layer.self_attn, x.shape[1:]
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)  # (B, S, n, d) each
    own = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * d ** -0.5  # (B, n, S, S): own agent, all steps
    own = own.masked_fill(torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1), -math.inf).transpose(1, 2)
    others = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device),
                                                              -math.inf)  # (B, S, n, n): same step, other agents
    p = torch.softmax(torch.cat([own, others], -1), -1)  # (B, S, n, S + n)
    mixed = (p[..., :S].transpose(1, 2) @ v.transpose(1, 2)).transpose(1, 2) + p[..., S:] @ v
    x = layer.norm1(x + attention.out_proj(mixed))
    return layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))


def structured_world_forward(model: shacpp.WorldModel, obs0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """WorldModel.forward with structured_layer in place of the masked encoder layers (same parameters)."""
    tokens = torch.cat([model.embed_obs(obs0).unsqueeze(1), model.embed_action(actions)], 1)
    h = model.norm(tokens + model.step_embedding)
    for layer in model.encoder.layers:
        h = structured_layer(layer, h)
    return model.head(h[:, 1:]) + (obs0.unsqueeze(1) if model.residual else 0)


def world_step_probe(kind: str, n: int, args: Args) -> dict:
    """Median seconds of one Adam step of the world model on 1000 random rollouts (the paper's minibatch)."""
    torch.manual_seed(0)
    obs_dim, B, T = 13, 1000, args.num_steps  # dispersion's observation size with 3 agents; the cost barely depends on it
    model = shacpp.WorldModel(n, obs_dim, T)
    forward = model if kind == "masked" else lambda o, a: structured_world_forward(model, o, a)
    seconds = seconds_per_step(model, lambda: forward(torch.randn(B, n, obs_dim), torch.randn(B, T, n, 2)).square()
                               .mean(), args.repeats)
    return dict(seconds=seconds)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.probe:
        kind, n = args.probe.split(",")
        print(json.dumps(world_step_probe(kind, int(n), args)))
        sys.exit(0)
    if args.world_attention:
        print("| agents | tokens | masked s/step | structured s/step | ratio | masked peak MiB | structured peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for n in args.n_agents:
            measured = {}
            for kind in ("masked", "structured"):
                out, peak = run_measured([sys.executable, os.path.abspath(__file__), "--probe", f"{kind},{n}",
                                          "--num-steps", str(args.num_steps), "--repeats", str(args.repeats)])
                measured[kind] = (json.loads(out)["seconds"], peak)
            (tm, pm), (ts, ps) = measured["masked"], measured["structured"]
            print(f"| {n} | {n * (args.num_steps + 1)} | {tm:.3f} | {ts:.3f} | {tm / ts:.2f} | {pm:.0f} | {ps:.0f} |",
                  flush=True)
        sys.exit(0)
    if args.shacpp_steady:
        print("| scenario | agents | arch | raw VMAS s/rollout | policy episode s | world / reward / value step s "
              "| s/episode, steady state | peak MiB, policy episodes |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print(f"| scenario | agents | arch | raw VMAS steps/s | {args.script} steps/s | ratio | s/episode |")
        print("|---|---|---|---|---|---|---|")
    for scenario, n, arch in itertools.product(args.scenarios, args.n_agents, args.arch):
        raw_rollout = raw_seconds_per_rollout(scenario, n, args.num_envs, args.num_steps)
        if args.shacpp_steady:
            c = shacpp_steady_state(args, scenario, n, arch)
            print(f"| {scenario} | {n} | {arch} | {raw_rollout:.3f} | {c['policy']:.3f} | {c['world']:.3f} / "
                  f"{c['reward']:.3f} / {c['value']:.3f} | {c['episode']:.2f} | {c['peak']:.0f} |", flush=True)
            continue
        raw = args.num_envs * args.num_steps / raw_rollout
        per_episode = train_seconds_per_episode(args, scenario, n, arch)
        train = args.num_envs * args.num_steps / per_episode
        print(f"| {scenario} | {n} | {arch} | {raw:,.0f} | {train:,.0f} | {train / raw:.2f} | {per_episode:.3f} |",
              flush=True)
