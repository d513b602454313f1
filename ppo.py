# PPO / MAPPO, the on-policy baseline of SHAC++ (Bertolotti et al., ECAI 2025), CleanRL-style single file: CleanRL's
# ppo_continuous_action.py batched over VMAS environments and agents, with CleanRL's reward scaling. The default actor,
# one network over all agents, is the paper's MAPPO; --actor decentralised, one network on each agent's own
# observation, is Yu et al. 2022's MAPPO. docs/ppo.md explains every argument and logged column.
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
    scenario: Literal["dispersion", "transport", "discovery", "sampling"] = "dispersion"
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

    # PPO (CleanRL's ppo_continuous_action.py)
    actor: Literal["centralised", "decentralised"] = "centralised"
    """one network over all agents (the paper's MAPPO), or one on each agent's own observation (Yu et al. 2022)"""
    learning_rate: float = 1e-3
    """Adam learning rate of the policy and value networks"""
    norm_reward: bool = True
    """divide rewards by the running std of the discounted return (CleanRL's NormalizeReward, without its clip)"""
    gamma: float = 0.99
    """discount factor"""
    lam: float = 0.95
    """lambda of GAE"""
    update_epochs: int = 4
    """epochs over the rollout per update"""
    minibatch_size: int = 2000
    """about this many (step, environment) samples per minibatch: round(batch / this) equal minibatches"""
    clip_coef: float = 0.2
    """surrogate (and value) clipping coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    ent_coef: float = 0.0
    """entropy coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""

    # for bookkeeping.py: what a checkpoint must share with the run that loads it; the ranges parse_args checks
    # besides every count at least 1 and every float above 0
    STRUCTURE: ClassVar = ("scenario", "n_agents", "arch", "actor")
    AT_MOST_ONE: ClassVar = ("gamma", "lam", "stop_fraction", "stop_return")
    MAY_BE_ZERO: ClassVar = ("gamma", "lam", "vf_coef", "ent_coef")


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


# ---------------------------------------------------------------- PPO (CleanRL's ppo_continuous_action.py)
class Policy(nn.Module):
    """Gaussian policy with a state-independent learned log-std. The mean: centralised, one network over all agents
    (the paper's MAPPO); decentralised, one network on each agent's own observation (Yu et al. 2022)."""

    def __init__(self, arch: str, n_agents: int, obs_dim: int, actor: str = "centralised"):
        super().__init__()
        self.decentralised = actor == "decentralised"
        self.net = make_network(arch, 1 if self.decentralised else n_agents, obs_dim, 2)
        self.log_std = nn.Parameter(torch.zeros(2))

    def mean(self, obs):  # (..., agents, obs_dim) -> (..., agents, 2)
        return self.net(obs.unsqueeze(-2)).squeeze(-2) if self.decentralised else self.net(obs)

    def dist(self, obs) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(obs), self.log_std.exp(), validate_args=False)


