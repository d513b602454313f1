# SHAC++ (Bertolotti et al., ECAI 2025; https://github.com/f14-bertolotti/shacpp), CleanRL-style single file.
# Reader's map, the paper's Algorithm 1 -> this file (docs/shacpp.md explains every argument and logged column):
#   lines 1-4    networks pi, V, R, F and optimisers   -> __main__, "policy = ..."; WorldModel, RewardModel
#   line 6       rollout s, a, r ~ E(pi)               -> __main__, "# ---- rollout" (SHAC+: a differentiable one)
#   lines 7-9    s^ = F(s_0, a), r^ = R(s^), v^ = V(s^) -> imagine()
#   line 10      policy step on L'_pi (section 3)      -> policy_step(): loss, gradient clipping, optimizer.step()
#   lines 11-13  value, reward, world model steps      -> fit() on each BinnedCache, every K episodes (cool-down)
#   early stop   90% of eval envs at 90% of best       -> __main__, "# ---- evaluation"
import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro
import vmas
from vmas.simulator.utils import LINE_MIN_DIST
from vmas.scenarios.dispersion import Scenario as VmasDispersion
from vmas.scenarios.sampling import Scenario as VmasSampling

from bookkeeping import NonFiniteGuard, Run, clock, load_checkpoint, render_frame, report_evaluation, resume_args

ALGORITHM = os.path.basename(__file__)[: -len(".py")]  # ppo, shac or shacpp: names runs and checkpoints


@dataclass
class Args:
    exp_name: str = ALGORITHM
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the simulator"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, run everything (simulator included) on CUDA when it is available"""
    scenario: Literal["dispersion", "transport", "discovery", "sampling"] = "dispersion"
    """the VMAS scenario (docs/scenarios.md)"""
    n_agents: int = 1
    """number of agents"""
    arch: Literal["mlp", "transformer"] = "mlp"
    """architecture of the policy, value and reward networks (the world model is the transformer of section 3)"""
    episodes: int = 20000
    """number of training episodes (one episode = one rollout of num_steps in num_envs, then the updates)"""
    num_envs: int = 512
    """number of parallel training environments"""
    num_steps: int = 32
    """steps per rollout (the horizon h of the paper)"""
    reset_every: int = 10
    """reset all training environments every this many episodes"""
    eval_every: int = 100
    """evaluate every this many episodes (and at the end)"""
    eval_envs: int = 512
    """number of evaluation environments"""
    eval_steps: int = 512
    """steps per evaluation rollout"""
    stop_fraction: float = 0.9
    """early stop when this fraction of evaluation environments ..."""
    stop_return: float = 0.9
    """... reaches this fraction of its max_return"""
    save_model: bool = False
    """save the final networks to runs/<run_name>/final.pt"""
    capture_video: bool = False
    """at every evaluation, render evaluation environment 0 to a GIF (VMAS renderer)"""
    checkpoint: str = ""
    """resume from this checkpoint (last.pt or best.pt, or a run folder for its last.pt) with the run's own arguments
    except those given; with --episodes 0, only evaluate it"""
    run_dir: str = ""
    """the run folder (default: runs/<scenario>__<n_agents>__<arch>__<exp_name>__<seed>__<unix time>)"""

    # SHAC++ (paper section 3; docs/shacpp.md)
    dynamics: Literal["model", "simulator"] = "model"
    """model: SHAC++, gradients through the learned world model; simulator: SHAC+ (the paper's ablation, Table 1),
    gradients through VMAS's differentiable physics and only the reward learned (no world model)"""
    learning_rate: float = 1e-3
    """Adam learning rate of every network"""
    gamma: float = 0.99
    """discount factor"""
    lam: float = 0.95
    """lambda of the TD(lambda) value targets"""
    alpha: float = 1.0
    """weight of the action-bound penalty (the paper's alpha)"""
    penalty: Literal["mean", "sample", "authors", "mean-unclamped"] = "mean"
    """mean: the penalty on the policy mean, averaged over all components, and the clamped sample into the models
    (transport takes off with it; docs/shacpp.md); sample: the paper's equation (section 3), the penalty on the
    sampled actions, which the models receive unclamped (it pins |mu| near 0 at sigma 1); authors: as mean, averaged
    over the violating components only, each bound apart (the authors' code); mean-unclamped: the penalty on the mean,
    the unclamped sample into the models (an experiment; docs/investigation.md)"""
    credit: Literal["team", "own"] = "team"
    """team: the paper's loss, every agent's action differentiated through the whole team's imagined return; own: each
    agent's imagined return differentiated through its own actions only (not in the paper; docs/investigation.md)"""
    policy_std: float = 1.0
    """fixed standard deviation of the Gaussian policy"""
    max_grad_norm: float = 1.0
    """gradient norm clip of the policy step"""
    world_every: int = 10
    """train the world model every this many episodes (the paper's cool-down)"""
    reward_every: int = 10
    """train the reward model every this many episodes"""
    value_every: int = 10
    """train the value model every this many episodes"""
    model_epochs: int = 10
    """epochs over its cache each time a model trains"""
    model_minibatch: int = 1000
    """minibatch size of the world, reward and value training"""
    world_cache: int = 30000
    """capacity of the world cache (whole rollouts)"""
    world_bins: int = 25
    """bins of the world cache (key: team return of the rollout)"""
    reward_cache: int = 30000
    """capacity of the reward cache (transitions)"""
    reward_bins: int = 9
    """bins of the reward cache (key: team reward)"""
    value_cache: int = 30000
    """capacity of the value cache (states and targets)"""
    value_bins: int = 9
    """bins of the value cache (key: team value target)"""
    world_residual: bool = False
    """if toggled, the world model predicts s_t - s_0 and adds s_0 (the paper's model predicts s_t itself)"""
    cache_range: Literal["all-time", "recent"] = "all-time"
    """the key range the bins span: all-time, every key the cache was given (as the authors' code); recent, the
    trimmed range of the last capacity keys"""
    cache_sampling: Literal["uniform", "bins"] = "uniform"
    """uniform: every stored item equally likely (the binning then decides what is kept); bins: a filled bin uniformly,
    then one of its items (every filled bin an equal share of a batch)"""
    world_tolerance: float = 0.05
    """a predicted observation element counts as accurate within this absolute error"""
    reward_tolerance: float = 0.1
    """a predicted reward, or a predicted value against its target, counts as accurate within this absolute error"""


