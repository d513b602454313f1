"""The policy steps of SHAC++ (shacpp.py) and SHAC (shac.py) on analytic models, in float64: the gradient equals a
finite difference of an independently written return, a few hundred steps reach the analytic optimum, the
action-bound penalty holds the mean at the bound, and nothing after a termination reaches the loss.
Dynamics s' = s + a, reward r = -|s' - g|^2, value V(s) = -c |s - g|^2 (c = 0: no value). Fast: python -m pytest -q
test_gradients.py"""
import pytest
import torch
import torch.nn as nn

import shac
import shacpp

MODULES = {"shacpp": shacpp, "shac": shac}


class Linear(nn.Module):
    """a = W s + b, the same map for every agent: it can represent the optimum a_0 = g - s_0, then a = 0 at g."""

    def __init__(self, scale=0.1):
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        with torch.no_grad():
            self.lin.weight.mul_(scale), self.lin.bias.mul_(scale)

    def forward(self, s):
        return self.lin(s)


class World(nn.Module):  # F(s_0, a_0..a_{T-1}) = s_0 + cumsum(a), the exact dynamics
    def forward(self, obs0, actions):  # (N, n, 2), (N, T, n, 2) -> (N, T, n, 2)
        return obs0.unsqueeze(1) + actions.cumsum(1)


class Reward(nn.Module):  # R(s, a, s') = -|s' - g|^2 per agent
    def __init__(self, goal):
        super().__init__()
        self.goal = goal

    def forward(self, obs, action, next_obs):
        return -((next_obs - self.goal) ** 2).sum(-1)


class Value(nn.Module):  # V(s) = -c |s - g|^2 per agent, (..., n, 1) as the value networks
    def __init__(self, goal, c):
        super().__init__()
        self.goal, self.c = goal, c

    def forward(self, obs):
        return -self.c * ((obs - self.goal) ** 2).sum(-1, keepdim=True)


def reference_return(policy, s0, goal, T, gamma, c, states=None):
    """sum over envs and agents of sum_t gamma^t r_t + gamma^T V(s_T), divided by (N n T), written as a plain loop.
    states: the policy's inputs held fixed (SHAC++: the rollout's observations carry no gradient); None: the
    policy sees the differentiable states (SHAC through the simulator)."""
    N, n, _ = s0.shape
    total = 0.0
    s = s0
    for t in range(T):
        a = policy(s if states is None else states[t])
        s = s + a
        total = total + gamma ** t * -((s - goal) ** 2).sum(-1)
    total = total + gamma ** T * -c * ((s - goal) ** 2).sum(-1)
    return total.sum() / (N * n * T)


def policy_loss_gradient(module, policy, s0, goal, T, c, args, alive=None, terminated=None, opt=None):
    """One policy update with the script's own policy_loss (SGD with lr 0, no clipping), returning the policy's gradient, the
    real states of the rollout and the stats. SHAC++ imagines through World/Reward/Value with imagine();
    SHAC differentiates through the dynamics, as through VMAS. With an optimiser, policy_step really steps."""
    N, n, _ = s0.shape
    with torch.no_grad():  # the rollout in the "simulator" (states only)
        states = [s0]
        for t in range(T):
            states.append(states[-1] + policy(states[-1]))
    states = torch.stack(states)
    reward, value = Reward(goal), Value(goal, c)
    if module is shacpp:
        means = policy(states[:-1])  # the rollout's observations carry no gradient; the actions do
        r_hat, v_hat = shacpp.imagine(World(), reward, value, states, means)
    else:
        s, rewards, means = s0, [], []
        for t in range(T):
            means.append(policy(s))
            s_next = s + means[-1]
            rewards.append(reward(s, means[-1], s_next))
            s = s_next
        r_hat, v_hat, means = torch.stack(rewards), value(s).squeeze(-1), torch.stack(means)
    alive = torch.ones(T, N, dtype=torch.bool) if alive is None else alive
    terminated = torch.zeros(T, N, dtype=torch.bool) if terminated is None else terminated
    opt = torch.optim.SGD(policy.parameters(), lr=0.0) if opt is None else opt
    stats = policy_step(module, policy, opt, r_hat, v_hat, means, alive, terminated, args)
    return torch.cat([p.grad.flatten() for p in policy.parameters()]), states, stats


def policy_step(module, policy, opt, rewards, last_value, penalized, alive, terminated, args):
    """The script's policy update as its loop runs it: policy_loss, backward into the policy, clipping, the step."""
    loss, stats = module.policy_loss(rewards, last_value, penalized, alive, terminated, args)
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(policy.parameters()))
    nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    opt.step()
    return stats


