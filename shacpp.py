# SHAC++ (Bertolotti et al., ECAI 2025; https://github.com/f14-bertolotti/shacpp), CleanRL-style single file.
# The paper's Algorithm 1 in this file (docs/shacpp.md explains every argument and logged column):
#   lines 1-4    networks pi, V, R, F and their optimisers     -> the loop's set-up: WorldModel, RewardModel
#   line 6       rollout s, a, r ~ E(pi)                       -> "# ---- rollout"
#   lines 7-9    s^ = F(s_0, a), r^ = R(s^, a), v^ = V(s^)      -> imagine()
#   line 10      policy step on L'_pi (section 3)              -> "# ---- policy step": policy_loss()
#   lines 11-13  value, reward and world model steps           -> "# ---- cool-down", each from its BinnedCache
#   early stop   90% of eval envs at 90% of their best return  -> "# ---- evaluation"
# --dynamics simulator is SHAC+, the paper's ablation: VMAS's own differentiable physics in place of the world model.
import math
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
    """architecture of the policy, value and reward networks (the world model is always a transformer)"""
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

    # the algorithm (paper sections 2.3 and 3, appendix B)
    learning_rate: float = 1e-3
    """Adam learning rate of every network"""
    gamma: float = 0.99
    """discount factor"""
    lam: float = 0.95
    """lambda of the TD(lambda) value targets"""
    alpha: float = 1.0
    """weight of the action-bound penalty"""
    policy_std: float = 1.0
    """fixed standard deviation of the Gaussian policy"""
    max_grad_norm: float = 1.0
    """gradient norm clip of the policy step"""
    model_every: int = 10
    """train the value, reward and world models every this many episodes (the cool-down)"""
    model_epochs: int = 10
    """epochs over its cache each time a model trains"""
    model_minibatch: int = 1000
    """minibatch size of the world, reward and value training"""
    world_cache: int = 30000
    """capacity of the world cache (whole rollouts)"""
    world_bins: int = 25
    """bins of the world cache (key: the rollout's team return)"""
    reward_cache: int = 30000
    """capacity of the reward cache (transitions)"""
    reward_bins: int = 9
    """bins of the reward cache (key: the team reward)"""
    value_cache: int = 30000
    """capacity of the value cache (states and their targets)"""
    value_bins: int = 9
    """bins of the value cache (key: the team's value target)"""

    # the ablation, and departures from the paper (docs/shacpp.md says why each default is what it is)
    dynamics: Literal["model", "simulator"] = "model"
    """model: SHAC++; simulator: SHAC+, gradients through VMAS's differentiable physics, no world model"""
    penalty: Literal["mean", "sample", "authors"] = "mean"
    """mean (not in the paper): on the policy mean, the models see clamped samples; sample: the paper's, on the
    samples, seen unclamped; authors: as mean, but averaged over the components outside the bounds only (a near-hard
    wall, as the authors' code)"""
    world_residual: bool = False
    """not in the paper: the world model predicts s_t - s_0 and adds s_0"""
    policy_dropout: float = 0.1
    """not in the paper (the authors' code: the same 0.1): dropout in the policy while training; off at evaluation"""

    # for bookkeeping.py: what a checkpoint must share with the run that loads it; the ranges parse_args checks
    # besides every count at least 1 and every float above 0
    STRUCTURE: ClassVar = ("scenario", "n_agents", "arch", "dynamics", "world_residual", "num_steps")
    AT_MOST_ONE: ClassVar = ("gamma", "lam", "stop_fraction", "stop_return", "policy_dropout")
    MAY_BE_ZERO: ClassVar = ("gamma", "lam", "alpha", "policy_dropout")


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


# ---------------------------------------------------------------- SHAC++ (paper section 3)
class WorldModel(nn.Module):
    """F(s_0, a_0..a_{T-1}) -> s^_1..s^_T in one forward pass, not step by step (paper section 3). One token per
    (step, agent): step 0 holds the embedded s_0, step t >= 1 the embedded a_{t-1}. Token (t, i) attends to its own
    agent's steps u <= t and to every agent at step t, never to a later step.
    residual (not in the paper): predict s_t - s_0 and add s_0."""

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
        step, agent = torch.arange(horizon + 1).repeat_interleave(n_agents), torch.arange(n_agents).repeat(horizon + 1)
        visible = ((step[None] <= step[:, None]) & (agent[None] == agent[:, None])) | (step[None] == step[:, None])
        self.register_buffer("mask", ~visible, persistent=False)  # True: blocked, as nn.MultiheadAttention expects

    def forward(self, obs0, actions):  # (B, agents, obs), (B, T, agents, 2) -> (B, T, agents, obs)
        tokens = torch.cat([self.embed_obs(obs0).unsqueeze(1), self.embed_action(actions)], 1)
        tokens = self.norm(tokens + self.step_embedding)  # (B, T + 1, agents, d)
        h = self.encoder(tokens.flatten(1, 2), mask=self.mask).unflatten(1, tokens.shape[1:3])
        return self.head(h[:, 1:]) + (obs0.unsqueeze(1) if self.residual else 0)


