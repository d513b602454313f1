"""Smoke tests: every script runs end to end on a tiny configuration, bad input fails cleanly,
and the delicate numerics (GAE, max_return) match hand computations. Run: python -m pytest -q"""
import contextlib
import csv
import glob
import io
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import traceback

import pytest
import torch

import ppo

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = ["dispersion", "transport", "discovery", "sampling"]
TINY = ["--episodes", "3", "--num-envs", "8", "--num-steps", "4", "--eval-every", "2", "--eval-envs", "4",
        "--eval-steps", "8"]


ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only adds contention on a busy machine


def run_script(script, args, cwd):
    """`python script args` in cwd, run inside this process (no interpreter start and no imports, most of a tiny
    run's time); returns what subprocess.run would: the exit status, stdout and stderr (a traceback included)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = os.getcwd(), sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(cwd)
    sys.argv = [os.path.join(HERE, script), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter does: a message goes to stderr with status 1
        code = e.code if isinstance(e.code, int) else (e.code is not None)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except Exception:
        code = 1
        err.write(traceback.format_exc())
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        for s, handler in saved[2].items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(sys.argv, int(code), out.getvalue(), err.getvalue())


def run_process(script, args, cwd):
    """`python script args` in a new process: for what needs one (signals, a script that starts others)."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=ENV)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


COMMON_TRAIN = {"episode", "global_step", "time", "train_return", "policy_loss", "grad_norm", "sps"}
COMMON_EVAL = {"episode", "global_step", "time", "eval_return", "max_return", "normalized_return", "solved_fraction"}
SCRIPTS = {  # script: (extra tiny arguments, extra train.csv columns, extra eval.csv columns)
    "ppo.py": (["--minibatch-size", "16"], {"value_loss", "approx_kl"}, set()),
    "shacpp.py": (["--model-every", "2", "--model-minibatch", "16", "--model-epochs", "1", "--world-cache", "50",
                   "--reward-cache", "90", "--value-cache", "90"], {"world_loss", "reward_loss", "value_loss"}, set()),
    "shac.py": ([], {"value_loss", "window_return"}, set()),
}
CASES = [(script, scenario, 3, arch) for script in ("ppo.py", "shacpp.py") for scenario in SCENARIOS
         for arch in ("mlp", "transformer")]
CASES += [("shac.py", scenario, n, arch) for scenario in ("transport", "sampling") for n, arch in ((1, "mlp"), (3, "transformer"))]


@pytest.mark.parametrize("script, scenario, n, arch", [
    pytest.param(*case, marks=[pytest.mark.slow] if case[1] in ("discovery", "sampling") else []) for case in CASES])
