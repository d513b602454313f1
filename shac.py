# SHAC (Xu et al., ICLR 2022) through VMAS's differentiable physics: the first-order baseline of SHAC++ (Bertolotti et
# al., ECAI 2025; docs/shac.md), CleanRL-style single file. Per episode: a T-step rollout whose rewards and observations
# carry the actions' gradient; one policy step on the window's return (policy_loss); the value model's TD(lambda) fit.
# Only scenarios with a differentiable reward (transport, sampling).
import os
import sys
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import vmas

from bookkeeping import Run, clock, load_checkpoint, parse_args, render_frame, report_evaluation, seed_everything
from scenarios import Dispersion, Sampling, max_return

ALGORITHM = os.path.basename(__file__)[: -len(".py")]  # ppo, shac or shacpp: names runs and checkpoints


@dataclass
class Args:
    exp_name: str = ALGORITHM
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the simulator"""
    cuda: bool = True
    """if toggled, run everything (simulator included) on CUDA when it is available"""
    scenario: Literal["dispersion", "transport", "discovery", "sampling"] = "transport"
    """the VMAS scenario (docs/scenarios.md)"""
    n_agents: int = 1
    """number of agents"""
    arch: Literal["mlp", "transformer"] = "mlp"
    """architecture of the policy and value networks"""
    episodes: int = 20000
    """training episodes (one episode: a rollout of num_steps in num_envs environments, then the updates)"""
    num_envs: int = 512
    """parallel training environments"""
    num_steps: int = 32
    """steps per rollout, the window h of the paper"""
    reset_every: int = 10
    """reset every training environment every this many episodes"""
    eval_every: int = 100
    """evaluate every this many episodes (and at the end)"""
    eval_envs: int = 512
    """evaluation environments"""
    eval_steps: int = 512
    """steps per evaluation rollout"""
    stop_fraction: float = 0.9
    """early stop when this fraction of the evaluation environments ..."""
    stop_return: float = 0.9
    """... reaches this fraction of its max_return"""
    capture_video: bool = False
    """at every evaluation, render evaluation environment 0 to a GIF"""
    checkpoint: str = ""
    """resume this checkpoint (or a run folder's last.pt) with its run's arguments; with --episodes 0, evaluate it"""
    run_dir: str = ""
    """the run folder (default: runs/<scenario>__<n_agents>__<arch>__<exp_name>__<seed>__<unix time>)"""

    # SHAC (Xu et al. 2022; docs/shac.md)
    learning_rate: float = 1e-3
    """Adam learning rate of every network"""
    gamma: float = 0.99
    """discount factor"""
    lam: float = 0.95
    """lambda of the TD(lambda) value targets"""
    alpha: float = 1.0
    """weight of the action-bound penalty (SHAC++'s section 3)"""
    policy_std: float = 1.0
    """fixed standard deviation of the Gaussian policy"""
    max_grad_norm: float = 1.0
    """gradient norm clip of the policy step"""
    value_epochs: int = 4
    """epochs over the current rollout when the value model trains (every episode)"""
    value_minibatches: int = 4
    """minibatches per value epoch"""

    # for bookkeeping.py: what a checkpoint must share with the run that loads it; the ranges parse_args checks
    # besides every count at least 1 and every float above 0
    STRUCTURE: ClassVar = ("scenario", "n_agents", "arch")
    AT_MOST_ONE: ClassVar = ("gamma", "lam", "stop_fraction", "stop_return")
    MAY_BE_ZERO: ClassVar = ("gamma", "lam", "alpha")


# ---------------------------------------------------------------- environments (paper section 4; docs/scenarios.md)
def make_env(scenario: str, n_agents: int, num_envs: int, device, seed: int, grad_enabled: bool = False):
    kwargs = {
        "dispersion": dict(n_food=n_agents),
        "transport": dict(package_mass=10),
        "discovery": dict(agents_per_target=min(n_agents, 2), targets_respawn=False),
        "sampling": dict(),
    }[scenario]
    env = vmas.make_env(
        {"dispersion": Dispersion, "sampling": Sampling}.get(scenario, lambda: scenario)(), num_envs=num_envs,
        device=device, continuous_actions=True, seed=seed, grad_enabled=grad_enabled, n_agents=n_agents, **kwargs,
    )
    env.scenario_name = scenario
    return env


def reset(env) -> tuple[torch.Tensor, torch.Tensor]:
    """Reset every environment; observations (envs, agents, obs) and max_return (envs,)."""
    obs = torch.stack(env.reset(), dim=1)
    return obs, max_return(env)


def step(env, action: torch.Tensor):
    """One step with actions (envs, agents, 2); observations, per-agent rewards (envs, agents), dones (envs,)."""
    obs, rewards, dones, _ = env.step(list(action.nan_to_num(0.0).unbind(1)))  # VMAS aborts on a diverged NaN
    return torch.stack(obs, dim=1), torch.stack(rewards, dim=1), dones


# ---------------------------------------------------------------- networks (paper section 4 and appendix B)
class MLP(nn.Module):
    """Centralised MLP: all agents' inputs concatenated, one hidden layer of width 32 n with a residual block;
    dropout (active in train mode) after the hidden layer and the block."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = 32 * n_agents
        self.n_agents, self.out_dim = n_agents, out_dim
        self.inp = nn.Linear(n_agents * in_dim, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_agents * out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # (..., agents, in_dim) -> (..., agents, out_dim)
        h = self.drop(torch.relu(self.inp(x.flatten(-2))))
        return self.out(h + self.drop(self.block(h))).unflatten(-1, (self.n_agents, self.out_dim))


class Transformer(nn.Module):
    """One encoder layer over the agents as tokens, full attention, no position embedding (permutation equivariant);
    dropout (active in train mode) after the embedding and inside the encoder layer."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, d_model: int = 64, ff: int = 128, norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        self.norm = nn.LayerNorm(d_model) if norm else nn.Identity()  # norm: a LayerNorm after the embedding
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoderLayer(d_model, 1, ff, dropout=dropout, batch_first=True)
        self.head = nn.Linear(d_model, out_dim)

    def forward(self, x):  # (..., agents, in_dim) -> (..., agents, out_dim)
        h = self.encoder(self.drop(self.norm(self.embed(x.flatten(0, -3)))))
        return self.head(h).unflatten(0, x.shape[:-2])


def make_network(arch: str, n_agents: int, in_dim: int, out_dim: int, norm: bool = False, dropout: float = 0.0):
    if arch == "mlp":
        return MLP(n_agents, in_dim, out_dim, dropout)
    return Transformer(n_agents, in_dim, out_dim, norm=norm, dropout=dropout)


@torch.no_grad()
def evaluate(policy_mean, env, steps: int, stop_return: float, render: bool = False):
    """Deterministic rollout (the policy mean, clamped) in freshly reset environments (docs/usage.md): the metrics,
    and with `render` the frames of environment 0."""
    obs, best = reset(env)
    team_return = torch.zeros(env.num_envs, device=env.device)
    done = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    frames = [render_frame(env)] if render else []
    for _ in range(steps):
        obs, rewards, dones = step(env, policy_mean(obs).clamp(-1.0, 1.0))
        team_return += rewards.sum(-1) * ~done  # nothing counts after an environment terminated
        frames += [render_frame(env)] if render else []
        done |= dones
    return dict(eval_return=team_return.mean().item(), max_return=best.mean().item(),
                normalized_return=(team_return.mean() / best.mean()).item(),
                solved_fraction=(team_return >= stop_return * best).float().mean().item()), frames


# ---------------------------------------------------------------- SHAC (Xu et al. 2022)
def lambda_returns(rewards, next_values, terminated, gamma: float, lam: float):
    """Truncated TD(lambda) targets of the paper (section 2.3), by the recursion
    G_t = r_t + gamma (1 - d_t) ((1 - lam) V(s_{t+1}) + lam G_{t+1}), with G_T = V(s_T) (bootstrap at the window end).
    rewards, next_values (= V(s_{t+1})), terminated: (T, ...), time first."""
    targets = torch.zeros_like(rewards)
    g = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        g = rewards[t] + gamma * (~terminated[t]) * ((1 - lam) * next_values[t] + lam * g)
        targets[t] = g
    return targets


def action_penalty(mean, low: float = -1.0, high: float = 1.0):
    """d(mu, [low, high]) of the paper's section 3, element-wise: squared distance outside the bounds, 0 inside."""
    return (mean - high).clamp(min=0) ** 2 + (low - mean).clamp(min=0) ** 2


def policy_loss(rewards, last_value, means, alive, terminated, args: Args):
    """The SHAC policy loss (SHAC++ paper, section 2.3) plus alpha times the action-bound penalty on the policy means
    (section 3). Time first: rewards (T, N, n) and last_value V(s_T) (N, n) carry the gradient to the actions;
    means (T, N, n, 2); alive (T, N): not terminated before step t; terminated (T, N): at step t."""
    T, N, n = rewards.shape
    discount = args.gamma ** torch.arange(T, device=rewards.device)
    # sum_t gamma^t r_t + gamma^T V(s_T): no reward after a termination, and no bootstrap if the window terminated
    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)
    ret = ret + args.gamma ** T * last_value * ~terminated.any(0)[:, None]
    live = alive[0].float()  # environments already done at the rollout start are left out
    denominator = live.sum().clamp(min=1) * n * T  # 1 / (N n T) over live environments
    window_return = (ret.sum(-1) * live).sum() / denominator
    penalty = (action_penalty(means) * alive[..., None, None]).sum() / (denominator * 2)  # mean over components
    loss = -window_return + args.alpha * penalty
    return loss, dict(window_return=window_return.detach(), penalty=penalty.detach())


def cut_graph(env):
    """Start a new differentiable window: detach the simulator's state, and transport's shaping
    term, which the scenario keeps between steps; otherwise the next backward pass runs into a freed graph."""
    env.world.zero_grad()
    for package in getattr(env.scenario, "packages", []):
        package.global_shaping = package.global_shaping.detach()


def fit_value(value_model, optimizer, obs, targets, epochs: int, minibatches: int, guard):
    """Regress V on the TD(lambda) targets of the current rollout (as original SHAC); obs (M, n, o), targets (M, n)."""
    for _ in range(epochs):
        for idx in torch.randperm(len(obs), device=obs.device).chunk(minibatches):
            loss = ((value_model(obs[idx]).squeeze(-1) - targets[idx]) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if guard.finite(loss):  # a non-finite update is skipped (and counted)
                optimizer.step()
    return loss.detach()


if __name__ == "__main__":
    args = parse_args(Args)
    if args.scenario in ("dispersion", "discovery"):  # refused before anything is built
        sys.exit(f"error: the {args.scenario} reward is not differentiable, so SHAC cannot train on it; use shacpp.py")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed)
    env = make_env(args.scenario, args.n_agents, args.num_envs, device, args.seed, grad_enabled=True)
    eval_env = make_env(args.scenario, args.n_agents, args.eval_envs, device, args.seed + 1)
    obs_dim = env.observation_space[0].shape[0]
    n, T, N = args.n_agents, args.num_steps, args.num_envs

    policy = make_network(args.arch, n, obs_dim, 2).to(device)  # Gaussian mean (no tanh: the penalty bounds it)
    value_model = make_network(args.arch, n, obs_dim, 1).to(device)  # V(s) per agent
    policy_opt, value_opt = (torch.optim.Adam(m.parameters(), lr=args.learning_rate, fused=True)
                             for m in (policy, value_model))

    modules = dict(policy=policy, value_model=value_model, policy_opt=policy_opt, value_opt=value_opt)
    checkpoint = load_checkpoint(args.checkpoint, args, modules, ALGORITHM) if args.checkpoint else None
    if args.episodes == 0:  # evaluation only (and a GIF with --capture-video)
        metrics, frames = evaluate(policy, eval_env, args.eval_steps, args.stop_return, render=args.capture_video)
        report_evaluation(args.checkpoint, metrics, frames)
        sys.exit(0)
    run = Run(args, modules, checkpoint, ALGORITHM, __file__)
    print(f"run {run.dir} on {device}: obs {obs_dim} per agent, {N} envs x {T} steps, from episode {run.episode + 1}")

    # rollout storage, time first, preallocated
    obs_buf = torch.zeros(T + 1, N, n, obs_dim, device=device)
    rew_buf = torch.zeros(T, N, n, device=device)
    term_buf = torch.zeros(T, N, dtype=torch.bool, device=device)
    alive_buf = torch.zeros(T, N, dtype=torch.bool, device=device)

    for episode in range(run.episode + 1, args.episodes + 1):
        # ---- rollout through the differentiable simulator: rewards and observations carry the actions' gradient
        t0 = clock(device)
        if episode == run.episode + 1 or (episode - 1) % args.reset_every == 0 or bool(done.all()):
            obs, _ = reset(env)
            done = torch.zeros(N, dtype=torch.bool, device=device)
        cut_graph(env)
        obs = obs.detach()
        rewards, means = [], []
        for t in range(T):
            mean = policy(obs)
            action = (mean + args.policy_std * torch.randn_like(mean)).clamp(-1.0, 1.0)  # reparameterised sample
            obs_buf[t], alive_buf[t] = obs.detach(), ~done
            obs, reward, dones = step(env, action)
            term_buf[t] = dones & ~done  # terminated at this step
            done = done | dones
            rewards.append(reward)
            means.append(mean)
        obs_buf[T] = obs.detach()
        rewards, means = torch.stack(rewards), torch.stack(means)
        rew_buf.copy_(rewards.detach())

        # ---- policy step on the true rewards and V(s_T), gradients through the physics (SHAC, Xu et al. 2022)
        t1 = clock(device)
        loss, stats = policy_loss(rewards, value_model(obs).squeeze(-1), means, alive_buf, term_buf, args)
        policy_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(policy.parameters()))  # no gradient lands in the value model
        grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if run.guard.finite(loss, grad_norm):  # a non-finite update is skipped (and counted)
            policy_opt.step()

        # ---- value: TD(lambda) targets of this rollout, trained every episode (original SHAC)
        t2 = clock(device)
        with torch.no_grad():
            values = value_model(obs_buf).squeeze(-1)
            targets = lambda_returns(rew_buf, values[1:], term_buf[..., None], args.gamma, args.lam)
        value_loss = fit_value(value_model, value_opt, obs_buf[:-1][alive_buf], targets[alive_buf],
                                        args.value_epochs, args.value_minibatches, run.guard)

        # ---- log: one row per episode (the only host synchronisation of the episode besides the update guard)
        t3 = clock(device)
        train_return = (rew_buf.sum(-1) * alive_buf).sum(0)[alive_buf[0]].mean().item()  # envs alive at the start
        logged = dict(policy_loss=loss, grad_norm=grad_norm, mean_abs=means.abs().mean(), value_loss=value_loss,
                      **stats)
        row = dict(zip(logged, torch.stack([v.detach() for v in logged.values()]).tolist()))
        run.log_train(episode, dict(train_return=train_return, **row, rollout_time=t1 - t0, policy_time=t2 - t1,
                                    value_time=t3 - t2))
        run.check_finite(episode)  # ends the run after too many non-finite updates in a row

        # ---- evaluation, checkpoints and early stopping (paper section 4)
        if episode % args.eval_every == 0 or episode == args.episodes:
            metrics, frames = evaluate(policy, eval_env, args.eval_steps, args.stop_return, render=args.capture_video)
            run.log_eval(episode, metrics | dict(eval_time=clock(device) - t3), frames)
            if metrics["solved_fraction"] >= args.stop_fraction:  # early stop (paper section 4): most envs solved
                print(f"early stop at episode {episode}: {metrics['solved_fraction']:.0%} of evaluation environments "
                      f"reached {args.stop_return:.0%} of max_return")
                break
        if run.stop_signal:
            break
    run.finish(episode)