class RewardModel(nn.Module):
    """r^ per agent. The transformer: R(s, a), the paper's section 3 (and the authors' code), so the action reaches r^
    directly; the MLP: R(s, a, s'), as the authors' MLP."""

    def __init__(self, arch: str, n_agents: int, obs_dim: int):
        super().__init__()
        self.sa = arch == "transformer"
        self.net = make_network(arch, n_agents, (1 if self.sa else 2) * obs_dim + 2, 1, norm=True)

    def forward(self, obs, action, next_obs):  # (..., agents, obs), (..., agents, 2), (..., agents, obs)
        return self.net(torch.cat([obs, action] if self.sa else [obs, action, next_obs], -1)).squeeze(-1)


class BinnedCache:
    """Replay cache split into `bins` bins over the range of every key it has been given (paper section 3), so that
    rare keys (a rewarding transition among thousands of zero-reward ones) keep a bin of their own: each bin holds the
    newest capacity // bins items whose key falls in it under the current range, and batches are uniform over the
    stored items. A non-finite key is refused."""

    def __init__(self, capacity: int, bins: int, device):
        self.bins, self.per_bin, self.device = bins, capacity // bins, device
        self.capacity = bins * self.per_bin
        self.data = {}  # name -> (capacity, ...) tensor, allocated by the first add
        self.key = torch.zeros(self.capacity, device=device)  # key of each slot
        self.stamp = torch.full((self.capacity,), -1, dtype=torch.long, device=device)  # arrival order, -1: empty
        self.added = 0
        self.low, self.high = torch.tensor(math.inf, device=device), torch.tensor(-math.inf, device=device)  # range

    def bin_of(self, key):  # every key lies in [low, high]; while all keys are equal, all share bin 0
        width = (self.high - self.low).clamp(min=1e-8)
        return ((key - self.low) / width * self.bins).floor().clamp(0, self.bins - 1).long()

    def add(self, key, **items):
        if not bool(torch.isfinite(key).all()):
            raise ValueError("BinnedCache: refusing a non-finite key (a NaN or infinite reward or value target)")
        self.low, self.high = torch.minimum(self.low, key.min()), torch.maximum(self.high, key.max())
        # per bin, keep the newest per_bin of the stored and the new items (bins recomputed under the new range)
        stamp = torch.cat([self.stamp, self.added + torch.arange(len(key), device=self.device)])
        b = self.bin_of(torch.cat([self.key, key])).masked_fill(stamp < 0, self.bins)  # an empty slot: no bin
        order = stamp.argsort(descending=True)
        order = order[b[order].argsort(stable=True)]  # by bin, newest first within a bin
        sorted_bins = b[order]
        rank = torch.arange(len(order), device=self.device) - torch.searchsorted(sorted_bins, sorted_bins)
        keep = torch.zeros_like(b, dtype=torch.bool)
        keep[order] = (rank < self.per_bin) & (sorted_bins < self.bins)  # rank: newer items of the same bin
        self.stamp[~keep[:self.capacity]] = -1  # evicted: the oldest of an overfull bin
        new = keep[self.capacity:]
        slots = (self.stamp < 0).nonzero().squeeze(1)[:int(new.sum())]  # there is always room: kept <= capacity
        for name, value in items.items():
            if name not in self.data:
                self.data[name] = torch.zeros(self.capacity, *value.shape[1:], dtype=value.dtype, device=self.device)
            self.data[name][slots] = value[new]
        self.key[slots], self.stamp[slots] = key[new], stamp[self.capacity:][new]
        self.added += len(key)

    def __len__(self):
        return int((self.stamp >= 0).sum())

    def sample(self, batch_size: int) -> dict:
        stored = (self.stamp >= 0).nonzero().squeeze(1)
        slot = stored[torch.randint(len(stored), (batch_size,), device=self.device)]
        return {name: value[slot] for name, value in self.data.items()}


