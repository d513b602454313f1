"""Reliability: checkpoints, resume, evaluation-only GIFs, stop signals, non-finite updates,
determinism and bad checkpoints. Tiny configurations; run: python -m pytest -q"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import bookkeeping
import ppo
import shac
import shacpp
from test_smoke import ENV, HERE, SCRIPTS, read_csv, run_script

pytestmark = pytest.mark.slow
TINY = ["--num-envs", "8", "--num-steps", "4", "--eval-every", "5", "--eval-envs", "4", "--eval-steps", "8"]
TIME_COLUMNS = {"time", "sps", "rollout_time", "update_time", "policy_time", "value_time", "model_time", "eval_time"}


def train(script, tmp_path, name, *args):
    scenario = "transport" if script == "shac.py" else "dispersion"
    out = run_script(script, ["--scenario", scenario, "--exp-name", name, *SCRIPTS[script][0], *TINY, *args], tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"*__{name}__*"))
    return run_dir, out


def rows(run_dir, name):
    """A CSV's rows without its time columns."""
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in read_csv(os.path.join(run_dir, name))]


@pytest.mark.parametrize("script", ["ppo.py", "shac.py", "shacpp.py"])
def test_same_seed_same_rows_and_resume(script, tmp_path):
    """Two runs with one seed log identical rows; ppo and shac resumed at episode 10 continue exactly as if never
    stopped, shacpp (caches refilled) keeps rows 1-10 and carries on to episode 20."""
    first, _ = train(script, tmp_path, "first", "--episodes", "20")
    second, _ = train(script, tmp_path, "second", "--episodes", "20")
    for name in ("train.csv", "eval.csv"):
        assert rows(first, name) == rows(second, name)
    resumed, _ = train(script, tmp_path, "resumed", "--episodes", "10")
    out = run_script(script, [*(["--scenario", "transport"] if script == "shac.py" else []), *SCRIPTS[script][0], *TINY,
                              "--episodes", "20", "--checkpoint", os.path.join(resumed, "last.pt")], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "from episode 11" in out.stdout
    train_rows, eval_rows = rows(resumed, "train.csv"), rows(resumed, "eval.csv")
    assert [r["episode"] for r in train_rows] == [str(e) for e in range(1, 21)]
    assert [r["episode"] for r in eval_rows] == ["5", "10", "15", "20"]
    if script == "shacpp.py":
        assert train_rows[:10] == rows(first, "train.csv")[:10]
    else:
        assert train_rows == rows(first, "train.csv") and eval_rows == rows(first, "eval.csv")
    state = torch.load(os.path.join(resumed, "last.pt"), weights_only=True)
    assert state["episode"] == 20 and state["algorithm"] == script[:-3]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_writes_last_checkpoint(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "ppo.py"), *TINY, "--minibatch-size", "16",
                             "--episodes", "100000", "--eval-every", "100000", "--exp-name", "sig"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(tmp_path / "runs/*/train.csv"))) == 0:
        time.sleep(0.2)
    time.sleep(1.0)  # a few episodes
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value and "Traceback" not in err, err  # a scheduler can tell it from done
    (run_dir,) = glob.glob(str(tmp_path / "runs/*"))
    episodes = [int(r["episode"]) for r in read_csv(os.path.join(run_dir, "train.csv"))]
    state = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert state["episode"] == episodes[-1] > 0
    assert f"stopped by {sig.name} at episode {episodes[-1]}" in out
    assert not glob.glob(str(tmp_path / "runs/*/*.tmp"))