def parse_args() -> Args:
    """tyro.cli (a bad flag or value is reported by tyro, with its suggestions), then what it cannot check: ranges,
    and with --checkpoint the run's own arguments for every flag not given (bookkeeping.resume_args)."""
    args = tyro.cli(Args)
    if args.checkpoint:
        args = resume_args(args, sys.argv[1:])
    for name, value in asdict(args).items():  # every count, size and interval (not the seed or episodes) is >= 1
        if type(value) is int and name not in ("seed", "episodes") and value < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1, got {value}")
    for name, value in asdict(args).items():  # every float is positive or, where 0 means something, non-negative
        if type(value) is float:
            high = 1.0 if name in ("gamma", "lam", "stop_fraction", "stop_return") else math.inf
            zero = name in ("gamma", "lam", "alpha", "vf_coef", "ent_coef")
            if not (0 < value <= high or (zero and value == 0)):
                allowed = f"{'[' if zero else '('}0, {'1]' if high == 1 else 'inf)'}"
                sys.exit(f"error: --{name.replace('_', '-')} must be in {allowed}, got {value}")
    if args.episodes < 0:
        sys.exit(f"error: --episodes must be at least 0, got {args.episodes}")
    if args.episodes == 0 and not args.checkpoint:
        sys.exit("error: --episodes 0 (evaluation only) needs --checkpoint")
    return args


# ---------------------------------------------------------------- environments (paper section 4; docs/scenarios.md)
class Dispersion(VmasDispersion):
    """VMAS dispersion with the agents evenly spaced on a circle of radius 0.05 (the paper's change:
    stock VMAS starts every agent at the origin, which gives them identical observations)."""

    def reset_world_at(self, env_index=None):
        super().reset_world_at(env_index)
        n = len(self.world.agents)
        for i, agent in enumerate(self.world.agents):
            angle = 2 * math.pi * i / n
            pos = torch.tensor([0.05 * math.cos(angle), 0.05 * math.sin(angle)], device=self.world.device)
            agent.set_pos(pos, batch_index=env_index)


class Sampling(VmasSampling):
    """VMAS sampling, with the normalisation of a full reset (the largest density of the Gaussian mixture on the
    grid) computed at once instead of in a Python loop over the grid's 1,600 points: about 2.5 s per reset less."""

    def nomrlize_pdf(self, env_index=None):  # VMAS's name
        if env_index is not None:  # one environment: VMAS already does it at once
            return super().nomrlize_pdf(env_index)
        x = torch.arange(-self.xdim, self.xdim, self.grid_spacing, device=self.world.device)
        y = torch.arange(-self.ydim, self.ydim, self.grid_spacing, device=self.world.device)
        x, y = x.clamp(-self.world.x_semidim, self.world.x_semidim), y.clamp(-self.world.y_semidim, self.world.y_semidim)
        grid = torch.stack(torch.meshgrid(x, y, indexing="ij"), -1).reshape(-1, 1, 2)  # (points, 1, 2), as VMAS clamps
        density = sum(gaussian.log_prob(grid).exp() for gaussian in self.gaussians)  # (points, envs)
        self.max_pdf = torch.maximum(self.max_pdf, density.amax(0))


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


