"""Tests of ppo.py's CleanRL details and actor variants: equal minibatches, the decentralised actor, the running
statistics of the reward scaling, and a tiny decentralised run. Fast (a few seconds); run:
python -m pytest -q test_ppo.py"""
import glob
import math
import os

import pytest
import torch

import ppo
from test_smoke import TINY, read_csv, run_script


@pytest.mark.parametrize("batch, minibatch, sizes", [(16384, 2000, [2048] * 8), (32, 16, [16, 16]),
                                                     (10, 3, [4, 3, 3]), (100, 500, [100])])
def test_minibatches_have_no_short_tail(batch, minibatch, sizes):
    parts = ppo.minibatches(batch, minibatch)
    assert [len(p) for p in parts] == sizes
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(batch))  # every sample exactly once


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_decentralised_actor_sees_only_its_own_observation(arch):
    torch.manual_seed(0)
    obs = torch.randn(5, 3, 7)
    changed = obs.clone()
    changed[:, 2] += 1.0  # only agent 2's observation changes
    decentralised, centralised = ppo.Policy(arch, 3, 7, "decentralised"), ppo.Policy(arch, 3, 7, "centralised")
    with torch.no_grad():
        before, after = decentralised.mean(obs), decentralised.mean(changed)
        assert before.shape == (5, 3, 2)
        torch.testing.assert_close(before[:, :2], after[:, :2], atol=0, rtol=0)  # agents 0 and 1 act as before
        assert not torch.allclose(before[:, 2], after[:, 2])
        assert not torch.allclose(centralised.mean(obs)[:, 0], centralised.mean(changed)[:, 0])
        single = torch.stack([decentralised.mean(obs[:, i:i + 1])[:, 0] for i in range(3)], 1)
        torch.testing.assert_close(before, single)  # the same network for every agent
    one, other = ppo.Policy(arch, 1, 7, "decentralised"), ppo.Policy(arch, 1, 7, "centralised")
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}


def test_running_norm_matches_torch_statistics():
    torch.manual_seed(0)
    norm = ppo.RunningNorm(5)
    shapes = ((100, 1.0, 3.0), (7, 5.0, -2.0), (900, 0.1, 0))  # samples, scale, shift
    batches = [torch.randn(n, 5) * scale + shift for n, scale, shift in shapes]
    for x in batches:
        norm.update(x)
    data = torch.cat(batches)
    torch.testing.assert_close(norm.mean, data.mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(norm.var, data.var(0, unbiased=False), atol=1e-4, rtol=1e-5)
    assert norm.count.item() == pytest.approx(len(data), abs=1e-3)
    assert {"mean", "var", "count"} <= set(norm.state_dict())  # checkpoints carry the statistics


def test_decentralised_end_to_end(tmp_path):
    out = run_script("ppo.py", ["--scenario", "dispersion", "--n-agents", "3", "--actor", "decentralised",
                                "--norm-reward", "--minibatch-size", "16", *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "dispersion__3__mlp__ppo__1__*"))
    evals = read_csv(os.path.join(run_dir, "eval.csv"))
    assert [r["episode"] for r in evals] == ["2", "3"] and all(math.isfinite(float(v)) for v in evals[-1].values())
    state = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert "obs_norm" not in state  # no observation normalisation
    assert 1 < state["reward_norm"]["count"] <= 3 * 8 * 4 * 3 + 1e-3  # at most 3 rollouts x 8 envs x 4 steps x 3 agents
    assert state["policy"]["net.inp.weight"].shape == (32, 13)  # per agent
