"""Reference controllers, evaluated exactly as the training scripts evaluate a policy (shacpp.py's evaluate() on
make_env(...)): the rows that put a learned policy's normalised return in context.
  heuristic  VMAS's own HeuristicPolicy (transport, discovery), one call per agent on its own observation
  random     a fresh uniform action in [-1, 1] every step: the floor every claim of learning must clear
  zero       no action at all
  greedy     dispersion only: every agent heads for its nearest uneaten food, using only its own observation
A tool, not a training script: it imports shacpp.py for the environment factory and the evaluation. The run folder
runs/<scenario>__<n>__reference__<policy>__<seed>/ holds args.json and a one-row eval.csv, which plot.py shows.
Example: python tools/reference.py --policy heuristic --scenario transport --n-agents 3"""
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
import vmas

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import shacpp

SCENARIOS = {"heuristic": ("transport", "discovery"), "greedy": ("dispersion",)}  # where a policy exists


@dataclass
class Args:
    policy: Literal["heuristic", "random", "zero", "greedy"] = "random"
    """the reference controller"""
    scenario: Literal["dispersion", "transport", "discovery", "sampling"] = "dispersion"
    """the VMAS scenario, set up as in the training scripts"""
    n_agents: int = 1
    """number of agents"""
    eval_envs: int = 512
    """number of evaluation environments"""
    eval_steps: int = 512
    """steps per evaluation rollout"""
    stop_return: float = 0.9
    """an environment counts as solved when its return reaches this fraction of its max_return"""
    seed: int = 1
    """seed of python, numpy, torch (the random policy) and the simulator"""
    cuda: bool = True
    """if toggled, run on CUDA when it is available"""
    runs: str = "runs"
    """folder under which the run folder is written"""


def unsupported(args: Args) -> str | None:
    """Why this policy cannot run on this scenario, if it cannot."""
    if args.scenario not in SCENARIOS.get(args.policy, (args.scenario,)):
        return f"there is no {args.policy} policy for {args.scenario} (only for {' and '.join(SCENARIOS[args.policy])})"
    return None


def heuristic_policy(scenario: str):
    """VMAS's HeuristicPolicy of the scenario, called per agent on its own observation (as vmas' run_heuristic
    example does), with the action range of our agents ([-1, 1])."""
    controller = importlib.import_module(f"vmas.scenarios.{scenario}").HeuristicPolicy(continuous_action=True)
    return lambda obs: torch.stack([controller.compute_action(o, u_range=1.0) for o in obs.unbind(1)], 1)


def greedy_dispersion(obs, gain: float = 4.0):
    """Each agent heads for its nearest uneaten food. Its own observation is [pos (2), vel (2), then per food:
    position relative to the agent (2), eaten flag (1)]; a proportional pull on the food, damped by the velocity,
    so that it does not fly past a small food."""
    food = obs[..., 4:].unflatten(-1, (-1, 3))  # (envs, agents, food, 3)
    dist = food[..., :2].norm(dim=-1).masked_fill(food[..., 2] > 0.5, float("inf"))
    target = food[..., :2].gather(-2, dist.argmin(-1)[..., None, None].expand(*dist.shape[:2], 1, 2)).squeeze(-2)
    action = gain * target - obs[..., 2:4]
    return torch.where(dist.isinf().all(-1, keepdim=True), 0.0, action)  # nothing left: stand still


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.n_agents < 1:
        sys.exit(f"error: --n-agents must be at least 1, got {args.n_agents}")
    if args.eval_envs < 1 or args.eval_steps < 1:
        sys.exit("error: --eval-envs and --eval-steps must be at least 1")
    if problem := unsupported(args):
        sys.exit(f"error: {problem}")
    shacpp.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = shacpp.make_env(args.scenario, args.n_agents, args.eval_envs, device, args.seed)
    shape = (args.eval_envs, args.n_agents, 2)
    policy = {
        "heuristic": lambda: heuristic_policy(args.scenario),
        "random": lambda: lambda obs: torch.rand(shape, device=device) * 2 - 1,
        "zero": lambda: lambda obs: torch.zeros(shape, device=device),
        "greedy": lambda: greedy_dispersion,
    }[args.policy]()
    start = time.time()
    metrics, _ = shacpp.evaluate(policy, env, args.eval_steps, args.stop_return)
    elapsed = time.time() - start

    run_dir = os.path.join(args.runs, f"{args.scenario}__{args.n_agents}__reference__{args.policy}__{args.seed}")
    os.makedirs(run_dir, exist_ok=True)  # a rerun (same seed: same numbers) replaces the folder's files
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args) | {"algorithm": args.policy, "script": "reference.py", "torch": torch.__version__,
                                  "vmas": vmas.__version__}, f, indent=2)
    row = dict(episode=0, global_step=0, time=elapsed, **metrics)
    with open(os.path.join(run_dir, "eval.csv"), "w") as f:
        f.write(",".join(row) + "\n" + ",".join(f"{v:.6g}" for v in row.values()) + "\n")
    print(f"{args.policy} on {args.scenario} with {args.n_agents} agent{'s' * (args.n_agents > 1)} "
          f"({args.eval_envs} envs x {args.eval_steps} steps, {elapsed:.0f} s): "
          + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"wrote {run_dir}")
