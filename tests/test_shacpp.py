"""Numerics of SHAC++ (shacpp.py): world-model attention, TD(lambda) targets, binned caches, action penalty,
and the isolation of the policy step from the model networks. Run: python -m pytest -q"""
import copy
import math

import pytest
import torch

import shacpp
from test_smoke import TINY, run_script


def test_world_model_residual_adds_s0():
    torch.manual_seed(0)
    residual, plain = shacpp.WorldModel(2, 5, 4, residual=True), shacpp.WorldModel(2, 5, 4)
    plain.load_state_dict(residual.state_dict())  # the same weights, built without the residual
    obs0, actions = torch.randn(3, 2, 5), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(residual(obs0, actions), plain(obs0, actions) + obs0.unsqueeze(1))  # s_0 + head(h_t)


@pytest.mark.parametrize("residual", [False, True])
def test_world_model_sees_no_later_step(residual):
    torch.manual_seed(0)
    n, obs_dim, T = 3, 5, 6
    model = shacpp.WorldModel(n, obs_dim, T, residual=residual)
    obs0, actions = torch.randn(2, n, obs_dim), torch.randn(2, T, n, 2)
    pred = model(obs0, actions)
    assert pred.shape == (2, T, n, obs_dim)  # pred[:, k] is s^_{k+1}
    for t in range(T):
        for i in range(n):
            changed = actions.clone()
            changed[:, t, i] += 1.0
            pred2 = model(obs0, changed)
            torch.testing.assert_close(pred2[:, :t], pred[:, :t])  # s^_1..s^_t do not see a_t
            assert (pred2[:, t, i] - pred[:, t, i]).abs().max() > 1e-4  # s^_{t+1} of agent i does
    # the mask itself: no token attends to a later step
    step = torch.arange(T + 1).repeat_interleave(n)
    later = step[None] > step[:, None]
    assert model.mask[later].all()
    # and an agent sees its own past and its own step, but another agent only at the same step
    agent = torch.arange(n).repeat(T + 1)
    earlier_other = (step[None] < step[:, None]) & (agent[None] != agent[:, None])
    assert model.mask[earlier_other].all()
    assert not model.mask[(step[None] <= step[:, None]) & (agent[None] == agent[:, None])].any()


@pytest.mark.parametrize("n,residual", [(1, False), (3, True)])
def test_structured_attention_equals_the_masked_world_model(n, residual):
    """bench.py --world-attention times the world model's attention computed on its structure (own agent's steps and
    the same step's agents, one softmax) against the mask; both must be the same function with the same parameters."""
    import bench

    torch.manual_seed(0)
    model = shacpp.WorldModel(n, 7, 5, residual=residual)
    obs0, actions = torch.randn(4, n, 7), torch.randn(4, 5, n, 2)
    torch.testing.assert_close(bench.structured_world_forward(model, obs0, actions), model(obs0, actions))


def naive_lambda_return(rewards, values, terminated, gamma, lam):
    """The paper's definition: V_t = (1-lam) sum_{k=1}^{h-t-1} lam^{k-1} G_t^k + lam^{h-t-1} G_t^{h-t}, with
    G_t^k = sum_{l=t}^{t+k-1} gamma^{l-t} r_l + gamma^k V(s_{t+k}); nothing counts after a termination.
    values[k] is V(s_k) for k = 0..h (values[h] the bootstrap at the window end)."""
    h = len(rewards)
    out = torch.zeros(h)
    for t in range(h):
        def G(k):
            total, ended = 0.0, False
            for l in range(t, t + k):
                total += gamma ** (l - t) * rewards[l]
                if terminated[l]:
                    ended = True
                    break
            return total + (0.0 if ended else gamma ** k * values[t + k])
        out[t] = (1 - lam) * sum(lam ** (k - 1) * G(k) for k in range(1, h - t)) + lam ** (h - t - 1) * G(h - t)
    return out