def max_return(env) -> torch.Tensor:
    """Best team return of each environment (or an upper bound on it), right after a reset (docs/scenarios.md)."""
    s, n = env.scenario, env.n_agents
    if env.scenario_name == "dispersion":  # each food pays 1 in total, shared among the agents on it
        return torch.full((env.num_envs,), float(n), device=env.device)
    if env.scenario_name == "transport":  # 100 x progress to every agent, paid until the package first overlaps the
        # goal: at best from d0 down to goal radius + package half-width + VMAS's LINE_MIN_DIST (a face-on push)
        gap = torch.linalg.vector_norm(s.packages[0].state.pos - s.packages[0].goal.state.pos, dim=-1)
        reach = s.packages[0].goal.shape.radius + s.package_width / 2 + LINE_MIN_DIST
        return s.shaping_factor * n * (gap - reach).clamp(min=0)
    if env.scenario_name == "discovery":  # a covered target pays 1 to every agent in range (all n at best), once
        return torch.full((env.num_envs,), float(s.n_targets * n), device=env.device)
    # sampling: a cell pays the normalised density where it is first visited, to every agent (shared reward).
    # Upper bound on a cell's best density: the largest, over 4 x 4 sub-cells, of the sum over the (isotropic)
    # Gaussians of each one's maximum on the sub-cell, at the sub-cell point nearest its mean (docs/scenarios.md)
    sub, h = 4, s.grid_spacing
    factors = []  # per axis: each Gaussian's largest factor exp(-d^2 / 2 var) on each sub-cell, (envs, sub-cells, G)
    for k, (d, b) in enumerate(((s.xdim, s.world.x_semidim), (s.ydim, s.world.y_semidim))):  # VMAS clamps to b
        low = torch.arange(-d, d, h / sub, device=env.device)
        mean = torch.stack([g.loc[:, k:k + 1] for g in s.gaussians], -1)  # (envs, 1, G)
        var = torch.stack([g.covariance_matrix[:, k:k + 1, k] for g in s.gaussians], -1)
        nearest = mean.clamp(low.clamp(-b, b)[:, None], (low + h / sub).clamp(-b, b)[:, None])
        factors.append(torch.exp(-(mean - nearest) ** 2 / (2 * var)) / (2 * math.pi * var).sqrt())
    peak = factors[0] @ factors[1].transpose(1, 2)  # (envs, x sub-cells, y sub-cells): sum over the Gaussians
    return n * peak.unflatten(1, (-1, sub)).unflatten(3, (-1, sub)).amax((2, 4)).sum((1, 2)) / s.max_pdf


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
    """Centralised MLP: all agents' inputs concatenated, one hidden layer of width 32 n with a residual block."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int):
        super().__init__()
        hidden = 32 * n_agents
        self.n_agents, self.out_dim = n_agents, out_dim
        self.inp = nn.Linear(n_agents * in_dim, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_agents * out_dim)

    def forward(self, x):  # (..., agents, in_dim) -> (..., agents, out_dim)
        h = torch.relu(self.inp(x.flatten(-2)))
        return self.out(h + self.block(h)).unflatten(-1, (self.n_agents, self.out_dim))


class Transformer(nn.Module):
    """One encoder layer over the agents as tokens, full attention, no position embedding (permutation equivariant)."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, d_model: int = 64, ff: int = 128):
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        self.encoder = nn.TransformerEncoderLayer(d_model, 1, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, out_dim)

    def forward(self, x):  # (..., agents, in_dim) -> (..., agents, out_dim)
        h = self.encoder(self.embed(x.flatten(0, -3)))
        return self.head(h).unflatten(0, x.shape[:-2])


def make_network(arch: str, n_agents: int, in_dim: int, out_dim: int) -> nn.Module:
    return (MLP if arch == "mlp" else Transformer)(n_agents, in_dim, out_dim)


@torch.no_grad()
def evaluate(policy_mean, env, steps: int, stop_return: float, record: bool = False, render: bool = False):
    """Deterministic rollout (the policy mean, clamped) in freshly reset environments (docs/usage.md).
    Returns the metrics and a dict with, if `record`, the trajectory (time first) for the model accuracies of
    SHAC++ and, if `render`, the frames of environment 0."""
    obs, best = reset(env)
    team_return = torch.zeros(env.num_envs, device=env.device)
    done = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    trajectory = dict(obs=[obs], actions=[], rewards=[], alive=[])
    frames = [render_frame(env)] if render else []
    for _ in range(steps):
        action = policy_mean(obs).clamp(-1.0, 1.0)
        obs, rewards, dones = step(env, action)
        team_return += rewards.sum(-1) * ~done  # nothing counts after an environment terminated
        if record:
            for k, v in zip(trajectory, (obs, action, rewards, ~done)):
                trajectory[k].append(v)
        if render:
            frames.append(render_frame(env))
        done |= dones
    metrics = dict(
        eval_return=team_return.mean().item(), max_return=best.mean().item(),
        normalized_return=(team_return.mean() / best.mean()).item(),
        solved_fraction=(team_return >= stop_return * best).float().mean().item(),
    )
    extras = {k: torch.stack(v) for k, v in trajectory.items()} if record else {}
    return metrics, extras | ({"frames": frames} if render else {})


