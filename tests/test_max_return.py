"""max_return (the training scripts' normaliser) is the best team return, or for sampling an upper bound on it:
scripted best cases with teleported agents earn it (transport: to 0.01%, discovery and dispersion: exactly;
sampling: every cell's best, 0.987-1.0 of the bound), and neither they nor random policies ever earn more."""
import math
import os

import pytest
import torch
from vmas.scenarios.transport import HeuristicPolicy as TransportHeuristic
from vmas.simulator.utils import LINE_MIN_DIST

import reference
import shacpp
from ppo import make_env, reset, step  # identical in the three training scripts
from scenarios import max_return
from test_smoke import run_script

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root

ENVS = 4


def team_step(env, positions=None):
    """Teleport entities (list of (entity, (envs, 2) positions)) with zero velocity, step with zero actions;
    the team reward (envs,) and dones."""
    for entity, pos in positions or []:
        entity.set_pos(pos, batch_index=None)
        entity.set_vel(torch.zeros_like(pos), batch_index=None)
    _, rewards, dones = step(env, torch.zeros(env.num_envs, env.n_agents, 2))
    return rewards.sum(-1), dones


# ---------------------------------------------------------------- discovery
def cover(targets, i, n, covering_range, semidim):
    """Positions (n, 2) for n agents, all in the covering range of target i, touching no target nor each other, inside
    the arena, and out of range of every other target (targets: (k, 2), covered ones far away), or else also in range
    of its neighbours, which are then covered together and pay every agent too. Greedy: the free grid point nearest
    to target i, then the next one, and so on. None if neither works."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(-0.25, 0.2501, 0.005)] * 2, indexing="ij"), -1).reshape(-1, 2)
    points = (targets[i] + grid).clamp(-semidim, semidim)
    dist = torch.cdist(points, targets)  # (points, k)
    near = (targets - targets[i]).norm(dim=-1) < 2 * covering_range
    for together in (torch.arange(len(targets)) == i, near):  # cover target i alone, or with its neighbours
        free = (dist[:, together] < covering_range - 0.01).all(-1) & (dist > 0.102).all(-1)  # radii are 0.05
        free &= (dist[:, ~together] > covering_range + 0.01).all(-1)
        candidates, placed = points[free][dist[free, i].argsort()], []
        while len(placed) < n and len(candidates):
            placed.append(candidates[0])
            candidates = candidates[(candidates - candidates[0]).norm(dim=-1) > 0.102]
        if len(placed) == n:
            return torch.stack(placed)
    return None


@pytest.mark.parametrize("n_agents", [1, 3, 5])
def test_discovery_all_agents_on_every_target(n_agents):
    env = make_env("discovery", n_agents, 8, "cpu", seed=0)
    _, best = reset(env)
    s = env.scenario
    team = torch.zeros(env.num_envs)
    done = torch.zeros(env.num_envs, dtype=torch.bool)
    for i in range(s.n_targets):
        targets = torch.stack([t.state.pos for t in s._targets], 1)  # covered targets are moved far outside
        pos = torch.stack([a.state.pos for a in env.agents], 1)  # (envs, agents, 2)
        for e in range(env.num_envs):
            if targets[e, i].abs().max() < 2:  # else already covered (and paid) together with an earlier one
                placed = cover(targets[e], i, n_agents, s._covering_range, s.world.x_semidim)
                assert placed is not None, (e, i)
                pos[e] = placed
        reward, dones = team_step(env, list(zip(env.agents, pos.unbind(1))))
        team += reward * ~done
        done |= dones
    assert done.all()
    torch.testing.assert_close(team, best)  # every target paid all n agents: normalised return 1.0
    torch.testing.assert_close(best, torch.full((env.num_envs,), 7.0 * n_agents))


# ---------------------------------------------------------------- transport
def push(env, direction, d0: float, stops):
    """Put the goal at the origin and the package at distance d0 along `direction` (unit, 2), rotation 0, agents out of
    the way; then teleport the package towards the goal through the distances `stops`, one step each. Returns
    max_return after the placement, the team return, and the dones after the last step."""
    s = env.scenario
    package, goal = s.packages[0], s.packages[0].goal
    goal.set_pos(torch.zeros(env.num_envs, 2), batch_index=None)
    package.set_rot(torch.zeros(env.num_envs, 1), batch_index=None)
    corner = [(torch.tensor([-0.9 + 0.1 * k, 0.9]) if direction[1] <= 0 else torch.tensor([-0.9 + 0.1 * k, -0.9]))
              for k in range(env.n_agents)]
    for agent, pos in zip(env.agents, corner):  # far from the package's path
        agent.set_pos(pos.expand(env.num_envs, 2), batch_index=None)
    package.set_pos((-d0 * direction).expand(env.num_envs, 2), batch_index=None)
    package.global_shaping = s.shaping_factor * torch.linalg.vector_norm(package.state.pos - goal.state.pos, dim=-1)
    best = max_return(env)  # recomputed for the moved goal
    team, done = torch.zeros(env.num_envs), torch.zeros(env.num_envs, dtype=torch.bool)
    for d in stops:
        reward, dones = team_step(env, [(package, (-d * direction).expand(env.num_envs, 2))])
        team += reward * ~done
        done |= dones
    return best, team, done


@pytest.mark.parametrize("n_agents", [1, 3])
def test_transport_face_on_push_earns_max_return(n_agents):
    env = make_env("transport", n_agents, ENVS, "cpu", seed=0)
    reset(env)
    s = env.scenario
    c = s.packages[0].goal.shape.radius + s.package_width / 2 + LINE_MIN_DIST
    d0 = 0.9
    stops = [*torch.arange(d0 - 0.01, c, -0.01).tolist(), c + 1e-4, c - 1e-3, c - 0.05]  # then it overlaps
    best, team, done = push(env, torch.tensor([-1.0, 0.0]), d0, stops)
    torch.testing.assert_close(best, torch.full((ENVS,), 100 * n_agents * (d0 - c)))
    assert done.all()
    assert (team <= best).all() and (team >= 0.999 * best).all(), (team, best)


@pytest.mark.parametrize("n_agents", [1, 3])
def test_transport_corner_on_push_earns_less(n_agents):
    """The package's corner leads: it overlaps the goal earlier, so the same push pays less than max_return."""
    env = make_env("transport", n_agents, ENVS, "cpu", seed=0)
    reset(env)
    d0 = 0.9
    stops = torch.arange(d0 - 0.01, 0.1, -0.01).tolist()
    best, team, done = push(env, torch.tensor([-1.0, -1.0]) / math.sqrt(2), d0, stops)
    assert done.all()
    s = env.scenario
    corner = s.packages[0].goal.shape.radius + s.package_width / math.sqrt(2) + LINE_MIN_DIST  # overlap distance
    assert (team <= 100 * n_agents * (d0 - corner) + 1e-3).all()
    assert (team < 0.97 * best).all() and (team > 0.9 * best).all(), (team, best)