def test_lambda_returns_match_definition():
    g = torch.Generator().manual_seed(1)
    T, B = 9, 6
    rewards = torch.randn(T, B, generator=g)
    values = torch.randn(T + 1, B, generator=g)
    terminated = torch.rand(T, B, generator=g) < 0.15
    targets = shacpp.lambda_returns(rewards, values[1:], terminated, 0.99, 0.95)
    for b in range(B):
        expected = naive_lambda_return(rewards[:, b], values[:, b], terminated[:, b], 0.99, 0.95)
        torch.testing.assert_close(targets[:, b], expected)
    assert terminated.any() and (~terminated).all(0).any()  # both cases occur


def stored_keys(cache):
    return cache.key[cache.stamp >= 0]


def test_binned_cache_keeps_rare_items():
    torch.manual_seed(0)
    cache = shacpp.BinnedCache(30000, 25, "cpu")
    for _ in range(10):
        cache.add(torch.zeros(1000), x=torch.zeros(1000, 2))
    cache.add(torch.full((10,), 5.0), x=torch.ones(10, 2))
    assert len(cache) == 1200 + 10  # the zero bin holds only its capacity; the 10 rare items have a bin of their own
    batch = cache.sample(20000)["x"]
    assert batch.shape == (20000, 2)
    assert (batch == 1).all(1).float().mean() == pytest.approx(10 / 1210, abs=0.003)  # uniform over the stored items


@pytest.mark.parametrize("rare_key", [1.0, -1.0])
def test_binned_cache_rare_keys_that_came_first_are_kept(rare_key):
    """The start of a sparse-reward run: a few rewarding items, then many times the capacity of zero keys. The rare
    items keep a bin of their own, so they stay in the cache and in its batches: after the zeros, after the range
    widens, and after a refused NaN key."""
    torch.manual_seed(0)
    cache = shacpp.BinnedCache(900, 9, "cpu")  # 100 per bin
    cache.add(torch.full((10,), rare_key), x=torch.ones(10))
    for _ in range(20):  # 20 x the capacity of zeros
        cache.add(torch.zeros(900), x=torch.zeros(900))
    assert (stored_keys(cache) == rare_key).sum() == 10 and len(cache) == 110
    assert (cache.sample(20000)["x"] == 1).float().mean() == pytest.approx(10 / 110, abs=0.01)
    cache.add(torch.full((30,), 5.0 * rare_key), x=torch.full((30,), 5.0))  # the range widens to [0, 5]
    for _ in range(5):
        cache.add(torch.zeros(900), x=torch.zeros(900))
    assert (stored_keys(cache) == rare_key).sum() == 10 and (stored_keys(cache) == 5.0 * rare_key).sum() == 30
    with pytest.raises(ValueError):
        cache.add(torch.tensor([math.nan, 1.0]), x=torch.zeros(2))
    assert len(cache) == 140 and (cache.sample(20000)["x"] == 1).float().mean() == pytest.approx(10 / 140, abs=0.01)


def test_binned_cache_replaces_oldest_first():
    cache = shacpp.BinnedCache(6, 2, "cpu")  # 3 slots per bin
    cache.add(torch.tensor([0.0, 1.0]), x=torch.tensor([-1.0, -2.0]))
    for value in [10.0, 20.0, 30.0, 40.0]:  # all to bin 0, which already holds -1
        cache.add(torch.tensor([0.0]), x=torch.tensor([value]))

    def in_bin(b):
        stored = cache.stamp >= 0
        return sorted(cache.data["x"][stored & (cache.bin_of(cache.key) == b)].tolist())
    assert in_bin(0) == [20.0, 30.0, 40.0]  # -1 went first, then 10
    cache.add(torch.zeros(5), x=torch.arange(5.0))  # more than a bin holds at once: the newest 3 stay
    assert in_bin(0) == [2.0, 3.0, 4.0]
    assert in_bin(1) == [-2.0]  # the other bin is untouched