def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


# ---------------------------------------------------------------- SHAC++ (paper section 3)
class WorldModel(nn.Module):
    """Non-recursive action world model F(s_0, a_0..a_{T-1}) -> s_1..s_T, in one forward pass (paper section 3).
    One token per (step, agent): step 0 holds the embedded s_0, step t >= 1 the embedded a_{t-1}.
    residual: predict s_t - s_0 and add s_0, so an unchanged coordinate (a package nobody touches) is predicted
    exactly when the head outputs 0."""

    def __init__(self, n_agents: int, obs_dim: int, horizon: int, d_model: int = 64, ff: int = 128, layers: int = 3,
                 residual: bool = False):
        super().__init__()
        self.residual = residual
        self.embed_obs, self.embed_action = nn.Linear(obs_dim, d_model), nn.Linear(2, d_model)
        self.step_embedding = nn.Parameter(torch.zeros(horizon + 1, 1, d_model))
        nn.init.normal_(self.step_embedding, std=0.02)
        self.norm = nn.LayerNorm(d_model)
        layer = nn.TransformerEncoderLayer(d_model, 1, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, obs_dim)
        # token (t, i) sees its own agent's past (u, i), u <= t, and every agent at its own step (t, j):
        # never a later step. Built once; True marks a blocked pair, as nn.MultiheadAttention expects.
        step, agent = torch.arange(horizon + 1).repeat_interleave(n_agents), torch.arange(n_agents).repeat(horizon + 1)
        visible = ((step[None] <= step[:, None]) & (agent[None] == agent[:, None])) | (step[None] == step[:, None])
        self.register_buffer("mask", ~visible, persistent=False)

    def forward(self, obs0, actions):  # (B, agents, obs), (B, T, agents, 2) -> (B, T, agents, obs)
        tokens = torch.cat([self.embed_obs(obs0).unsqueeze(1), self.embed_action(actions)], 1)
        tokens = self.norm(tokens + self.step_embedding)  # (B, T + 1, agents, d)
        h = self.encoder(tokens.flatten(1, 2), mask=self.mask).unflatten(1, tokens.shape[1:3])
        return self.head(h[:, 1:]) + (obs0.unsqueeze(1) if self.residual else 0)


class RewardModel(nn.Module):
    """R(s, a, s') per agent (paper section 3): the chosen architecture over each agent's [s, a, s']."""

    def __init__(self, arch: str, n_agents: int, obs_dim: int):
        super().__init__()
        self.net = make_network(arch, n_agents, 2 * obs_dim + 2, 1)

    def forward(self, obs, action, next_obs):  # (..., agents, obs), (..., agents, 2), (..., agents, obs) -> (..., agents)
        return self.net(torch.cat([obs, action, next_obs], -1)).squeeze(-1)