def lambda_returns(rewards, next_values, terminated, gamma: float, lam: float):
    """TD(lambda) targets (paper section 2.3) by the recursion G_t = r_t + gamma (1 - d_t) ((1 - lam) V(s_{t+1}) +
    lam G_{t+1}), G_T = V(s_T). rewards, next_values (V(s_{t+1})), terminated: (T, ...), time first."""
    targets = torch.zeros_like(rewards)
    g = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        g = rewards[t] + gamma * (~terminated[t]) * ((1 - lam) * next_values[t] + lam * g)
        targets[t] = g
    return targets


def action_penalty(mean, low: float = -1.0, high: float = 1.0):
    """d(x, [low, high]) of the paper's section 3, element-wise: the squared distance outside the bounds, 0 inside."""
    return (mean - high).clamp(min=0) ** 2 + (low - mean).clamp(min=0) ** 2


def imagine(world_model, reward_model, value_model, obs, actions):
    """Algorithm 1, lines 7-9: s^_1..s^_T = F(s_0, a_0..a_{T-1}) with s^_0 = s_0, r^_t = R(s^_t, a_t[, s^_{t+1}]),
    v^ = V(s^_T). obs (T + 1, N, n, o), actions (T, N, n, 2). SHAC+ (world_model None): obs is the simulator's own
    differentiable trajectory, used as s^."""
    if world_model is not None:
        obs = torch.cat([obs[:1], world_model(obs[0], actions.transpose(0, 1)).transpose(0, 1)])
    return reward_model(obs[:-1], actions, obs[1:]), value_model(obs[-1]).squeeze(-1)  # (T, N, n), (N, n)


def policy_loss(rewards, last_value, penalized, alive, terminated, args: Args):
    """L'_pi, the SHAC loss (paper section 2.3) plus alpha times the action-bound penalty (section 3). Time first:
    rewards (T, N, n) and last_value V(s_T) (N, n) carry the gradient to the actions; penalized (T, N, n, 2): what the
    penalty acts on (--penalty); alive (T, N): not terminated before step t; terminated (T, N): at step t."""
    T, N, n = rewards.shape
    discount = args.gamma ** torch.arange(T, device=rewards.device)
    # sum_t gamma^t r_t + gamma^T V(s_T): no reward after a termination, and no bootstrap if the window terminated
    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)
    ret = ret + args.gamma ** T * last_value * ~terminated.any(0)[:, None]
    live = alive[0].float()  # environments already done at the rollout start are left out
    denominator = live.sum().clamp(min=1) * n * T  # 1 / (N n T) over live environments
    window_return = (ret.sum(-1) * live).sum() / denominator
    if args.penalty == "authors":  # each side averaged over its violating components only, every step
        over, under = (penalized - 1.0).clamp(min=0), (-1.0 - penalized).clamp(min=0)
        penalty = (over**2).sum() / (over > 0).sum().clamp(min=1) + (under**2).sum() / (under > 0).sum().clamp(min=1)
    else:  # averaged over every component of the live steps
        penalty = (action_penalty(penalized) * alive[..., None, None]).sum() / (denominator * 2)
    loss = -window_return + args.alpha * penalty
    return loss, dict(window_return=window_return.detach(), penalty=penalty.detach())


def minibatches(cache: BinnedCache, args: Args, run: Run):
    """model_epochs passes' worth of minibatches drawn from the cache; a stop signal ends them early."""
    for _ in range(args.model_epochs * math.ceil(len(cache) / args.model_minibatch)):
        if run.stop_signal:
            return
        yield cache.sample(args.model_minibatch)


def cut_graph(env):
    """SHAC+: a new differentiable window (as in shac.py): detach the simulator's state, and transport's shaping term,
    which the scenario keeps between steps; otherwise the next backward pass runs into a freed graph."""
    env.world.zero_grad()
    for package in getattr(env.scenario, "packages", []):
        package.global_shaping = package.global_shaping.detach()


