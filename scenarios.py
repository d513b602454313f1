"""The paper's versions of the VMAS scenarios (section 4), and the best return of each environment that normalises
every reported return (docs/scenarios.md). The training scripts build their environments from these in make_env."""
import math

import torch
from vmas.scenarios.dispersion import Scenario as VmasDispersion
from vmas.scenarios.sampling import Scenario as VmasSampling
from vmas.simulator.utils import LINE_MIN_DIST


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
        x, y = x.clamp(-self.world.x_semidim, self.world.x_semidim), y.clamp(-self.world.y_semidim,
                                                                             self.world.y_semidim)
        grid = torch.stack(torch.meshgrid(x, y, indexing="ij"), -1).reshape(-1, 1, 2)  # (points, 1, 2), as VMAS clamps
        density = sum(gaussian.log_prob(grid).exp() for gaussian in self.gaussians)  # (points, envs)
        self.max_pdf = torch.maximum(self.max_pdf, density.amax(0))


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
