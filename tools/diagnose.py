"""Are a SHAC++ run's learned gradients any good?  For a scenario whose simulator is differentiable (transport,
sampling), roll out the run's policy and compare, window by window, the gradient of the window's discounted reward
sum with respect to the sampled actions taken through the learned world and reward models (the reward part of what
shacpp.py's policy step follows) with the gradient taken through VMAS itself (what shac.py follows).  Then move every
environment's actions a little along each gradient, replay the window in the simulator and report the real return
gained: a model gradient is useful to the extent that its gain approaches the simulator gradient's, and no better
than noise when it is no larger than a random direction's.  A diagnostic tool, not a training script: it imports
shacpp.py for the networks and the environment factory.
Example: python tools/diagnose.py runs/transport__1__mlp__shacpp__1__1795518769 --num-envs 4096"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import shacpp


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """run folder of shacpp.py (holds args.json and the checkpoint)"""
    checkpoint: str = "last.pt"
    """checkpoint file in the run folder"""
    windows: int = 3
    """windows of num_steps to examine, one after the other from a reset, as in training (each replays the
    simulator from the reset, so the cost grows with the square of this)"""
    num_envs: int = 512
    """environments per window"""
    step_size: float = 0.2
    """length of the step along each unit gradient (over all sampled actions of an environment's window)"""
    active: float = 1e-3
    """an environment's simulator gradient counts as non-zero above this norm"""
    seed: int = 0
    """seed of the simulator, the policy's noise and the random direction"""


def replay(scenario: str, n_agents: int, num_envs: int, seed: int, actions, grad_enabled: bool = False):
    """A fresh simulator stepped through `actions`, a list of (envs, agents, 2). VMAS keeps one random state for all
    its environments and reseeds it when one is made, so every replay starts from the same states.
    Returns the simulator, the last observations and which environments are done."""
    env = shacpp.make_env(scenario, n_agents, num_envs, torch.device("cpu"), seed, grad_enabled)
    with torch.no_grad():  # a differentiable simulator's graph starts after the replay
        obs, _ = shacpp.reset(env)
        done = torch.zeros(num_envs, dtype=torch.bool)
        for action in actions:
            obs, _, dones = shacpp.step(env, action)
            done |= dones
    return env, obs, done


def window_return(env, raw, done, gamma: float):
    """Discounted sum of the team reward over the window of raw (unclamped) samples (T, envs, agents, 2), nothing
    after a termination, as in training; differentiable when env is. Also returns alive (T, envs)."""
    total, alive = 0.0, []
    for t, sample in enumerate(raw.unbind(0)):
        alive.append(~done)
        _, rewards, dones = shacpp.step(env, sample.clamp(-1.0, 1.0))  # the clamp passes no gradient outside
        total = total + gamma ** t * rewards.sum(-1) * ~done
        done = done | dones
    return total, torch.stack(alive)


def norm(g):
    """Per environment, over its whole window: (T, envs, agents, 2) -> (envs,)."""
    return g.pow(2).sum((0, 2, 3)).sqrt()


def describe(values, mask, fmt: str = "{:.4f}"):
    return fmt.format(values[mask].mean().item()) if mask.any() else "none"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.windows < 1 or args.num_envs < 1:
        sys.exit("error: --windows and --num-envs must be at least 1")
    try:
        with open(os.path.join(args.run, "args.json")) as f:
            run_args = json.load(f)
        checkpoint = torch.load(os.path.join(args.run, args.checkpoint), map_location="cpu", weights_only=True)
        assert isinstance(checkpoint, dict) and "world_model" in checkpoint
    except Exception:
        sys.exit(f"error: {args.run} has no readable args.json and shacpp.py checkpoint {args.checkpoint}")
    scenario, n, arch, T = run_args["scenario"], run_args["n_agents"], run_args["arch"], run_args["num_steps"]
    for key in ("scenario", "n_agents", "arch"):
        if key in checkpoint and checkpoint[key] != run_args[key]:
            sys.exit(f"error: {args.checkpoint} was written with {key} {checkpoint[key]}, "
                     f"args.json says {run_args[key]}")
    if scenario not in ("transport", "sampling"):
        sys.exit(f"error: {scenario} has no differentiable reward in VMAS; use transport or sampling")
    env, obs, _ = replay(scenario, n, args.num_envs, args.seed, [])
    obs_dim = env.observation_space[0].shape[0]
    residual = checkpoint.get("world_residual", run_args.get("world_residual", False))  # older checkpoints lack it
    models = dict(policy=shacpp.make_network(arch, n, obs_dim, 2), value_model=shacpp.make_network(arch, n, obs_dim, 1),
                  reward_model=shacpp.RewardModel(arch, n, obs_dim),
                  world_model=shacpp.WorldModel(n, obs_dim, T, residual=residual))
    try:
        for name, module in models.items():
            module.load_state_dict(checkpoint[name])
    except (KeyError, RuntimeError) as e:
        sys.exit(f"error: {args.checkpoint} does not fit the networks of args.json: {' '.join(str(e).split())}")
    gamma, std = run_args["gamma"], run_args["policy_std"]
    print(f"{args.run} at episode {checkpoint.get('episode', '?')}: {args.num_envs} envs, windows of {T} steps")

    past = []  # every action since the reset, to replay the simulator to the start of a window
    for w in range(args.windows):
        # the window's raw samples from the policy, as in training (the simulator gets them clamped)
        torch.manual_seed(args.seed + 1 + w)
        raw = []
        with torch.no_grad():
            for _ in range(T):
                mean = models["policy"](obs)
                raw.append(mean + std * torch.randn_like(mean))
                obs, _, _ = shacpp.step(env, raw[-1].clamp(-1.0, 1.0))
        raw = torch.stack(raw)  # (T, envs, agents, 2)

        # the simulator's gradient: replay to the window start, then step differentiably
        diff_env, start, start_done = replay(scenario, n, args.num_envs, args.seed, past, grad_enabled=True)
        a = raw.clone().requires_grad_(True)
        true_return, alive = window_return(diff_env, a, start_done, gamma)
        true_grad = torch.zeros_like(a)
        if true_return.requires_grad:  # otherwise no reward of the window responds to any action
            (true_grad,) = torch.autograd.grad(true_return.sum(), a, materialize_grads=True)

        # the models' gradient: the reward part of the SHAC++ objective, on the same samples and the same start
        a = raw.clone().requires_grad_(True)
        r_hat, _ = shacpp.imagine(models["world_model"], models["reward_model"], models["value_model"],
                                  start[None], a.clamp(-1.0, 1.0))
        discount = gamma ** torch.arange(T, dtype=torch.float32)[:, None, None]
        (model_grad,) = torch.autograd.grad((discount * r_hat * alive[..., None]).sum(), a)

        # real return gained by a step along each direction (unit norm over an environment's window)
        def real_return(samples):  # the window replayed in a fresh simulator
            with torch.no_grad():
                return window_return(replay(scenario, n, args.num_envs, args.seed, past)[0], samples, start_done,
                                     gamma)[0]

        before, gains = real_return(raw), {}
        for name, g in (("simulator", true_grad), ("models", model_grad), ("random", torch.randn_like(raw))):
            gains[name] = real_return(raw + args.step_size * g / norm(g).clamp(min=1e-12)[None, :, None, None]) - before

        active = norm(true_grad) > args.active
        cos = (true_grad * model_grad).sum((0, 2, 3)) / (norm(true_grad) * norm(model_grad)).clamp(min=1e-12)
        there = "none"
        if active.any():
            there = (f"there: cos(models, simulator) {describe(cos, active, '{:.3f}')}, |models| "
                     f"{describe(norm(model_grad), active)} (|simulator| {describe(norm(true_grad), active)}), "
                     f"real return gained by a step of {args.step_size}: "
                     + ", ".join(f"{k} {describe(v, active, '{:+.4f}')}" for k, v in gains.items()))
        print(f"window {w + 1}: {active.float().mean():.1%} of envs with a simulator gradient; {there}; elsewhere: "
              f"|models| {describe(norm(model_grad), ~active)} (|simulator| {describe(norm(true_grad), ~active)})")
        past += [sample.clamp(-1.0, 1.0) for sample in raw.unbind(0)]
