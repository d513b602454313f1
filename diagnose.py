"""Are a SHAC++ run's learned gradients any good?  For a scenario whose simulator is differentiable (transport,
sampling), roll out the run's policy and compare, window by window, the gradient of the window return with respect
to the actions taken through the learned world and reward models (what shacpp.py's policy step follows) with the
gradient taken through VMAS itself (what shac.py follows).  Then move every action of each environment a little
along each gradient, replay the window in the simulator and report the real return gained: a model gradient is
useful to the extent that its gain approaches the simulator gradient's, and no better than noise when it is no
larger than a random direction's.  Example: python diagnose.py runs/transport__1__mlp__shacpp__1__1795518769"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import tyro

import shacpp


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """run folder of shacpp.py (holds args.json and the checkpoint)"""
    checkpoint: str = "last.pt"
    """checkpoint file in the run folder"""
    windows: int = 3
    """windows of num_steps to examine, one after the other from a reset, as in training"""
    num_envs: int = 512
    """environments per window"""
    step_size: float = 0.2
    """length of the step along each unit gradient (over all actions of an environment's window)"""
    seed: int = 0
    """seed of the environments and of the policy noise"""


def replay(args: Args, scenario: str, n_agents: int, actions, grad_enabled: bool = False):
    """A fresh simulator (VMAS draws its initial states from a global random state, so only a new one made from the
    same seed starts from the same states), stepped through `actions`, a list of (envs, agents, 2)."""
    torch.manual_seed(args.seed)
    env = shacpp.make_env(scenario, n_agents, args.num_envs, torch.device("cpu"), args.seed, grad_enabled)
    with torch.no_grad():  # a differentiable simulator's graph starts after the replay
        obs, _ = shacpp.reset(env)
        for action in actions:
            obs, _, _ = shacpp.step(env, action)
    return env, obs


def window_return(env, actions):
    """Sum over the window of every agent's reward, per environment; differentiable when env is."""
    total, observations = 0.0, []
    for action in actions.unbind(0):
        obs, rewards, _ = shacpp.step(env, action)
        observations.append(obs)
        total = total + rewards.sum(-1)
    return total, torch.stack(observations)


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        with open(os.path.join(args.run, "args.json")) as f:
            run_args = json.load(f)
        checkpoint = torch.load(os.path.join(args.run, args.checkpoint), weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: cannot read the run {args.run}: {e}")
    if run_args.get("algorithm", "shacpp") != "shacpp" or "world_model" not in checkpoint:
        sys.exit(f"error: {args.run} is not a shacpp.py run")
    scenario, n, arch, T = run_args["scenario"], run_args["n_agents"], run_args["arch"], run_args["num_steps"]
    if scenario not in ("transport", "sampling"):
        sys.exit(f"error: {scenario} has no differentiable reward in VMAS; use transport or sampling")
    env, _ = replay(args, scenario, n, [])
    obs_dim = env.observation_space[0].shape[0]
    policy = shacpp.make_network(arch, n, obs_dim, 2)
    value_model = shacpp.make_network(arch, n, obs_dim, 1)
    reward_model = shacpp.RewardModel(arch, n, obs_dim)
    world_model = shacpp.WorldModel(n, obs_dim, T, residual=run_args.get("world_residual", False))
    for name, module in dict(policy=policy, value_model=value_model, reward_model=reward_model,
                             world_model=world_model).items():
        module.load_state_dict(checkpoint[name])
    print(f"{args.run} at episode {checkpoint['episode']}: {args.num_envs} envs, windows of {T} steps")

    past = []  # every action since the reset, to replay the simulator to the start of a window
    for w in range(args.windows):
        # the window's actions, sampled from the policy as in training
        env, obs = replay(args, scenario, n, past)
        actions = []
        torch.manual_seed(args.seed + 1 + w)  # the policy's noise
        with torch.no_grad():
            for _ in range(T):
                mean = policy(obs)
                actions.append((mean + run_args["policy_std"] * torch.randn_like(mean)).clamp(-1.0, 1.0))
                obs, _, _ = shacpp.step(env, actions[-1])
        actions = torch.stack(actions)  # (T, envs, agents, 2)

        # the simulator's gradient: replay to the window start, then step differentiably
        diff_env, start = replay(args, scenario, n, past, grad_enabled=True)
        a = actions.clone().requires_grad_(True)
        true_return, observed = window_return(diff_env, a)
        true_grad = torch.zeros_like(a)
        if true_return.requires_grad:  # otherwise no reward of the window responds to any action
            (true_grad,) = torch.autograd.grad(true_return.sum(), a, materialize_grads=True)

        # the models' gradient: the reward part of the SHAC++ objective, on the same actions
        a = actions.clone().requires_grad_(True)
        obs_seq = torch.cat([start[None], observed.detach()])
        r_hat, _ = shacpp.imagine(world_model, reward_model, value_model, obs_seq, a)
        (model_grad,) = torch.autograd.grad(r_hat.sum(), a)

        # real return gained by a step along each direction, per environment (unit norm over its window)
        def norm(g):  # per environment, over its whole window: (T, envs, agents, 2) -> (envs,)
            return g.pow(2).sum((0, 2, 3)).sqrt()

        def gain(direction):
            moved = actions + args.step_size * direction / norm(direction).clamp(min=1e-12)[None, :, None, None]
            with torch.no_grad():
                new, _ = window_return(replay(args, scenario, n, past)[0], moved.clamp(-1.0, 1.0))
                old, _ = window_return(replay(args, scenario, n, past)[0], actions)
            return new - old

        active = norm(true_grad) > 1e-3  # environments where the reward responds to the actions
        cos = (true_grad * model_grad).sum((0, 2, 3)) / (norm(true_grad) * norm(model_grad)).clamp(min=1e-12)
        there = "none"
        if active.any():
            gains = {k: gain(v)[active].mean().item() for k, v in
                     (("simulator", true_grad), ("models", model_grad), ("random", torch.randn_like(true_grad)))}
            there = (f"there, cos(models, simulator) {cos[active].mean():.3f}, real return gained by a step of "
                     f"{args.step_size}: " + ", ".join(f"{k} {v:+.4f}" for k, v in gains.items()))
        print(f"window {w + 1}: {active.float().mean():.1%} of envs with a simulator gradient; {there}"
              + f"; elsewhere |model gradient| {norm(model_grad)[~active].mean():.4f} "
              f"(simulator {norm(true_grad)[~active].mean():.4f})")
        past += list(actions.unbind(0))