def test_binned_caches_keep_their_own_range():
    a, b = shacpp.BinnedCache(90, 9, "cpu"), shacpp.BinnedCache(90, 9, "cpu")
    a.add(torch.tensor([0.0, 100.0]), x=torch.zeros(2))
    b.add(torch.tensor([0.0, 1.0]), x=torch.zeros(2))
    assert b.bin_of(torch.tensor([1.0])).item() == 8  # top bin of b's own range [0, 1]
    assert a.bin_of(torch.tensor([1.0])).item() == 0  # bottom bin of a's range [0, 100]
    assert (a.low.item(), a.high.item(), b.low.item(), b.high.item()) == (0.0, 100.0, 0.0, 1.0)


def test_binned_cache_common_key_stays_in_one_bin_as_the_range_widens():
    torch.manual_seed(0)
    cache = shacpp.BinnedCache(900, 9, "cpu")  # 100 per bin
    for high in [1.0, 10.0, 100.0, 1000.0]:  # the range widens four times; zero stays the common key
        key = torch.cat([torch.zeros(300), torch.rand(60) * high])
        cache.add(key, x=key)
        keys = stored_keys(cache)
        assert cache.bin_of(keys[keys == 0]).unique().numel() == 1  # every zero in one bin, under the current range
        assert (keys == 0).sum() <= cache.per_bin  # and that bin's share only
        assert torch.equal(cache.data["x"][cache.stamp >= 0], keys)  # the items moved with their keys
    # the first version left zeros in 3 bins and 300 of them in the cache here


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_binned_cache_refuses_non_finite_keys(bad):
    cache = shacpp.BinnedCache(90, 9, "cpu")
    cache.add(torch.tensor([0.0, 1.0]), x=torch.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        cache.add(torch.tensor([0.5, bad]), x=torch.zeros(2))
    assert len(cache) == 2 and (cache.low.item(), cache.high.item()) == (0.0, 1.0)  # the range is untouched


def test_action_penalty():
    mean = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.9, 1.0, 2.5], requires_grad=True)
    d = shacpp.action_penalty(mean)
    torch.testing.assert_close(d, torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.25]))
    d.sum().backward()
    assert mean.grad[0] < 0 and mean.grad[-1] > 0  # descent moves -3 up and 2.5 down, back into [-1, 1]
    assert (mean.grad[1:-1] == 0).all()


def test_authors_penalty_averages_over_the_violating_components_only():
    """Of 2 * 4 * 3 * 2 mean components, one at 3 (2 over the bound) and one at -1.5, the latter after environment 3
    terminated: --penalty mean averages the squared distances over every component of the live steps (the latter left
    out); --penalty authors averages each side over its violating components only, on every step, as the authors'."""
    T, N, n = 2, 4, 3
    means = torch.zeros(T, N, n, 2)
    means[0, 1, 2, 0], means[1, 3, 0, 1] = 3.0, -1.5
    alive, terminated = torch.ones(T, N, dtype=torch.bool), torch.zeros(T, N, dtype=torch.bool)
    terminated[0, 3], alive[1, 3] = True, False
    losses = {}
    for penalty in ("mean", "authors"):
        args = shacpp.Args(penalty=penalty, alpha=1.0)
        losses[penalty] = shacpp.policy_loss(torch.zeros(T, N, n), torch.zeros(N, n), means, alive, terminated, args)
    assert losses["mean"][1]["penalty"].item() == pytest.approx(4.0 / (T * N * n * 2))
    assert losses["authors"][1]["penalty"].item() == pytest.approx(4.0 + 0.25)
    assert losses["authors"][0].item() == pytest.approx(4.25)  # the window return is 0: the loss is alpha * penalty