@pytest.mark.parametrize("name", MODULES)
def test_policy_gradient_equals_finite_differences(name):
    """The gradient of the policy loss is minus the gradient of the window return (discounted rewards and the
    discounted bootstrap), which a central finite difference of the independent loop measures."""
    module = MODULES[name]
    torch.manual_seed(0)
    N, n, T, gamma, c = 6, 2, 4, 0.8, 0.5
    s0, goal = torch.rand(N, n, 2, dtype=torch.float64) - 0.5, torch.tensor([0.3, -0.2], dtype=torch.float64)
    policy = Linear()
    args = module.Args(gamma=gamma, max_grad_norm=1e9)
    grad, states, stats = policy_loss_gradient(module, policy, s0, goal, T, c, args)
    assert stats["penalty"] == 0  # every mean inside the bounds: the loss is the return alone
    params = list(policy.parameters())
    fd = []
    for p in params:
        for i in range(p.numel()):
            values = []
            for h in (1e-6, -1e-6):
                with torch.no_grad():
                    p.view(-1)[i] += h
                    values.append(reference_return(policy, s0, goal, T, gamma, c,
                                                   states=states if module is shacpp else None))
                    p.view(-1)[i] -= h
            fd.append((values[0] - values[1]) / 2e-6)
    torch.testing.assert_close(grad, -torch.stack(fd), rtol=1e-6, atol=1e-8)
    assert stats["window_return"].item() == pytest.approx(
        reference_return(policy, s0, goal, T, gamma, c).item(), rel=1e-6)  # float32 discount


@pytest.mark.parametrize("name", MODULES)
def test_policy_steps_reach_the_analytic_optimum(name):
    """300 updates on the script's own policy_loss (Adam, clipping) take the return from far below to within 1% of its
    optimum, 0 (a_0 = g - s_0, then stay: every reward and the bootstrap 0)."""
    module = MODULES[name]
    torch.manual_seed(1)
    N, n, T, gamma, c = 16, 1, 4, 0.9, 1.0
    s0, goal = torch.rand(N, n, 2, dtype=torch.float64) - 0.5, torch.tensor([0.3, -0.2], dtype=torch.float64)
    policy = Linear()
    args = module.Args(gamma=gamma)
    opt = torch.optim.Adam(policy.parameters(), lr=0.02)
    first = reference_return(policy, s0, goal, T, gamma, c).item()
    for _ in range(300):
        policy_loss_gradient(module, policy, s0, goal, T, c, args, opt=opt)
    last = reference_return(policy, s0, goal, T, gamma, c).item()
    assert first < -0.05 and last > 0.01 * first, (first, last)


@pytest.mark.parametrize("name, penalty", [("shacpp", "sample"), ("shacpp", "mean"), ("shac", None)])
def test_penalty_holds_the_mean_at_the_bound(name, penalty):
    """A goal far outside the action bounds (g = 3, one step of at most 1): the return pulls the mean up, the penalty
    alpha d(mu) pulls it back. With every component over the bound, each form of the penalty gives the same
    equilibrium, the minimum of (g - a)^2 + alpha (a - 1)^2 / 2: a = (g + alpha / 2) / (1 + alpha / 2) = 1.077."""
    module = MODULES[name]
    torch.manual_seed(2)
    N, n, T, alpha, g = 16, 1, 1, 50.0, 3.0
    s0, goal = torch.zeros(N, n, 2, dtype=torch.float64), torch.full((2,), g, dtype=torch.float64)
    policy = Linear()
    args = module.Args(alpha=alpha, **({"penalty": penalty} if penalty else {}))
    opt = torch.optim.Adam(policy.parameters(), lr=0.01)
    for _ in range(600):
        policy_loss_gradient(module, policy, s0, goal, T, 0.0, args, opt=opt)
    mean = policy(s0)
    torch.testing.assert_close(mean, torch.full_like(mean, (g + alpha / 2) / (1 + alpha / 2)), atol=2e-3, rtol=0)


class Direct(nn.Module):
    """A 'policy' whose parameters are the rewards r_t and the bootstrap values V(s_T) themselves: the gradient of the
    loss with respect to each is the weight the loss gives it."""

    def __init__(self, T, N, n):
        super().__init__()
        self.rewards = nn.Parameter(torch.zeros(T, N, n, dtype=torch.float64))
        self.values = nn.Parameter(torch.zeros(N, n, dtype=torch.float64))


@pytest.mark.parametrize("name", MODULES)
def test_nothing_after_a_termination_reaches_the_loss(name):
    """Env 0 terminates at step 1: its rewards at steps 2 and 3 and its bootstrap get no weight; env 1 lives
    throughout (weights -gamma^t / (N n T) and -gamma^T / (N n T)); env 2 is done before the window starts and is
    left out, also from the count N of live environments."""
    module = MODULES[name]
    T, N, n, gamma = 4, 3, 2, 0.9
    policy = Direct(T, N, n)
    alive = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    terminated = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    args = module.Args(gamma=gamma, max_grad_norm=1e9)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    means = torch.zeros(T, N, n, 2, dtype=torch.float64)
    policy_step(module, policy, opt, policy.rewards * 1.0, policy.values * 1.0, means, alive, terminated, args)
    live_envs = 2
    expected = -(gamma ** torch.arange(T, dtype=torch.float64))[:, None, None] * alive[..., None] / (live_envs * n * T)
    expected[:, 2] = 0  # done before the window
    torch.testing.assert_close(policy.rewards.grad, expected.expand(T, N, n))
    torch.testing.assert_close(policy.values.grad, torch.tensor([[0.0] * n, [-gamma ** T / (live_envs * n * T)] * n,
                                                                 [0.0] * n], dtype=torch.float64))