class BinnedCache:
    """Replay cache split into `bins` bins over the range of its keys (paper section 3; docs/shacpp.md, item 10).
    Each bin holds the newest capacity // bins items whose key falls in it, so rare keys (a rewarding transition
    among thousands of zero-reward ones) keep a bin of their own. Every stored item sits in the bin its key maps to
    under the *current* range: bins are recomputed at every add, so items move with the range. all_time: the range
    of every key added; otherwise that of the last `capacity` keys less the `capacity // 1000 + 1` most extreme on
    each side, so one outlier cannot squeeze the other keys into one bin and old keys of a drifting target clamp into
    an end bin that new keys reach, where they are the oldest and leave first. uniform: batches uniform over the
    stored items; otherwise a filled bin uniformly, then one of its items. A non-finite key is refused."""

    def __init__(self, capacity: int, bins: int, device, all_time: bool = False, uniform: bool = False):
        self.all_time, self.uniform = all_time, uniform  # --cache-range all-time, --cache-sampling uniform
        self.bins, self.per_bin, self.device = bins, capacity // bins, device
        self.capacity, self.trim = bins * self.per_bin, capacity // 1000 + 1
        self.data = {}  # name -> (capacity, ...) tensor, allocated by the first add
        self.key = torch.zeros(self.capacity, device=device)  # key of each slot
        self.stamp = torch.full((self.capacity,), -1, dtype=torch.long, device=device)  # arrival order, -1 = empty
        self.recent = torch.full((self.capacity,), math.nan, device=device)  # ring of recent keys: the range
        self.added = 0
        self.low = self.high = torch.tensor(0.0, device=device)

    def bin_of(self, key):
        width = self.high - self.low
        if width < 1e-8:  # a collapsed range (every key equal): those keys in the middle, the rest at the ends
            middle = self.bins // 2 if self.bins > 2 else 0
            return torch.where(key < self.low, 0, torch.where(key > self.high, self.bins - 1, middle))
        return ((key - self.low) / width * self.bins).floor().clamp(0, self.bins - 1).long()

    def add(self, key, **items):
        if not bool(torch.isfinite(key).all()):
            raise ValueError("BinnedCache: refusing a non-finite key (a NaN or infinite reward or value target)")
        m = key.shape[0]
        self.recent[(self.added + torch.arange(m, device=self.device)) % self.capacity] = key  # last writes win
        if self.all_time:  # the range of every key ever added
            first = self.added == 0
            self.low = key.min() if first else torch.minimum(self.low, key.min())
            self.high = key.max() if first else torch.maximum(self.high, key.max())
        else:
            recent = self.recent[~self.recent.isnan()]
            k = min(self.trim, (recent.numel() - 1) // 2)  # ignore the k most extreme keys on each side
            self.low, self.high = -(-recent).topk(k + 1).values[-1], recent.topk(k + 1).values[-1]
        # per bin, keep the newest per_bin of the stored and the new items (a newer item has a larger stamp)
        stamp = torch.cat([self.stamp, self.added + torch.arange(m, device=self.device)])
        b = torch.cat([self.bin_of(self.key), self.bin_of(key)]).masked_fill(stamp < 0, self.bins)  # empty: no bin
        order = stamp.argsort(descending=True)
        order = order[b[order].argsort(stable=True)]  # by bin, newest first within a bin
        sorted_bins = b[order]
        rank = torch.arange(len(order), device=self.device) - torch.searchsorted(sorted_bins, sorted_bins)
        keep = torch.zeros_like(b, dtype=torch.bool)
        keep[order] = (rank < self.per_bin) & (sorted_bins < self.bins)
        self.stamp[~keep[:self.capacity]] = -1  # evicted: the oldest of an overfull bin
        new = keep[self.capacity:]
        slots = (self.stamp < 0).nonzero().squeeze(1)[:int(new.sum())]  # there is always room: kept <= capacity
        for name, value in items.items():
            if name not in self.data:
                self.data[name] = torch.zeros(self.capacity, *value.shape[1:], dtype=value.dtype, device=self.device)
            self.data[name][slots] = value[new]
        self.key[slots], self.stamp[slots] = key[new], stamp[self.capacity:][new]
        self.added += m

    def __len__(self):
        return int((self.stamp >= 0).sum())

    def sample(self, batch_size: int) -> dict:
        """Uniform over the stored items, or (not uniform) a filled bin uniformly, then one of its items."""
        stored = (self.stamp >= 0).nonzero().squeeze(1)
        if self.uniform:  # every stored item equally likely
            slot = stored[torch.randint(len(stored), (batch_size,), device=self.device)]
            return {name: value[slot] for name, value in self.data.items()}
        b = self.bin_of(self.key[stored])
        order = b.argsort()
        stored, b = stored[order], b[order]  # grouped by bin
        filled, count = b.unique_consecutive(return_counts=True)
        start = count.cumsum(0) - count
        pick = torch.randint(len(filled), (batch_size,), device=self.device)
        offset = (torch.rand(batch_size, device=self.device) * count[pick]).long().clamp(max=count[pick] - 1)
        slot = stored[start[pick] + offset]
        return {name: value[slot] for name, value in self.data.items()}


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


def policy_step(policy, optimizer, rewards, last_value, penalized, alive, terminated, args: Args,
                guard: NonFiniteGuard) -> dict:
    """One Adam step on the SHAC policy loss (paper section 2.3) plus the action-bound penalty (section 3).
    Time first: rewards (T, N, n) and last_value V(s_T) (N, n) carry the gradient to the actions; penalized
    (T, N, n, 2) the actions the penalty acts on (--penalty); alive (T, N): not terminated before step t;
    terminated (T, N): terminated at step t."""
    T, N, n = rewards.shape
    discount = args.gamma ** torch.arange(T, device=rewards.device)
    # sum_t gamma^t r_t + gamma^T V(s_T): no reward after a termination, and no bootstrap if the window terminated
    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)
    ret = ret + args.gamma ** T * last_value * ~terminated.any(0)[:, None]
    live = alive[0].float()  # environments already done at the rollout start are left out
    denominator = live.sum().clamp(min=1) * n * T  # 1 / (N n T) over live environments
    window_return = (ret.sum(-1) * live).sum() / denominator
    if args.penalty == "authors":  # the authors' code: mean over the violating components only, each side apart
        penalty = sum(((penalized[side] - bound) ** 2).mean().nan_to_num() for side, bound in
                      ((penalized < -1.0, -1.0), (penalized > 1.0, 1.0)))
    else:
        penalty = (action_penalty(penalized) * alive[..., None, None]).sum() / (denominator * 2)  # mean over components
    loss = -window_return + args.alpha * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=list(policy.parameters()))  # no gradient lands in any other network
    grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    if guard.finite(loss, grad_norm):  # a non-finite update is skipped (and counted)
        optimizer.step()
    return dict(policy_loss=loss.detach(), window_return=window_return.detach(), penalty=penalty.detach(),
                grad_norm=grad_norm)