def test_end_to_end(script, scenario, n, arch, tmp_path):
    extra, train_columns, eval_columns = SCRIPTS[script]
    out = run_script(script, ["--scenario", scenario, "--n-agents", str(n), "--arch", arch, *extra, *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{scenario}__{n}__{arch}__{script[:-3]}__1__*"))
    train, evals = read_csv(os.path.join(run_dir, "train.csv")), read_csv(os.path.join(run_dir, "eval.csv"))
    assert [r["episode"] for r in train] == ["1", "2", "3"]
    assert COMMON_TRAIN | train_columns <= set(train[0])
    assert [r["episode"] for r in evals] == ["2", "3"]  # every eval_every episodes and at the end
    assert COMMON_EVAL | eval_columns <= set(evals[0])
    assert int(train[-1]["global_step"]) == 3 * 8 * 4
    for row in evals + [train[1]]:  # episode 2 trains every model; other rows leave untrained models' columns nan
        assert all(math.isfinite(float(v)) for v in row.values()), row
    assert os.path.exists(os.path.join(run_dir, "args.json"))
    assert os.path.exists(os.path.join(run_dir, "last.pt")) and os.path.exists(os.path.join(run_dir, "best.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario, n, arch", [("transport", 1, "mlp"), ("dispersion", 3, "transformer")])
def test_shac_plus_end_to_end(scenario, n, arch, tmp_path):
    """shacpp.py --dynamics simulator is SHAC+: its own algorithm name, no world model trained or saved."""
    extra, _, _ = SCRIPTS["shacpp.py"]
    out = run_script("shacpp.py", ["--dynamics", "simulator", "--scenario", scenario, "--n-agents", str(n),
                                   "--arch", arch, *extra, *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{scenario}__{n}__{arch}__shac+__1__*"))
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["algorithm"] == "shac+"
    train, evals = read_csv(os.path.join(run_dir, "train.csv")), read_csv(os.path.join(run_dir, "eval.csv"))
    assert math.isnan(float(train[1]["world_loss"])) and math.isfinite(float(train[1]["reward_loss"]))
    assert all(math.isnan(float(r["world_loss"])) for r in train) and all(math.isfinite(float(r["normalized_return"]))
                                                                           for r in evals)
    checkpoint = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert "world_model" not in checkpoint and "reward_model" in checkpoint


@pytest.mark.parametrize("scenario", ["dispersion", "discovery"])
def test_shac_refuses_non_differentiable_rewards(scenario, tmp_path):
    out = run_script("shac.py", ["--scenario", scenario], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: the {scenario} reward is not differentiable, so SHAC cannot train on it; use shacpp.py"]
    assert not os.path.exists(tmp_path / "runs")


BAD_INPUT = [
    (["--scenario", "football"], "invalid choice 'football'"),
    (["--n-agents", "0"], "--n-agents must be at least 1"),
    (["--arch", "cnn"], "invalid choice 'cnn'"),
    (["--num-envs", "0"], "--num-envs must be at least 1"),
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--lam", "-1"], "--lam must be in [0, 1], got -1.0"),
    (["--learning-rate", "0"], "--learning-rate must be in (0, inf), got 0.0"),
    (["--stop-fraction", "1.5"], "--stop-fraction must be in (0, 1], got 1.5"),
    (["--stop-return", "nan"], "--stop-return must be in (0, 1], got nan"),
]


# every script parses with bookkeeping.parse_args, so ppo.py gets every case and the others their own ranges
@pytest.mark.parametrize("script, bad, message", [("ppo.py", *case) for case in BAD_INPUT] + [
    ("shac.py", *BAD_INPUT[1]),
    ("shac.py", ["--policy-std", "0"], "--policy-std must be in (0, inf), got 0.0"),
    ("shacpp.py", ["--policy-std", "-1"], "--policy-std must be in (0, inf), got -1.0"),
    ("shacpp.py", ["--alpha", "-0.5"], "--alpha must be in [0, inf), got -0.5"),
    ("shacpp.py", ["--model-minibatch", "0"], "--model-minibatch must be at least 1"),  # algorithm fields too
    ("shacpp.py", ["--world-cache", "10"], "--world-cache must be at least --world-bins"),
])
def test_bad_input_is_refused(script, bad, message, tmp_path):
    """tyro reports what it parses (a box, with suggestions); the ranges it cannot check are one line."""
    out = run_script(script, bad, tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    if "invalid choice" in message or "Unrecognized" in message:
        assert message in " ".join(out.stderr.split()), out.stderr
    else:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was built


def test_a_misspelt_flag_gets_a_suggestion(tmp_path):
    out = run_script("shacpp.py", ["--n-agent", "3"], tmp_path)
    assert out.returncode != 0 and "Perhaps you meant" in out.stderr and "--n-agents" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["transport", "sampling"])
def test_diagnose_compares_gradients(scenario, tmp_path):
    """diagnose.py on a tiny SHAC++ run (with the residual world model): one line per window, and on sampling, where
    every reward responds to the actions, the comparison itself."""
    out = run_script("shacpp.py", ["--scenario", scenario, "--world-residual", *SCRIPTS["shacpp.py"][0], *TINY],
                     tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{scenario}__*"))
    out = run_script("tools/diagnose.py", [run_dir, "--num-envs", "16", "--windows", "2"], tmp_path)
    assert out.returncode == 0, out.stderr
    windows = [line for line in out.stdout.splitlines() if line.startswith("window ")]
    assert len(windows) == 2 and all("of envs with a simulator gradient" in line for line in windows)
    assert "nan" not in out.stdout
    if scenario == "sampling":
        assert all("there: cos(models, simulator) " in line and "random " in line for line in windows)


@pytest.mark.parametrize("content, message", [
    (None, "has no readable args.json and shacpp.py checkpoint last.pt"),
    ('{"algorithm": "shacpp", "scenario": "dispersion", "n_agents": 1, "arch": "mlp", "num_steps": 4}',
     "error: dispersion has no differentiable reward in VMAS; use transport or sampling"),
])
def test_diagnose_bad_input_is_one_line(content, message, tmp_path):
    if content is not None:
        with open(tmp_path / "args.json", "w") as f:
            f.write(content)
        torch.save({"world_model": {}}, tmp_path / "last.pt")
    out = run_script("tools/diagnose.py", [str(tmp_path)], tmp_path)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr


def naive_gae(rewards, values, next_value, dones, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, summed forward from t until a termination or the window end."""
    T = len(rewards)
    adv = torch.zeros_like(rewards)
    for t in range(T):
        for k in range(t, T):
            v_next = 0.0 if dones[k] else (next_value if k == T - 1 else values[k + 1])
            adv[t] += (gamma * lam) ** (k - t) * (rewards[k] + gamma * v_next - values[k])
            if dones[k]:
                break
    return adv


def test_gae_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    T, B = 12, 7
    rewards, values = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g)
    next_value = torch.randn(B, generator=g)
    dones = torch.rand(T, B, generator=g) < 0.2
    adv, ret = ppo.gae(rewards, values, next_value, dones, 0.99, 0.95)
    for b in range(B):
        expected = naive_gae(rewards[:, b], values[:, b], next_value[b], dones[:, b], 0.99, 0.95)
        torch.testing.assert_close(adv[:, b], expected)
    for b in range(B):  # the value targets are the lambda-returns, by their own recursion
        g, expected = next_value[b], []
        for t in reversed(range(T)):
            v_next = next_value[b] if t == T - 1 else values[t + 1, b]
            g = rewards[t, b] + 0.99 * (1.0 - dones[t, b].float()) * ((1 - 0.95) * v_next + 0.95 * g)
            expected.insert(0, g)
        torch.testing.assert_close(ret[:, b], torch.stack(expected))
    assert dones.any()  # the data does exercise terminations


@pytest.mark.parametrize("n_agents", [1, 3])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_max_return_hand_computed(scenario, n_agents):
    env = ppo.make_env(scenario, n_agents, 6, "cpu", seed=3)
    obs, best = ppo.reset(env)
    assert obs.shape[:2] == (6, n_agents)
    s = env.scenario
    if scenario == "dispersion":  # each food pays 1 in total
        expected = torch.full((6,), float(n_agents))
    elif scenario == "transport":  # paid until the package (half width 0.075) overlaps the goal (radius 0.15)
        (dx, dy) = (s.packages[0].state.pos - s.world.landmarks[0].state.pos).T
        expected = 100 * n_agents * (torch.sqrt(dx ** 2 + dy ** 2) - (0.15 + 0.075 + 4 / 600)).clamp(min=0)
    elif scenario == "discovery":  # 7 targets, each paying 1 to every one of the n agents around it
        expected = torch.full((6,), 7.0 * n_agents)
    else:  # sampling: per 0.05-wide cell, the best of its 4 x 4 sub-cells (clipped to the reachable |x|, |y| <= 0.975)
        # of the sum of each Gaussian (variance 0.05) at its nearest point of the sub-cell; normalised by the mixture's
        # maximum over the (clamped) grid corners, as VMAS does
        corners = torch.tensor([[-1 + 0.05 * i, -1 + 0.05 * j] for i in range(40) for j in range(40)])

        def pdf(points, loc):  # (envs, points, 2), (envs, 2) -> (envs, points)
            return torch.exp(-((points - loc[:, None]) ** 2).sum(-1) / (2 * 0.05)) / (2 * math.pi * 0.05)
        max_pdf = sum(pdf(corners.clamp(-0.975, 0.975).expand(6, -1, -1), loc) for loc in s.locs).max(1).values
        best_of_cell = torch.zeros(6, len(corners))
        for i in range(4):
            for j in range(4):
                low = corners + torch.tensor([i, j]) * 0.0125
                low, high = low.clamp(-0.975, 0.975), (low + 0.0125).clamp(-0.975, 0.975)
                peak = sum(pdf(torch.maximum(torch.minimum(loc[:, None], high), low), loc) for loc in s.locs)
                best_of_cell = torch.maximum(best_of_cell, peak)
        expected = n_agents * best_of_cell.sum(1) / max_pdf
    torch.testing.assert_close(best, expected, rtol=1e-4, atol=1e-4)


def test_dispersion_agents_start_on_circle():
    env = ppo.make_env("dispersion", 3, 4, "cpu", seed=0)
    ppo.reset(env)
    pos = torch.stack([a.state.pos for a in env.agents], 1)  # (envs, agents, 2)
    torch.testing.assert_close(pos.norm(dim=-1), torch.full((4, 3), 0.05))
    assert (pos[:, 0] - pos[:, 1]).norm(dim=-1).min() > 0.08  # 120 degrees apart


def blocks(path):
    """The shared blocks of a training script: the environment factory through evaluate."""
    text = open(os.path.join(HERE, path)).read()
    return text[text.index("def make_env"):text.index("\n# ----", text.index("def evaluate"))]


def test_shared_blocks_identical():
    """Environment factory, networks and evaluation are copies: diff shows only the algorithm."""
    assert blocks("ppo.py") == blocks("shacpp.py") == blocks("shac.py")


@pytest.mark.slow
def test_sampling_normalisation_matches_vmas():
    """Our Sampling computes a full reset's normalisation at once; it equals VMAS's loop over the grid."""
    import vmas
    ours = ppo.make_env("sampling", 2, 16, "cpu", seed=3)
    ours.reset()  # VMAS reseeds its one random state when an environment is made: make, reset, make, reset
    stock = vmas.make_env("sampling", num_envs=16, device="cpu", continuous_actions=True, seed=3, n_agents=2)
    stock.reset()
    torch.testing.assert_close(ours.scenario.max_pdf, stock.scenario.max_pdf, rtol=1e-5, atol=0)


def test_shac_runs_with_no_scenario_given(tmp_path):
    """shac.py's default scenario is one it accepts (a differentiable reward), so `python shac.py` trains."""
    out = run_script("shac.py", ["--episodes", "1", "--num-envs", "4", "--num-steps", "2", "--eval-envs", "2",
                                 "--eval-steps", "2", "--run-dir", "run"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(read_csv(tmp_path / "run" / "eval.csv")) == 1


def test_resume_flags(tmp_path, monkeypatch):
    """--checkpoint: a flag given (as --flag value, --flag=value or --no-flag) wins, every other comes from args.json,
    and a given one of Args.STRUCTURE that contradicts the run ends with one line."""
    import bookkeeping
    import shacpp
    saved = dict(n_agents=3, learning_rate=0.5, seed=7, world_residual=True, arch="transformer")
    (tmp_path / "args.json").write_text(json.dumps(saved))
    argv = ["shacpp.py", "--checkpoint", str(tmp_path), "--seed", "8", "--learning-rate=0.25", "--arch", "transformer"]
    monkeypatch.setattr(sys, "argv", argv)
    args = bookkeeping.parse_args(shacpp.Args)
    assert (args.seed, args.learning_rate, args.n_agents, args.world_residual) == (8, 0.25, 3, True)
    monkeypatch.setattr(sys, "argv", argv + ["--no-world-residual"])
    with pytest.raises(SystemExit, match="--world-residual False contradicts the checkpoint's run"):
        bookkeeping.parse_args(shacpp.Args)