# ---------------------------------------------------------------- sampling
def best_points(env, per_side: int = 11):
    """For every grid cell, the point of its reachable part (VMAS keeps agents within the arena less their radius)
    where the Gaussian mixture is highest, searched on a per_side x per_side grid of interior points: (cells, envs, 2),
    cells in row-major order."""
    s = env.scenario
    semidim = s.world.x_semidim
    lows = torch.arange(-s.xdim, s.xdim - 1e-6, s.grid_spacing)
    lo = torch.cartesian_prod(lows, lows)  # (cells, 2)
    hi = (lo + s.grid_spacing).clamp(max=semidim)
    lo = lo.clamp(min=-semidim)
    u = torch.linspace(1e-4, 1 - 1e-4, per_side)
    frac = torch.cartesian_prod(u, u)  # (points, 2)
    points = lo[:, None] + frac[None] * (hi - lo)[:, None]  # (cells, points, 2)
    density = sum(g.log_prob(points[:, :, None]).exp() for g in s.gaussians)  # (cells, points, envs)
    best = density.argmax(1)  # (cells, envs)
    return points[torch.arange(len(points))[:, None], best]  # (cells, envs, 2)


def test_sampling_best_point_of_every_cell_reaches_the_bound():
    """Agents teleported to the best point of every cell in turn (each cell once: only the first visit pays) earn
    the mixture's best of every cell, and that never exceeds max_return: max_return takes, per cell, the largest over
    4 x 4 sub-cells of the sum of each Gaussian's own maximum on the sub-cell, which bounds the mixture's maximum from
    above. Over 256 environments the best route earns 0.995 of it on average, 0.990 at the 5th percentile, 0.987 at
    worst (summing over whole cells instead gave 0.980 on average, 0.941 at worst)."""
    n = 3
    env = make_env("sampling", n, ENVS, "cpu", seed=0)  # VMAS resets on creation: a second full reset costs seconds
    s = env.scenario
    best = max_return(env)
    points = best_points(env)
    per_cell = sum(g.log_prob(points).exp() for g in s.gaussians) / s.max_pdf  # (cells, envs)
    s.observation = lambda agent: torch.zeros(env.num_envs, 1)  # unused here, and 80% of a step's cost
    cells = len(points)
    per_agent = math.ceil(cells / n)  # agent a visits cells a*per_agent ... : far apart from the others at every step
    team = torch.zeros(env.num_envs)
    for k in range(per_agent):
        visits = [points[min(a * per_agent + k, cells - 1)] for a in range(n)]  # a repeated cell pays 0
        reward, _ = team_step(env, list(zip(env.agents, visits)))
        team += reward
    assert s.sampled.all()
    torch.testing.assert_close(team, n * per_cell.sum(0))  # every cell paid its best, to all n agents
    assert (team <= best).all() and (team >= 0.98 * best).all(), team / best