def imagine(world_model, reward_model, value_model, obs, actions, own_credit: bool = False):
    """r^ and v^ through the learned models (Algorithm 1, lines 7-9): s^_1..s^_T = F(s_0, a_0..a_{T-1}),
    r^_t = R(s^_t, a_t, s^_{t+1}) with s^_0 = s_0, v^ = V(s^_T). obs (T+1, N, n, o), actions (T, N, n, 2).
    SHAC+ (world_model None): obs is the simulator's own differentiable trajectory, used in place of s^.
    own_credit (--credit own): one imagined copy per agent i in which only agent i's actions carry the gradient;
    agent i's r^ and v^ are taken from its own copy, so its actions get no gradient from the other agents' returns."""
    if own_credit:
        n = actions.shape[2]
        own = torch.eye(n, dtype=torch.bool, device=actions.device)[:, None, None, :, None]  # copy i, agent i
        copies = torch.where(own, actions, actions.detach()).transpose(0, 1).flatten(1, 2)  # (T, n N, n, 2)
        r_hat, v_hat = imagine(world_model, reward_model, value_model, obs.repeat(1, n, 1, 1), copies)
        r_hat, v_hat = r_hat.unflatten(1, (n, -1)), v_hat.unflatten(0, (n, -1))  # (T, copy, N, agent), (copy, N, agent)
        return r_hat.diagonal(dim1=1, dim2=3), v_hat.diagonal(dim1=0, dim2=2)  # copy i's agent i
    if world_model is not None:
        obs = torch.cat([obs[:1], world_model(obs[0], actions.transpose(0, 1)).transpose(0, 1)])
    r_hat = reward_model(obs[:-1], actions, obs[1:])  # (T, N, n)
    return r_hat, value_model(obs[-1]).squeeze(-1)


def cut_graph(env):
    """SHAC+: start a new differentiable window (as shac.py): detach the simulator's state, and transport's shaping
    term, which the scenario keeps between steps; otherwise the next backward pass runs into a freed graph."""
    env.world.zero_grad()
    for package in getattr(env.scenario, "packages", []):
        package.global_shaping = package.global_shaping.detach()