def test_non_finite_updates_are_skipped_then_stop(tmp_path):
    """A learning rate of 1e30 blows the networks up after the first update: every later update is skipped and
    counted, and after 10 in a row the run stops with one line."""
    out = run_script("ppo.py", [*TINY, "--minibatch-size", "16", "--learning-rate", "1e30", "--episodes", "50",
                                "--eval-every", "1"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert re.fullmatch(r"error: (\d+) updates in a row had a non-finite loss or gradient \(episode (\d+)\); "
                        r"the last good checkpoint is .*last.pt", line), line
    assert int(re.match(r"error: (\d+)", line)[1]) >= 10
    (run_dir,) = glob.glob(str(tmp_path / "runs/*"))
    train_rows = read_csv(os.path.join(run_dir, "train.csv"))
    assert sum(int(r["skipped_updates"]) for r in train_rows) >= 10
    state = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)  # written before the blow-up
    assert state["episode"] < int(train_rows[-1]["episode"])
    assert all(torch.isfinite(v).all() for v in state["policy"].values())


def test_guard_skips_non_finite_step():
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = bookkeeping.NonFiniteGuard()
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.full((2, 3), float("nan"))).sum()
    loss.backward()
    if guard.finite(loss, nn.utils.clip_grad_norm_(net.parameters(), 1.0)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and guard.skipped == guard.in_row == 1
    opt.zero_grad()
    loss = net(torch.ones(2, 3)).sum()
    loss.backward()
    if guard.finite(loss, nn.utils.clip_grad_norm_(net.parameters(), 1.0)):
        opt.step()
    assert not torch.equal(before[0], net.weight) and guard.in_row == 0 and guard.skipped == 1


@pytest.mark.parametrize("scenario", ["dispersion", "transport", "discovery", "sampling"])
def test_evaluation_only_writes_gif(scenario, tmp_path):
    run_dir, _ = train("ppo.py", tmp_path, "gif", "--scenario", scenario, "--episodes", "1")
    checkpoint = os.path.join(run_dir, "best.pt")
    out = run_script("ppo.py", ["--scenario", scenario, "--episodes", "0", "--checkpoint", checkpoint,
                                "--capture-video", "--eval-envs", "2", "--eval-steps", "6"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "normalized_return" in out.stdout
    from PIL import Image
    with Image.open(os.path.join(run_dir, "best.gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == 7 and min(gif.size) >= 100  # the reset frame and 6 steps
    assert len(read_csv(os.path.join(run_dir, "eval.csv"))) == 1  # evaluation only: nothing logged


def test_training_gif_with_capture_video(tmp_path):
    run_dir, _ = train("shacpp.py", tmp_path, "video", "--episodes", "5", "--capture-video")
    assert os.path.getsize(os.path.join(run_dir, "videos", "episode_5.gif")) > 0


@pytest.fixture
def checkpoint(tmp_path):
    run_dir, _ = train("ppo.py", tmp_path, "ckpt", "--episodes", "2", "--eval-every", "1")
    return os.path.join(run_dir, "last.pt")


def test_bad_checkpoints_one_line(checkpoint, tmp_path):
    """Each refusal is one line from sys.exit (so no traceback); two go through the command line end to end."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(checkpoint, "rb").read()[:2000])
    modules = dict(policy=ppo.Policy("mlp", 1, 7), value_model=ppo.make_network("mlp", 1, 7, 1))
    cases = [
        (ppo, {}, str(truncated), "is truncated or not a checkpoint"),
        (shac, dict(scenario="transport"), checkpoint, "was written with algorithm ppo, not shac"),
        (ppo, dict(scenario="transport"), checkpoint, "was written with scenario dispersion, not transport"),
        (ppo, dict(n_agents=2), checkpoint, "was written with n_agents 1, not 2"),
        (ppo, dict(arch="transformer"), checkpoint, "was written with arch mlp, not transformer"),
        (ppo, dict(episodes=2), checkpoint, "is at episode 2: --episodes must be larger to resume"),
    ]
    for script, fields, path, message in cases:
        with pytest.raises(SystemExit) as stop:
            bookkeeping.load_checkpoint(path, script.Args(**fields), modules, script.ALGORITHM)
        assert str(stop.value) == f"error: checkpoint {path} {message}"
    for args, message in ((["--checkpoint", str(tmp_path / "missing.pt")], f"error: checkpoint {tmp_path}/missing.pt "
                                                                         "does not exist"),
                          (["--episodes", "0"], "error: --episodes must be at least 1 (0, evaluation only, needs --checkpoint), "
                                             "got 0")):
        out = run_script("ppo.py", args, tmp_path)
        assert out.returncode != 0 and out.stderr.strip().splitlines() == [message], out.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write killed half way leaves the previous last.pt intact."""
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = bookkeeping.Run(ppo.Args(), dict(net=nn.Linear(2, 2)), None, "ppo", ppo.__file__)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    run.save("last.pt", 1)

    def killed(state, path):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run.save("last.pt", 2)
    assert torch.load(os.path.join(run.dir, "last.pt"), weights_only=True)["episode"] == 1


@pytest.mark.parametrize("horizon, residual, message", [
    (4, False, "does not fit these networks: "),  # the world model depends on --num-steps
    (5, True, "was written with world_residual True, not False"),  # resuming would change what it predicts
])
def test_checkpoint_for_another_world_model(horizon, residual, message, tmp_path):
    """A shacpp checkpoint whose world model does not match the run's (--num-steps, --world-residual): one line."""
    path = str(tmp_path / "last.pt")
    torch.save(dict(algorithm="shacpp", scenario="dispersion", n_agents=1, arch="mlp", world_residual=residual,
                    episode=1, rng={}, world_model=shacpp.WorldModel(1, 7, horizon).state_dict()), path)
    with pytest.raises(SystemExit) as stop:
        bookkeeping.load_checkpoint(path, shacpp.Args(), dict(world_model=shacpp.WorldModel(1, 7, 5)), "shacpp")
    text = str(stop.value)
    assert text.startswith(f"error: checkpoint {path} {message}") and "\n" not in text
    if horizon != 5:
        assert "size mismatch for step_embedding" in text


def test_resume_from_a_run_folder_reads_its_arguments(tmp_path):
    """--checkpoint <run folder> resumes with the run's own arguments (nothing retyped); a flag that would change the
    networks' shape and contradicts them is one line naming it; args.json records where the run came from."""
    run_dir, _ = train("shacpp.py", tmp_path, "folder", "--episodes", "5", "--world-residual", "--num-steps", "3")
    with open(os.path.join(run_dir, "args.json")) as f:
        saved = json.load(f)
    assert saved["script"] == "shacpp.py" and saved["torch"] == torch.__version__ and "vmas" in saved
    assert "git_commit" in saved
    out = run_script("shacpp.py", ["--checkpoint", run_dir, "--episodes", "10"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "from episode 6" in out.stdout
    assert [r["episode"] for r in rows(run_dir, "eval.csv")] == ["5", "10"]
    assert (tmp_path / "runs").exists() and len(os.listdir(tmp_path / "runs")) == 1  # no new run folder
    out = run_script("shacpp.py", ["--checkpoint", run_dir, "--episodes", "20", "--num-steps", "4"], tmp_path)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        f"error: --num-steps 4 contradicts the checkpoint's run (3 in {run_dir}/args.json); leave the flag out"]


def test_signal_during_model_training_stops_within_seconds(tmp_path):
    """A SIGTERM in a long model-training phase ends the run after the current minibatch, with last.pt written
    and exit status 143 (128 + SIGTERM) so that a scheduler can tell a preempted run from a finished one."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "shacpp.py"), *TINY, "--episodes", "1000",
                             "--model-every", "1", "--model-epochs", "100000", "--model-minibatch", "2",
                             "--exp-name", "long"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    line, deadline = "", time.time() + 120
    while not line.startswith("run ") and time.time() < deadline:  # the run has started: its first episode's
        line = proc.stdout.readline()  # rollout takes milliseconds, then the models train on thousands of minibatches
    time.sleep(2.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 15 and proc.returncode == 143 and "Traceback" not in err, err
    assert "stopped by SIGTERM at episode 1" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs/*"))
    assert torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["episode"] == 1
    assert not os.path.exists(os.path.join(run_dir, "finished"))


def test_wall_clock_checkpoint_and_best_on_resume(tmp_path, monkeypatch):
    """last.pt is written once CHECKPOINT_SECONDS have passed, not only at evaluations; a resumed run knows its
    best evaluation (the progress line shows it) and its elapsed time."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bookkeeping, "CHECKPOINT_SECONDS", 0.0)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = bookkeeping.Run(ppo.Args(), dict(net=nn.Linear(2, 2)), None, "ppo", ppo.__file__)
        run.log_train(1, dict(train_return=0.5))
        assert torch.load(os.path.join(run.dir, "last.pt"), weights_only=True)["episode"] == 1
        run.log_eval(2, dict(normalized_return=0.25, solved_fraction=0.0))
        run.save("last.pt", 2)
        state = torch.load(os.path.join(run.dir, "last.pt"), weights_only=True)
        resumed = bookkeeping.Run(ppo.Args(checkpoint=os.path.join(run.dir, "last.pt")), dict(net=nn.Linear(2, 2)),
                                  state, "ppo", ppo.__file__)
        assert resumed.best == 0.25 and resumed.episode == 2 and time.time() - resumed.start >= state["elapsed"]
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