# ---------------------------------------------------------------- dispersion
@pytest.mark.parametrize("n_agents", [1, 3, 5])
def test_dispersion_every_food_eaten_earns_n(n_agents):
    """Each agent teleported onto its own food earns n at once; crowding onto the same foods afterwards, or all agents
    eating every food together one by one, earns nothing more: each food pays 1 in total."""
    env = make_env("dispersion", n_agents, ENVS, "cpu", seed=0)
    _, best = reset(env)
    foods = [food.state.pos.clone() for food in env.world.landmarks]
    team, done = team_step(env, list(zip(env.agents, foods)))
    assert done.all()
    for food in foods:  # every agent on every (eaten) food in turn
        reward, _ = team_step(env, [(agent, food) for agent in env.agents])
        team += reward
    torch.testing.assert_close(team, best)
    torch.testing.assert_close(best, torch.full((ENVS,), float(n_agents)))

    _, best = reset(env)  # all agents together, food after food: each food's 1 is shared among them
    team = torch.zeros(ENVS)
    for food in [food.state.pos.clone() for food in env.world.landmarks]:
        reward, _ = team_step(env, [(agent, food) for agent in env.agents])
        team += reward
    torch.testing.assert_close(team, best)


# ---------------------------------------------------------------- no policy earns more
@pytest.mark.parametrize("scenario, policy", [("dispersion", "random"), ("discovery", "random"), ("sampling", "random"),
                                              ("transport", "noisy heuristic")])
def test_no_policy_exceeds_max_return(scenario, policy):
    """A uniform-random policy's return in every environment, counted as evaluate() counts it (nothing after an
    environment is done), stays at or below max_return at every step. Random agents hardly ever move transport's
    heavy package (they earn exactly 0 there), so VMAS's heuristic plus uniform noise pushes it instead, at every
    angle (it reaches 0.88 of max_return in one of these environments)."""
    env = make_env(scenario, 3, 16, "cpu", seed=1)
    obs, best = torch.stack(env.get_from_scenario(True, False, False, False)[0], 1), max_return(env)  # VMAS resets
    if scenario == "sampling":
        env.scenario.observation = lambda agent: torch.zeros(env.num_envs, 1)  # unused, and 80% of a step's cost
    heuristic = TransportHeuristic(continuous_action=True)
    generator = torch.Generator().manual_seed(0)
    team, most = torch.zeros(env.num_envs), torch.zeros(env.num_envs)
    done = torch.zeros(env.num_envs, dtype=torch.bool)
    for _ in range(250):
        action = torch.rand(env.num_envs, 3, 2, generator=generator) * 2 - 1
        if policy != "random":
            action = torch.stack([heuristic.compute_action(o, 1.0) for o in obs.unbind(1)], 1) + action
        obs, rewards, dones = step(env, action.clamp(-1, 1))
        team += rewards.sum(-1) * ~done
        most = torch.maximum(most, team)
        done |= dones
    assert most.max() > 0  # the check has something to check
    assert (most <= best + 1e-4).all(), (most / best).max()


# ---------------------------------------------------------------- reference controllers (reference.py)
@pytest.mark.parametrize("n_agents", [1, 3, 5])
def test_greedy_controller_solves_dispersion(n_agents):
    """Dispersion's max_return is reached in practice: each agent heading for its nearest uneaten food, on its own
    observation, eats every food, in every environment, through the training scripts' evaluate()."""
    env = make_env("dispersion", n_agents, 8, "cpu", seed=0)
    metrics, _ = shacpp.evaluate(reference.greedy_dispersion, env, 200, 0.9)
    assert metrics["normalized_return"] == pytest.approx(1.0) and metrics["solved_fraction"] == 1.0


def test_reference_refuses_a_policy_a_scenario_lacks(tmp_path):
    out = run_script("tools/reference.py", ["--policy", "heuristic", "--scenario", "sampling"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: there is no heuristic policy for sampling (only for transport and discovery)"]
    assert not os.path.exists(tmp_path / "runs")
    assert reference.unsupported(reference.Args(policy="greedy", scenario="transport")) == \
        "there is no greedy policy for transport (only for dispersion)"
    assert reference.unsupported(reference.Args(policy="random", scenario="sampling")) is None