if __name__ == "__main__":
    args = parse_args(Args)
    for name in ("world", "reward", "value"):  # each bin must hold at least one item
        if getattr(args, f"{name}_cache") < getattr(args, f"{name}_bins"):
            sys.exit(f"error: --{name}-cache must be at least --{name}-bins")
    shac_plus = args.dynamics == "simulator"  # SHAC+: VMAS's physics carry the gradient, only the reward is learned
    algorithm = "shac+" if shac_plus else ALGORITHM
    args.exp_name = algorithm if args.exp_name == ALGORITHM else args.exp_name
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed)
    env = make_env(args.scenario, args.n_agents, args.num_envs, device, args.seed, grad_enabled=shac_plus)
    eval_env = make_env(args.scenario, args.n_agents, args.eval_envs, device, args.seed + 1)
    obs_dim = env.observation_space[0].shape[0]
    n, T, N = args.n_agents, args.num_steps, args.num_envs

    # Algorithm 1, lines 1-4: the policy, value, reward and world networks, and their optimisers
    # transformers with a LayerNorm after the input embedding (norm=True), as the authors' code
    policy = make_network(args.arch, n, obs_dim, 2, norm=True, dropout=args.policy_dropout).to(device)  # mean (no tanh)
    value_model = make_network(args.arch, n, obs_dim, 1, norm=True).to(device)  # V(s) per agent
    reward_model = RewardModel(args.arch, n, obs_dim).to(device)  # R per agent
    policy_opt = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)
    value_opt = torch.optim.Adam(value_model.parameters(), lr=args.learning_rate, fused=True)
    reward_opt = torch.optim.Adam(reward_model.parameters(), lr=args.learning_rate, fused=True)
    reward_cache = BinnedCache(args.reward_cache, args.reward_bins, device)
    value_cache = BinnedCache(args.value_cache, args.value_bins, device)
    modules = dict(policy=policy, value_model=value_model, reward_model=reward_model,
                   policy_opt=policy_opt, value_opt=value_opt, reward_opt=reward_opt)
    world_model = None  # SHAC+ has none
    if not shac_plus:
        world_model = WorldModel(n, obs_dim, T, residual=args.world_residual).to(device)  # F(s_0, a_0..a_{T-1})
        world_opt = torch.optim.Adam(world_model.parameters(), lr=args.learning_rate, fused=True)
        world_cache = BinnedCache(args.world_cache, args.world_bins, device)
        modules |= dict(world_model=world_model, world_opt=world_opt)
    checkpoint = load_checkpoint(args.checkpoint, args, modules, algorithm) if args.checkpoint else None
    if args.episodes == 0:  # evaluation only (and a GIF with --capture-video)
        metrics, frames = evaluate(policy.eval(), eval_env, args.eval_steps, args.stop_return, args.capture_video)
        report_evaluation(args.checkpoint, metrics, frames)
        sys.exit(0)
    run = Run(args, modules, checkpoint, algorithm, __file__)  # caches are not saved: a resumed run refills them
    print(f"run {run.dir} on {device}: obs {obs_dim} per agent, {N} envs x {T} steps, from episode {run.episode + 1}")

    obs_buf = torch.zeros(T + 1, N, n, obs_dim, device=device)  # rollout storage, time first
    rew_buf = torch.zeros(T, N, n, device=device)
    term_buf = torch.zeros(T, N, dtype=torch.bool, device=device)  # terminated at step t
    alive_buf = torch.zeros(T, N, dtype=torch.bool, device=device)  # not terminated before step t
    nan = torch.tensor(math.nan, device=device)  # a model's loss when it did not train this episode

    for episode in range(run.episode + 1, args.episodes + 1):
        # ---- rollout in the non-differentiable simulator (Algorithm 1, line 6); the actions keep the policy's graph.
        # SHAC+ steps a differentiable simulator instead, whose observations carry the actions' gradient.
        rollout_start = clock(device)
        if episode == run.episode + 1 or (episode - 1) % args.reset_every == 0 or bool(done.all()):
            obs, _ = reset(env)
            done = torch.zeros(N, dtype=torch.bool, device=device)
        if shac_plus:
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
            term_buf[t] = dones & ~done
            done = done | dones
            states.append(obs)
            samples.append(sample)
            means.append(mean)
        obs_buf[T] = obs.detach()
        samples, means = torch.stack(samples), torch.stack(means)
        executed = samples.detach().clamp(-1.0, 1.0)  # what the simulator received: the models learn from these
        if args.penalty == "sample":  # the paper's section 3: the penalty on the samples, which the models see as is
            actions, penalized = samples, samples
        else:  # on the mean; the models see the samples clamped, as the simulator did
            actions, penalized = samples.clamp(-1.0, 1.0), means

        # ---- binned caches (paper section 3) of the live environments' real data; value targets on real states
        with torch.no_grad():
            values = value_model(obs_buf).squeeze(-1)  # V(s_0)..V(s_T)
            targets = lambda_returns(rew_buf, values[1:], term_buf[..., None], args.gamma, args.lam)
            live, alive = alive_buf[0], alive_buf  # live: not done at the rollout start; alive: at step t
            team_rewards = rew_buf.sum(-1) * alive  # (T, N)
            if not shac_plus:
                world_cache.add(team_rewards.sum(0)[live], obs=obs_buf.transpose(0, 1)[live],
                                actions=executed.transpose(0, 1)[live])
            reward_cache.add(team_rewards[alive], obs=obs_buf[:-1][alive], actions=executed[alive],
                             next_obs=obs_buf[1:][alive], rewards=rew_buf[alive])
            value_cache.add(targets.sum(-1)[alive], obs=obs_buf[:-1][alive], targets=targets[alive])

        # ---- policy step through the learned models (Algorithm 1, lines 7-10); SHAC+ through the simulator's states
        policy_start = clock(device)
        r_hat, v_hat = imagine(world_model, reward_model, value_model, torch.stack(states), actions)
        loss, stats = policy_loss(r_hat, v_hat, penalized, alive_buf, term_buf, args)
        policy_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(policy.parameters()))  # no gradient lands in the models
        grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if run.guard.finite(loss, grad_norm):  # a non-finite update is skipped (and counted)
            policy_opt.step()

        # ---- cool-down: every K episodes each model trains on minibatches of its cache (Algorithm 1, lines 11-13)
        model_start = clock(device)
        value_loss = reward_loss = world_loss = nan
        if episode % args.model_every == 0:
            for batch in minibatches(value_cache, args, run):  # L_V: V(s_t) against its TD(lambda) target
                value_loss = ((value_model(batch["obs"]).squeeze(-1) - batch["targets"]) ** 2).mean()
                value_opt.zero_grad(set_to_none=True)
                value_loss.backward()
                if run.guard.finite(value_loss):
                    value_opt.step()
            for batch in minibatches(reward_cache, args, run):  # L_R: R against the simulator's reward
                reward_loss = ((reward_model(batch["obs"], batch["actions"], batch["next_obs"]) - batch["rewards"])
                               ** 2).mean()
                reward_opt.zero_grad(set_to_none=True)
                reward_loss.backward()
                if run.guard.finite(reward_loss):
                    reward_opt.step()
            for batch in (minibatches(world_cache, args, run) if not shac_plus else []):  # L_F: s^_1..s^_T against s
                world_loss = ((world_model(batch["obs"][:, 0], batch["actions"]) - batch["obs"][:, 1:]) ** 2).mean()
                world_opt.zero_grad(set_to_none=True)
                world_loss.backward()
                if run.guard.finite(world_loss):
                    world_opt.step()

        # ---- log: one row per episode (its only host synchronisation besides the update guard)
        train_return = team_rewards.sum(0)[live].mean().item()  # over the environments alive at the rollout start
        logged = dict(policy_loss=loss, grad_norm=grad_norm, mean_abs=means.abs().mean(), value_loss=value_loss,
                      reward_loss=reward_loss, world_loss=world_loss, **stats)
        row = dict(zip(logged, torch.stack([v.detach() for v in logged.values()]).tolist()))
        end = clock(device)
        run.log_train(episode, dict(train_return=train_return, **row, rollout_time=policy_start - rollout_start,
                                    policy_time=model_start - policy_start, model_time=end - model_start))
        run.check_finite(episode)  # ends the run after too many non-finite updates in a row

        # ---- evaluation, checkpoints and early stopping (paper section 4)
        if episode % args.eval_every == 0 or episode == args.episodes:
            metrics, frames = evaluate(policy.eval(), eval_env, args.eval_steps, args.stop_return,  # eval: no dropout
                                       render=args.capture_video)
            policy.train()
            run.log_eval(episode, metrics | dict(eval_time=clock(device) - end), frames)
            if metrics["solved_fraction"] >= args.stop_fraction:  # early stop: most environments solved
                print(f"early stop at episode {episode}: {metrics['solved_fraction']:.0%} of evaluation environments "
                      f"reached {args.stop_return:.0%} of max_return")
                break
        if run.stop_signal:
            break
    run.finish(episode)