def make_models(n=2, obs_dim=4, T=3, arch="mlp"):
    torch.manual_seed(0)
    return (shacpp.make_network(arch, n, obs_dim, 2), shacpp.WorldModel(n, obs_dim, T),
            shacpp.RewardModel(arch, n, obs_dim), shacpp.make_network(arch, n, obs_dim, 1))


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_policy_update_leaves_models_alone(arch):
    n, obs_dim, T, N = 2, 4, 3, 5
    policy, world, reward, value = make_models(n, obs_dim, T, arch)
    args = shacpp.Args(n_agents=n, num_steps=T)
    obs = torch.randn(T + 1, N, n, obs_dim)
    means = policy(obs[:-1])
    actions = (means + torch.randn_like(means)).clamp(-1, 1)
    alive, terminated = torch.ones(T, N, dtype=torch.bool), torch.zeros(T, N, dtype=torch.bool)
    models = (world, reward, value)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    policy_before = copy.deepcopy(policy.state_dict())
    model_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    twins = [copy.deepcopy(m) for m in models]  # identical models that never see a policy step
    twin_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in twins]

    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    r_hat, v_hat = shacpp.imagine(world, reward, value, obs, actions)
    loss, _ = shacpp.policy_loss(r_hat, v_hat, means, alive, terminated, args)
    opt.zero_grad()
    loss.backward(inputs=list(policy.parameters()))  # as the loop does
    opt.step()
    assert torch.isfinite(loss) and torch.cat([p.grad.flatten() for p in policy.parameters()]).norm() > 0
    assert any((policy.state_dict()[k] != v).any() for k, v in policy_before.items())  # the policy moved
    for m, b in zip(models, before):
        assert all(p.grad is None for p in m.parameters())
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, b[k], rtol=0, atol=0)

    # a later model update is exactly what it would have been without the policy step
    inputs = [(torch.randn(N, n, obs_dim), torch.randn(N, T, n, 2)),
              (torch.randn(N, n, obs_dim), torch.randn(N, n, 2), torch.randn(N, n, obs_dim)),
              (torch.randn(N, n, obs_dim),)]
    for m, o, twin, twin_o, inp in zip(models, model_opts, twins, twin_opts, inputs):
        for model, optimizer in ((m, o), (twin, twin_o)):
            optimizer.zero_grad()
            model(*inp).pow(2).mean().backward()
            optimizer.step()
        for p, q in zip(m.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_policy_loss_masks_after_termination():
    """Rewards after a termination and the terminated environment's bootstrap do not reach the policy."""
    n, obs_dim, T, N = 1, 4, 3, 2
    policy, world, reward, value = make_models(n, obs_dim, T)
    args = shacpp.Args(n_agents=n, num_steps=T)
    obs = torch.randn(T + 1, N, n, obs_dim)

    def grads(alive, terminated, scale_value=1.0):
        torch.manual_seed(3)
        p = copy.deepcopy(policy)
        means = p(obs[:-1])
        actions = means.clamp(-1, 1)
        v = copy.deepcopy(value)
        with torch.no_grad():
            v.out.weight.mul_(scale_value)  # changes dV/ds, hence the gradient through the bootstrap
        r_hat, v_hat = shacpp.imagine(world, reward, v, obs, actions)
        loss, _ = shacpp.policy_loss(r_hat, v_hat, means, alive, terminated, args)
        loss.backward(inputs=list(p.parameters()))
        return torch.cat([q.grad.flatten() for q in p.parameters()])

    alive = torch.tensor([[True, True], [False, True], [False, True]])
    terminated = torch.tensor([[True, False], [False, False], [False, False]])
    # env 0 terminated at step 0: changing the value network's output must not change the gradient via env 0;
    # env 1 is alive throughout, so it does. Compare with env 1 dead from the start (only env 0 left).
    only_env0_alive = torch.tensor([[True, False], [False, False], [False, False]])
    g1, g2 = grads(only_env0_alive, terminated), grads(only_env0_alive, terminated, scale_value=10.0)
    torch.testing.assert_close(g1, g2)
    g3, g4 = grads(alive, terminated), grads(alive, terminated, scale_value=10.0)
    assert not torch.allclose(g3, g4)


class TowardsTarget(torch.nn.Module):
    """A differentiable policy that drives each agent at a point of its observation (transport: obs[6:8] is the
    package minus the agent; dispersion: obs[4:6] is the first food minus the agent), so agents make contact."""

    def __init__(self, at: slice):
        super().__init__()
        self.at, self.gain = at, torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, obs):
        return self.gain * obs[..., self.at]