def fit(name: str, optimizer, cache: BinnedCache, loss_and_accuracy, epochs: int, minibatch: int, run: Run):
    """Train a model for `epochs` passes' worth of minibatches drawn from its cache (Algorithm 1, lines 11-13);
    returns the mean loss and accuracy over those minibatches (NaN for an empty cache, e.g. just after a resume).
    A stop signal ends it after the current minibatch."""
    totals, steps = torch.zeros(2, device=cache.device), epochs * math.ceil(len(cache) / minibatch)
    run.phase(name, f"training the {name} on {len(cache):,} cached items ({steps:,} minibatches of {minibatch}) ...")
    done = 0
    while done < steps and not run.stop_signal:
        loss, accuracy = loss_and_accuracy(cache.sample(minibatch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.guard.finite(loss):  # a non-finite update is skipped (and counted)
            optimizer.step()
        totals += torch.stack([loss.detach(), accuracy.detach()])
        done += 1
    run.phase(name, None)
    return tuple(totals / done) if done else (torch.tensor(math.nan, device=cache.device),) * 2


if __name__ == "__main__":
    args = parse_args()
    for name in ("world", "reward", "value"):  # each bin must hold at least one item
        if getattr(args, f"{name}_cache") < getattr(args, f"{name}_bins"):
            sys.exit(f"error: --{name}-cache must be at least --{name}-bins")
    shac_plus = args.dynamics == "simulator"  # SHAC+: VMAS's physics carry the gradient, only the reward is learned
    if shac_plus and args.credit == "own":
        sys.exit("error: --credit own needs the learned world model (--dynamics model)")
    algorithm = "shac+" if shac_plus else ALGORITHM
    if shac_plus and args.exp_name == ALGORITHM:  # the default experiment name is the algorithm's
        args.exp_name = algorithm
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed, args.torch_deterministic)
    env = make_env(args.scenario, args.n_agents, args.num_envs, device, args.seed, grad_enabled=shac_plus)
    eval_env = make_env(args.scenario, args.n_agents, args.eval_envs, device, args.seed + 1)
    obs_dim = env.observation_space[0].shape[0]
    n, T, N = args.n_agents, args.num_steps, args.num_envs

    policy = make_network(args.arch, n, obs_dim, 2).to(device)  # Gaussian mean (no tanh: the penalty bounds it)
    value_model = make_network(args.arch, n, obs_dim, 1).to(device)  # V(s) per agent
    reward_model = RewardModel(args.arch, n, obs_dim).to(device)  # R(s, a, s') per agent
    policy_opt, value_opt, reward_opt = (torch.optim.Adam(m.parameters(), lr=args.learning_rate, fused=True)
                                         for m in (policy, value_model, reward_model))
    cache_options = (args.cache_range == "all-time", args.cache_sampling == "uniform")
    reward_cache = BinnedCache(args.reward_cache, args.reward_bins, device, *cache_options)
    value_cache = BinnedCache(args.value_cache, args.value_bins, device, *cache_options)
    modules = dict(policy=policy, value_model=value_model, reward_model=reward_model,
                   policy_opt=policy_opt, value_opt=value_opt, reward_opt=reward_opt)
    world_model = None  # SHAC+ has none
    if not shac_plus:
        world_model = WorldModel(n, obs_dim, T, residual=args.world_residual).to(device)  # F(s_0, a_0..a_{T-1})
        world_opt = torch.optim.Adam(world_model.parameters(), lr=args.learning_rate, fused=True)
        world_cache = BinnedCache(args.world_cache, args.world_bins, device, *cache_options)
        modules |= dict(world_model=world_model, world_opt=world_opt)
    checkpoint = load_checkpoint(args.checkpoint, args, modules, algorithm) if args.checkpoint else None
    if args.episodes == 0:  # evaluation only (and a GIF with --capture-video)
        metrics, extras = evaluate(policy, eval_env, args.eval_steps, args.stop_return, render=args.capture_video)
        report_evaluation(args.checkpoint, metrics, extras.get("frames"))
        sys.exit(0)
    run = Run(args, modules, checkpoint, algorithm, __file__)  # the caches are not saved: a resumed run refills them
    print(f"run {run.dir} on {device}: obs {obs_dim} per agent, {N} envs x {T} steps, from episode {run.episode + 1}")

    def world_loss(batch):  # L_F: MSE of the predicted s_1..s_T (paper section 3)
        error = world_model(batch["obs"][:, 0], batch["actions"]) - batch["obs"][:, 1:]
        return (error ** 2).mean(), (error.abs() <= args.world_tolerance).float().mean()

    def reward_loss(batch):  # L_R: MSE of R(s, a, s') against the simulator's reward
        error = reward_model(batch["obs"], batch["actions"], batch["next_obs"]) - batch["rewards"]
        return (error ** 2).mean(), (error.abs() <= args.reward_tolerance).float().mean()

    def value_loss(batch):  # L_V: MSE of V(s) against the TD(lambda) targets
        error = value_model(batch["obs"]).squeeze(-1) - batch["targets"]
        return (error ** 2).mean(), (error.abs() <= args.reward_tolerance).float().mean()

    @torch.no_grad()
    def model_accuracy(traj) -> dict:
        """World and reward accuracy on an evaluation rollout, cut into windows of T steps;
        NaN world accuracy for SHAC+, which has no world model."""
        hits = torch.zeros(2, device=device)
        total = torch.zeros(2, device=device)
        for k in range(0, traj["actions"].shape[0] - T + 1, T):
            obs, actions, alive = traj["obs"][k:k + T + 1], traj["actions"][k:k + T], traj["alive"][k:k + T]
            weight = alive[..., None].float()
            r_hat = reward_model(obs[:-1], actions, obs[1:])
            hits[1] += (((r_hat - traj["rewards"][k:k + T]).abs() <= args.reward_tolerance) * weight).sum()
            if world_model is not None:
                s_hat = world_model(obs[0], actions.transpose(0, 1)).transpose(0, 1)
                hits[0] += (((s_hat - obs[1:]).abs() <= args.world_tolerance) * weight[..., None]).sum()
            total += torch.stack([weight.sum() * n * obs_dim, weight.sum() * n])
        world_accuracy, reward_accuracy = (hits / total.clamp(min=1)).tolist()
        return dict(world_accuracy=world_accuracy if world_model is not None else math.nan,
                    reward_accuracy=reward_accuracy)

    # rollout storage, time first, preallocated
    obs_buf = torch.zeros(T + 1, N, n, obs_dim, device=device)
    rew_buf = torch.zeros(T, N, n, device=device)
    term_buf = torch.zeros(T, N, dtype=torch.bool, device=device)
    alive_buf = torch.zeros(T, N, dtype=torch.bool, device=device)
    nan = torch.tensor(math.nan, device=device)

    for episode in range(run.episode + 1, args.episodes + 1):
        # ---- rollout in the non-differentiable simulator (Algorithm 1, line 6); actions keep the policy's graph.
        # SHAC+ steps a differentiable simulator instead, whose observations carry the actions' gradient.
        times = dict(rollout_time=clock(device))
        if episode == run.episode + 1 or (episode - 1) % args.reset_every == 0 or bool(done.all()):
            obs, _ = reset(env)
            done = torch.zeros(N, dtype=torch.bool, device=device)
        if shac_plus:  # a new window: cut the simulator's graph (shac.py does the same)
            cut_graph(env)
            obs = obs.detach()
        states, samples, means = [obs], [], []
        for t in range(T):
            mean = policy(obs)
            sample = mean + args.policy_std * torch.randn_like(mean)  # reparameterised sample
            obs_buf[t], alive_buf[t] = obs.detach(), ~done
            # the simulator's bounds (for SHAC+ a clamped component passes no gradient, as in shac.py)
            obs, rewards, dones = step(env, (sample if shac_plus else sample.detach()).clamp(-1.0, 1.0))
            rew_buf[t] = rewards.detach()
            term_buf[t] = dones & ~done  # terminated at this step
            done = done | dones
            states.append(obs)
            samples.append(sample)
            means.append(mean)
        obs_buf[T] = obs.detach()
        samples, means = torch.stack(samples), torch.stack(means)
        executed = samples.detach().clamp(-1.0, 1.0)  # what the simulator received: the models learn from these
        # what the models receive and what the penalty acts on (--penalty): the paper's section 3 is "sample"
        actions, penalized = {"sample": (samples, samples), "mean": (samples.clamp(-1.0, 1.0), means),
                              "authors": (samples.clamp(-1.0, 1.0), means),
                              "mean-unclamped": (samples, means)}[args.penalty]

        # ---- binned caches (paper section 3): rollouts and transitions of live environments; value targets from real data
        with torch.no_grad():
            values = value_model(obs_buf).squeeze(-1)  # V on the real observations s_0..s_T
            targets = lambda_returns(rew_buf, values[1:], term_buf[..., None], args.gamma, args.lam)
            live = alive_buf[0]
            team_rewards = rew_buf.sum(-1) * alive_buf  # (T, N)
            if not shac_plus:
                world_cache.add(team_rewards.sum(0)[live], obs=obs_buf.transpose(0, 1)[live],
                                actions=executed.transpose(0, 1)[live])
            alive = alive_buf
            reward_cache.add(team_rewards[alive], obs=obs_buf[:-1][alive], actions=executed[alive],
                             next_obs=obs_buf[1:][alive], rewards=rew_buf[alive])
            value_cache.add(targets.sum(-1)[alive], obs=obs_buf[:-1][alive], targets=targets[alive])

        # ---- policy step through the learned models (Algorithm 1, lines 7-10); SHAC+ through the simulator's states
        times["policy_time"] = clock(device)
        r_hat, v_hat = imagine(world_model, reward_model, value_model, torch.stack(states), actions,
                               own_credit=args.credit == "own")
        stats = policy_step(policy, policy_opt, r_hat, v_hat, penalized, alive_buf, term_buf, args, run.guard)
        stats["mean_abs"] = means.detach().abs().mean()  # |mu|: the penalty keeps it near [-1, 1]

        # ---- cool-down: the value, reward and world models train every K episodes (Algorithm 1, lines 11-13)
        stats |= dict(value_loss=nan, value_accuracy=nan, reward_loss=nan, reward_accuracy=nan, world_loss=nan,
                      world_accuracy=nan)
        for name, every, opt, cache, loss_fn in (
                ("value", args.value_every, value_opt, value_cache, value_loss),
                ("reward", args.reward_every, reward_opt, reward_cache, reward_loss),
                *(() if shac_plus else [("world", args.world_every, world_opt, world_cache, world_loss)])):
            times[f"{name}_time"] = clock(device)
            if episode % every == 0:
                stats[f"{name}_loss"], stats[f"{name}_accuracy"] = fit(
                    f"{name} model", opt, cache, loss_fn, args.model_epochs, args.model_minibatch, run)
        times["end"] = clock(device)  # each phase's duration: the next phase's start minus its own
        durations = dict(zip(list(times)[:-1], np.diff(list(times.values())).tolist()))

        # ---- log: one row per episode (the only host synchronisation of the episode besides the update guard)
        train_return = team_rewards.sum(0)[live].mean().item()  # over the environments alive at the rollout start
        row = dict(zip(stats, torch.stack(list(stats.values())).tolist()))
        run.log_train(episode, dict(train_return=train_return, **row, **durations))

        # ---- evaluation, checkpoints and early stopping (paper section 4)
        if episode % args.eval_every == 0 or episode == args.episodes:
            metrics, extras = evaluate(policy, eval_env, args.eval_steps, args.stop_return, record=True,
                                       render=args.capture_video)
            metrics |= model_accuracy(extras) | dict(eval_time=clock(device) - times["end"])
            run.log_eval(episode, metrics, extras.get("frames"))
            if metrics["solved_fraction"] >= args.stop_fraction:  # early stop (paper section 4): most envs solved
                print(f"early stop at episode {episode}: {metrics['solved_fraction']:.0%} of evaluation environments "
                      f"reached {args.stop_return:.0%} of max_return")
                break
        if run.stop_signal:
            break
    run.finish(episode)
