"""SHAC (shac.py): gradients through the differentiable simulator. Run: python -m pytest -q"""
import torch
import torch.nn as nn

import shac


def rollout_loss(env, policy, obs, steps):
    """Sum of the team rewards of one differentiable rollout (the core of SHAC's policy loss)."""
    total = 0.0
    for _ in range(steps):
        obs, reward, _ = shac.step(env, policy(obs).clamp(-1.0, 1.0))
        total = total + reward.sum()
    return total, obs


def test_policy_gradient_through_sampling_is_finite_and_nonzero():
    torch.manual_seed(0)
    env = shac.make_env("sampling", 2, 16, "cpu", seed=0, grad_enabled=True)
    obs, _ = shac.reset(env)
    policy = shac.make_network("mlp", 2, obs.shape[-1], 2)
    shac.cut_graph(env)
    loss, _ = rollout_loss(env, policy, obs, 8)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert torch.isfinite(norm) and norm > 0


class TowardsPackage(nn.Module):
    """A differentiable policy that drives each agent at the package (obs[6:8] is package minus agent)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(5.0))

    def forward(self, obs):
        return self.gain * obs[..., 6:8]


def test_twelve_transport_rollouts_with_contact():
    torch.manual_seed(0)
    env = shac.make_env("transport", 3, 64, "cpu", seed=0, grad_enabled=True)
    obs, _ = shac.reset(env)
    policy = TowardsPackage()
    package_moved = False
    for _ in range(12):
        shac.cut_graph(env)
        obs = obs.detach()
        loss, obs = rollout_loss(env, policy, obs, 32)
        loss.backward()  # the second of these fails if the graph of the previous rollout is still attached
        assert torch.isfinite(policy.gain.grad)
        package_moved |= bool(env.scenario.packages[0].state.vel.norm(dim=-1).max() > 1e-3)
    assert package_moved  # agents did touch the package, so the contact forces were differentiated
    assert policy.gain.grad != 0