class RunningNorm(nn.Module):
    """Running mean and variance of everything passed to update() (the parallel update of gymnasium's
    RunningMeanStd), kept in buffers so that checkpoints carry them."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))  # gymnasium's prior count

    @torch.no_grad()
    def update(self, x):  # x: (samples, *shape)
        mean, var, count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = mean - self.mean, self.count + count
        self.var.copy_((self.var * self.count + var * count + delta ** 2 * self.count * count / total) / total)
        self.mean += delta * count / total
        self.count += count


def minibatches(batch_size: int, minibatch_size: int, device=None) -> tuple[torch.Tensor, ...]:
    """A random split of range(batch_size) into round(batch_size / minibatch_size) parts whose sizes differ by at
    most one (CleanRL: batch_size // num_minibatches each), so no short tail gets a full Adam step."""
    return torch.randperm(batch_size, device=device).tensor_split(max(1, round(batch_size / minibatch_size)))


def gae(rewards, values, next_value, dones, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over T steps, time first: rewards, values (T, ...);
    next_value V(s_T) (...); dones (T, ...), True where step t terminated. Returns advantages and returns."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nonterminal = 1.0 - dones[t].float()
        v_next = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * v_next * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        advantages[t] = last
    return advantages, advantages + values


if __name__ == "__main__":
    args = parse_args(Args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed)
    env = make_env(args.scenario, args.n_agents, args.num_envs, device, args.seed)
    eval_env = make_env(args.scenario, args.n_agents, args.eval_envs, device, args.seed + 1)
    obs_dim = env.observation_space[0].shape[0]
    n, T, N = args.n_agents, args.num_steps, args.num_envs

    policy = Policy(args.arch, n, obs_dim, args.actor).to(device)
    value_model = make_network(args.arch, n, obs_dim, 1).to(device)  # centralised critic: V(s) per agent
    reward_norm = RunningNorm().to(device)  # one statistic for all agents
    params = [*policy.parameters(), *value_model.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, fused=True)  # fused: one kernel, many small steps

    modules = dict(policy=policy, value_model=value_model, reward_norm=reward_norm, optimizer=optimizer)
    checkpoint = load_checkpoint(args.checkpoint, args, modules, ALGORITHM) if args.checkpoint else None
    if args.episodes == 0:  # evaluation only (and a GIF with --capture-video)
        metrics, frames = evaluate(policy.mean, eval_env, args.eval_steps, args.stop_return, render=args.capture_video)
        report_evaluation(args.checkpoint, metrics, frames)
        sys.exit(0)
    run = Run(args, modules, checkpoint, ALGORITHM, __file__)
    print(f"run {run.dir} on {device}: obs {obs_dim} per agent, {N} envs x {T} steps, from episode {run.episode + 1}")

    # rollout storage, time first, preallocated
    obs_buf = torch.zeros(T, N, n, obs_dim, device=device)
    act_buf = torch.zeros(T, N, n, 2, device=device)
    rew_buf, disc_buf = torch.zeros(T, N, n, device=device), torch.zeros(T, N, n, device=device)
    done_buf = torch.zeros(T, N, dtype=torch.bool, device=device)
    alive_buf = torch.zeros(T, N, dtype=torch.bool, device=device)

    for episode in range(run.episode + 1, args.episodes + 1):
        # ---- rollout: continue from the last episode, reset on schedule (and after a resume)
        t0 = clock(device)
        if episode == run.episode + 1 or (episode - 1) % args.reset_every == 0 or bool(done.all()):
            obs, _ = reset(env)
            done = torch.zeros(N, dtype=torch.bool, device=device)
            discounted = torch.zeros(N, n, device=device)  # running discounted return (reward scaling)
        with torch.no_grad():
            for t in range(T):
                action = policy.dist(obs).sample()
                obs_buf[t], act_buf[t], alive_buf[t] = obs, action, ~done
                obs, rew_buf[t], dones = step(env, action.clamp(-1.0, 1.0))
                done_buf[t] = dones & ~done  # terminated at this step
                disc_buf[t] = discounted = args.gamma * discounted + rew_buf[t] * alive_buf[t, :, None]
                done = done | dones
            all_obs = torch.cat([obs_buf, obs[None]])  # s_0..s_T
            logp_buf = policy.dist(all_obs[:-1]).log_prob(act_buf).sum(-1)  # of the unclamped samples, batched
            values = value_model(all_obs).squeeze(-1)  # V(s_0..s_T) in one call
            rewards = rew_buf
            if args.norm_reward:  # CleanRL's NormalizeReward: divide by the std of the discounted return (not centred);
                reward_norm.update(disc_buf[alive_buf].flatten())  # no +-10 clip: a sparse reward is tens of stds, and
                rewards = rew_buf / (reward_norm.var + 1e-8).sqrt()  # clipping would make 1 and 1/2 (dispersion) equal
            advantages, returns = gae(rewards, values[:-1], values[-1], done_buf.unsqueeze(-1), args.gamma, args.lam)

        # ---- PPO update over (step, environment) samples; the steps after a termination are masked out
        t1 = clock(device)
        b_obs, b_act, b_logp = all_obs[:-1].flatten(0, 1), act_buf.flatten(0, 1), logp_buf.flatten(0, 1)
        b_adv, b_ret, b_val = advantages.flatten(0, 1), returns.flatten(0, 1), values[:-1].flatten(0, 1)
        b_mask = alive_buf.flatten(0, 1).float().unsqueeze(-1).expand(-1, n)
        stats = torch.zeros(5, device=device)  # policy loss, value loss, approx kl, clip fraction, grad norm
        n_updates = 0
        for epoch in range(args.update_epochs):
            for idx in minibatches(T * N, args.minibatch_size, device):
                m = b_mask[idx]
                count = m.sum().clamp(min=1.0)
                masked_mean = lambda x: (x * m).sum() / count  # noqa: E731
                dist = policy.dist(b_obs[idx])
                logratio = dist.log_prob(b_act[idx]).sum(-1) - b_logp[idx]
                ratio = logratio.exp()
                adv = b_adv[idx] - masked_mean(b_adv[idx])  # normalised per minibatch, as CleanRL
                adv = adv / (masked_mean(adv ** 2).sqrt() + 1e-8)
                surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef))
                pg_loss = masked_mean(surrogate)  # the clipped surrogate objective, negated
                v = value_model(b_obs[idx]).squeeze(-1)
                v_clipped = b_val[idx] + (v - b_val[idx]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * masked_mean(torch.max((v - b_ret[idx]) ** 2, (v_clipped - b_ret[idx]) ** 2))
                entropy = masked_mean(dist.entropy().sum(-1))
                loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if run.guard.finite(loss, grad_norm):  # a non-finite update is skipped (and counted)
                    optimizer.step()
                with torch.no_grad():
                    approx_kl = masked_mean((ratio - 1) - logratio)  # http://joschu.net/blog/kl-approx.html
                    clipfrac = masked_mean(((ratio - 1.0).abs() > args.clip_coef).float())
                    stats += torch.stack([pg_loss, v_loss, approx_kl, clipfrac, grad_norm]).detach()
                n_updates += 1

        # ---- log: one row per episode (the only host synchronisation of the episode besides the update guard)
        t2 = clock(device)
        train_return = (rew_buf.sum(-1) * alive_buf).sum(0)[alive_buf[0]].mean().item()  # envs alive at the start
        stats = (stats / n_updates).tolist()
        run.log_train(episode, dict(train_return=train_return, policy_loss=stats[0], value_loss=stats[1],
                                    approx_kl=stats[2], clipfrac=stats[3], grad_norm=stats[4],
                                    std=policy.log_std.exp().mean().item(), lr=optimizer.param_groups[0]["lr"],
                                    rollout_time=t1 - t0, update_time=t2 - t1))
        run.check_finite(episode)  # ends the run after too many non-finite updates in a row

        # ---- evaluation, checkpoints and early stopping (paper section 4)
        if episode % args.eval_every == 0 or episode == args.episodes:
            metrics, frames = evaluate(policy.mean, eval_env, args.eval_steps, args.stop_return,
                                       render=args.capture_video)
            run.log_eval(episode, metrics | dict(eval_time=clock(device) - t2), frames)
            if metrics["solved_fraction"] >= args.stop_fraction:  # early stop (paper section 4): most envs solved
                print(f"early stop at episode {episode}: {metrics['solved_fraction']:.0%} of evaluation environments "
                      f"reached {args.stop_return:.0%} of max_return")
                break
        if run.stop_signal:
            break
    run.finish(episode)