@pytest.mark.parametrize("scenario, n, at", [("transport", 3, slice(6, 8)), ("dispersion", 2, slice(4, 6))])
def test_shac_plus_gradient_flows_through_the_simulator(scenario, n, at):
    """SHAC+ (--dynamics simulator): the policy step's gradient reaches the policy through VMAS's physics and the
    reward model, none lands in the reward or value networks, and consecutive windows back-propagate."""
    torch.manual_seed(0)
    T, N = 16, 32
    env = shacpp.make_env(scenario, n, N, "cpu", seed=0, grad_enabled=True)
    obs, _ = shacpp.reset(env)
    policy, value = TowardsTarget(at), shacpp.make_network("mlp", n, obs.shape[-1], 1)
    reward = shacpp.RewardModel("mlp", n, obs.shape[-1])
    args = shacpp.Args(n_agents=n, num_steps=T)
    alive, terminated = torch.ones(T, N, dtype=torch.bool), torch.zeros(T, N, dtype=torch.bool)
    contact = False
    for window in range(6):  # the second window fails if the previous graph is still attached
        shacpp.cut_graph(env)
        states, samples = [obs.detach()], []
        for _ in range(T):
            mean = policy(states[-1])
            samples.append(mean + 0.1 * torch.randn_like(mean))
            obs, _, _ = shacpp.step(env, samples[-1].clamp(-1.0, 1.0))
            states.append(obs)
        if scenario == "transport":
            contact |= bool(env.scenario.packages[0].state.vel.norm(dim=-1).max() > 1e-3)
        r_hat, v_hat = shacpp.imagine(None, reward, value, torch.stack(states), torch.stack(samples))
        # V(s_T) takes no action, so its gradient reaches the policy only through the simulator's states
        (through_physics,) = torch.autograd.grad(v_hat.sum(), policy.gain, retain_graph=True)
        assert torch.isfinite(through_physics) and through_physics != 0
        policy.zero_grad()
        loss, _ = shacpp.policy_loss(r_hat, v_hat, torch.stack(samples), alive, terminated, args)
        loss.backward(inputs=list(policy.parameters()))
        assert torch.isfinite(policy.gain.grad) and policy.gain.grad != 0
        assert all(p.grad is None for m in (reward, value) for p in m.parameters())
    assert contact or scenario != "transport"  # agents pushed the package: contact forces were differentiated


def test_binned_cache_all_time_range_and_uniform_sampling():
    """The bins span every key ever added, so a rare key of the first add keeps its bin after any number of other
    keys; every stored item is equally likely in a batch."""
    torch.manual_seed(0)
    cache = shacpp.BinnedCache(900, 9, "cpu")
    cache.add(torch.tensor([-2.0, 7.0]), x=torch.tensor([1.0, 1.0]))
    for _ in range(5):
        cache.add(torch.rand(900), x=torch.zeros(900))
    assert (cache.low.item(), cache.high.item()) == (-2.0, 7.0)
    assert cache.bin_of(torch.tensor([-2.0, 0.5, 7.0])).tolist() == [0, 2, 8]
    stored = len(cache)
    assert stored == 2 + cache.per_bin  # [0, 1) is bin 2 of [-2, 7]: its newest 100
    share = (cache.sample(20000)["x"] == 1).float().mean().item()
    assert share == pytest.approx(2 / stored, abs=0.005)  # uniform over the stored items


def test_reward_model_inputs_and_transformer_layernorm():
    """The transformer reward model is R(s, a) (the paper's L_R, the authors' transformer): s' does not change it, the
    action does; the MLP's is R(s, a, s'). SHAC++'s transformers normalise the embedding (a LayerNorm after it)."""
    torch.manual_seed(0)
    obs, action, next_obs = torch.randn(5, 3, 7), torch.randn(5, 3, 2), torch.randn(5, 3, 7)
    transformer, mlp = shacpp.RewardModel("transformer", 3, 7), shacpp.RewardModel("mlp", 3, 7)
    torch.testing.assert_close(transformer(obs, action, next_obs), transformer(obs, action, next_obs + 1.0))
    assert (transformer(obs, action + 1.0, next_obs) - transformer(obs, action, next_obs)).abs().max() > 1e-4
    assert (mlp(obs, action, next_obs + 1.0) - mlp(obs, action, next_obs)).abs().max() > 1e-4
    assert isinstance(transformer.net.norm, torch.nn.LayerNorm)
    assert isinstance(shacpp.make_network("transformer", 3, 7, 2).norm, torch.nn.Identity)  # ppo.py's and shac.py's


def test_the_script_builds_normalised_transformers(tmp_path):
    """shacpp.py's policy, value and reward transformers carry the LayerNorm (their checkpoints hold its weights)."""
    from test_smoke import TINY, run_script
    out = run_script("shacpp.py", ["--scenario", "dispersion", "--n-agents", "2", "--arch", "transformer", *TINY,
                                   "--model-minibatch", "16", "--world-cache", "50", "--reward-cache", "90",
                                   "--value-cache", "90", "--run-dir", "run"], tmp_path)
    assert out.returncode == 0, out.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "norm.weight" in state["policy"] and "norm.weight" in state["value_model"]
    assert "net.norm.weight" in state["reward_model"]


def test_the_loop_steps_the_policy(tmp_path):
    """The loop's policy update reaches optimizer.step(), after the gradient clip: after one episode Adam's first step
    has moved the policy's parameters by about the learning rate (1e-3) from where a run with a negligible rate leaves
    them; with a gradient clipped to a norm of 1e-12, far below Adam's eps (1e-8), the same step hardly moves them."""
    from test_smoke import TINY, run_script
    policies = {}
    for name, flags in (("stepped", []), ("still", ["--learning-rate", "1e-12"]), ("clipped", ["--max-grad-norm", "1e-12"])):
        out = run_script("shacpp.py", ["--scenario", "dispersion", "--n-agents", "1", *TINY, "--episodes", "1",
                                       "--model-every", "1000", "--run-dir", name, *flags], tmp_path)
        assert out.returncode == 0, out.stderr
        policies[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["policy"]
    moved = {name: max((policies[name][k] - policies["still"][k]).abs().max().item() for k in policies[name])
             for name in ("stepped", "clipped")}
    assert 5e-4 < moved["stepped"] < 2e-3 and moved["clipped"] < 1e-5, moved


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_policy_dropout_only_in_train_mode(arch):
    """--policy-dropout: in train mode two passes differ; in eval mode the network is the same weights without it."""
    torch.manual_seed(0)
    net = shacpp.make_network(arch, 2, 5, 2, norm=True, dropout=0.5)
    plain = shacpp.make_network(arch, 2, 5, 2, norm=True)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(64, 2, 5)
    assert not torch.allclose(net(x), net(x))
    torch.testing.assert_close(net.eval()(x), plain(x))


def test_evaluation_has_no_policy_dropout(tmp_path):
    """A checkpoint evaluated with --policy-dropout 0.5 and with 0 gives the same metrics: evaluation uses the mean
    of the policy without dropout."""
    out = run_script("shacpp.py", ["--scenario", "sampling", *TINY, "--policy-dropout", "0.5", "--run-dir", "run"],
                     tmp_path)
    assert out.returncode == 0, out.stderr
    lines = []
    for dropout in ("0.5", "0.0"):
        out = run_script("shacpp.py", ["--checkpoint", "run", "--episodes", "0", "--policy-dropout", dropout],
                         tmp_path)
        assert out.returncode == 0, out.stderr
        lines.append(out.stdout.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "eval_return 0.0000" not in lines[0], lines
