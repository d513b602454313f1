"""Bookkeeping shared by ppo.py, shac.py and shacpp.py: the run folder and its CSV logs, checkpoints (atomic, with
every random state, at evaluations and every few minutes), resuming from a run folder, stop signals, the non-finite
update guard, the progress line, phase clocks and GIFs. None of it is part of an algorithm, so it lives here once
instead of in each training script; copy it along with a script (docs/usage.md)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.nn as nn
from vmas.simulator.environment import Environment as VmasEnvironment


def render_frame(env):
    """Evaluation environment 0 drawn by VMAS's own renderer, as an (H, W, 3) uint8 array (headless via EGL)."""
    import matplotlib.cm
    if not hasattr(matplotlib.cm, "get_cmap"):  # VMAS's sampling renderer calls cm.get_cmap, gone in matplotlib 3.9
        matplotlib.cm.get_cmap = lambda name, lut=None: matplotlib.colormaps[name].resampled(lut)
    return env.render(mode="rgb_array", env_index=0, visualize_when_rgb=False)


def save_gif(frames, path: str):
    """Frames (H, W, 3) to an animated GIF at 25 frames per second, with Pillow (already a matplotlib dependency)."""
    from PIL import Image
    images = [Image.fromarray(frame).resize((frame.shape[1] // 2, frame.shape[0] // 2)) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


class CSVLog:
    """Appends rows to a CSV file; the columns are fixed by the first row. Resuming at episode k keeps the
    file's header and its rows up to episode k (the later ones are about to be written again)."""

    def __init__(self, path: str, resume_episode: int | None = None):
        self.path, self.columns = path, None
        if resume_episode is not None and os.path.exists(path):
            with open(path) as f:
                header, *rows = f.readlines()
            self.columns = header.strip().split(",")
            with open(path, "w") as f:
                f.writelines([header, *(r for r in rows if int(r.split(",", 1)[0]) <= resume_episode)])

    def last_row(self) -> dict:
        """The last complete row as numbers ({} for none): a resumed run's last evaluation."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            lines = f.read().splitlines()
        if len(lines) < 2 or len(lines[-1].split(",")) != len(lines[0].split(",")):
            return {}
        return {k: float(v) for k, v in zip(lines[0].split(","), lines[-1].split(","))}

    def write(self, row: dict):
        with open(self.path, "a") as f:
            if self.columns is None:
                self.columns = list(row)
                f.write(",".join(self.columns) + "\n")
            f.write(",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in self.columns) + "\n")


def clock(device) -> float:
    """Seconds, once the device has finished its queued work: per-phase timings, a few per episode."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- checkpoints and failures (docs/usage.md)
def rng_states() -> dict:
    """Every random state of a run: Python, NumPy, torch (CPU and CUDA) and VMAS's own, which VMAS swaps in around
    each reset and step. NumPy states are kept as plain lists, so checkpoints load with weights_only=True."""
    def plain(np_state):
        return (np_state[0], np_state[1].tolist(), *np_state[2:])
    vmas_torch, vmas_numpy, vmas_python = VmasEnvironment.vmas_random_state
    return dict(python=random.getstate(), numpy=plain(np.random.get_state()), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                vmas=(vmas_torch, plain(vmas_numpy), vmas_python))


def set_rng_states(rng: dict):
    def array(np_state):
        return (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])
    random.setstate(rng["python"])
    np.random.set_state(array(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    VmasEnvironment.vmas_random_state[:] = [rng["vmas"][0], array(rng["vmas"][1]), rng["vmas"][2]]


# what a checkpoint must share with a run to resume or evaluate it (world_residual: shacpp.py; actor, norm_obs: ppo.py)
STRUCTURE = ("scenario", "n_agents", "arch", "world_residual", "actor", "norm_obs")
CHECKPOINT_SECONDS = 300  # last.pt at least this often, besides every evaluation: a kill loses minutes, not hours
FINISHED = "finished"  # a file in the run folder, written when the run ends by its budget or by early stopping
SIGNAL_EXIT = 128  # a run stopped by a signal exits with 128 + its number (130 SIGINT, 143 SIGTERM), as shells do


def given_flags(argv: list[str]) -> set[str]:
    """Field names set on the command line: --n-agents 3, --n-agents=3, --world-residual, --no-world-residual."""
    names = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    return names | {name[3:] for name in names if name.startswith("no_")}


def resume_args(args, argv: list[str]):
    """--checkpoint: a run folder stands for its last.pt, and the run's own arguments (its args.json) fill in every
    flag not given on the command line, so a resume or an evaluation needs no retyping. A given flag that would
    change the networks' shape (STRUCTURE, and shacpp's --num-steps, the world model's horizon) is refused."""
    path = os.path.join(args.checkpoint, "last.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    saved_path = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
    if not os.path.isfile(saved_path):  # a checkpoint moved out of its run folder: the command line as given
        return replace(args, checkpoint=path)
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        sys.exit(f"error: {saved_path} is not readable JSON")
    given, shaping = given_flags(argv), (*STRUCTURE, "dynamics", *(("num_steps",) if "world_residual" in saved else ()))
    updates = {}
    for field in fields(args):
        name, ours = field.name, getattr(args, field.name)
        if name == "checkpoint" or name not in saved:
            continue
        if name not in given:
            updates[name] = saved[name]
        elif name in shaping and ours != saved[name]:
            sys.exit(f"error: --{name.replace('_', '-')} {ours} contradicts the checkpoint's run ({saved[name]} in "
                     f"{saved_path}); leave the flag out")
    return replace(args, checkpoint=path, **updates)


def provenance(script: str) -> dict:
    """What args.json records besides the arguments: the script, the git commit and the library versions."""
    import vmas
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(script)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(script=os.path.basename(script), git_commit=commit, torch=torch.__version__, vmas=vmas.__version__)


def structure(args) -> dict:
    return {key: getattr(args, key) for key in STRUCTURE if hasattr(args, key)}


def load_checkpoint(path: str, args, modules: dict, algorithm: str) -> dict:
    """Load networks, optimisers and RNG states into `modules` (name -> object with load_state_dict), after checking
    that the checkpoint is readable and was written by `algorithm` for the same scenario, agents, architecture (and,
    for shacpp.py, world-model parametrisation)."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        episode, rng = state["episode"], state["rng"]
    except Exception:
        sys.exit(f"error: checkpoint {path} is truncated or not a checkpoint")
    for key, ours in (("algorithm", algorithm), *structure(args).items()):
        if state.get(key) != ours:
            sys.exit(f"error: checkpoint {path} was written with {key} {state.get(key)}, not {ours}")
    if args.episodes and args.episodes <= episode:
        sys.exit(f"error: checkpoint {path} is at episode {episode}: --episodes must be larger to resume")
    try:
        for name, module in modules.items():
            module.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError) as e:  # e.g. shacpp's world model saved for another --num-steps
        sys.exit(f"error: checkpoint {path} does not fit these networks: {' '.join(str(e).split())}")
    set_rng_states(rng)
    return state


def report_evaluation(checkpoint: str, metrics: dict, frames=None):
    """--episodes 0: print the evaluation of a checkpoint and, with frames (--capture-video), write <checkpoint>.gif."""
    print(f"{checkpoint}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if frames:
        save_gif(frames, os.path.splitext(checkpoint)[0] + ".gif")
        print(f"wrote {os.path.splitext(checkpoint)[0]}.gif")


class NonFiniteGuard:
    """`if guard.finite(loss, grad_norm): optimizer.step()`: an update with a non-finite loss or gradient is skipped
    and counted; this many in a row end the run (Run.log_train) with last.pt left as the last good one."""

    limit = 10

    def __init__(self):
        self.skipped = self.in_row = 0

    def finite(self, loss, grad_norm=0.0) -> bool:
        ok = bool(torch.isfinite(loss + grad_norm))  # one host synchronisation per update, never per simulator step
        self.skipped, self.in_row = (self.skipped, 0) if ok else (self.skipped + 1, self.in_row + 1)
        return ok


def duration(seconds: float) -> str:
    """4h05m, 12m30s, 45s."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


class Run:
    """The run's folder, logs, checkpoints and stop requests. A new run gets a new folder under runs/ (or the one
    --run-dir names); a resumed one continues in its checkpoint's folder. Ctrl-C or SIGTERM ends the run within
    seconds (after the current episode, or the current minibatch of a model-training phase), with last.pt written,
    and the script exits with 128 + the signal's number; a second signal aborts at once."""

    def __init__(self, args, modules: dict, checkpoint: dict | None, algorithm: str, script: str):
        self.modules, self.args, self.algorithm = modules, args, algorithm  # modules: networks and optimisers by name
        self.episode, self.best = (checkpoint["episode"], checkpoint["best"]) if checkpoint else (0, -math.inf)
        if checkpoint:
            self.dir = os.path.dirname(os.path.abspath(args.checkpoint))
        else:  # a new run; a folder given with --run-dir (sweep.py) that holds no checkpoint starts afresh
            self.dir = args.run_dir or os.path.join("runs", f"{args.scenario}__{args.n_agents}__{args.arch}__"
                                                            f"{args.exp_name}__{args.seed}__{int(time.time())}")
            os.makedirs(self.dir, exist_ok=bool(args.run_dir))
            for name in ("train.csv", "eval.csv", FINISHED):
                if os.path.exists(os.path.join(self.dir, name)):
                    os.remove(os.path.join(self.dir, name))
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(asdict(args) | {"algorithm": algorithm} | provenance(script), f, indent=2)
        resume = self.episode if checkpoint else None
        self.train_log = CSVLog(os.path.join(self.dir, "train.csv"), resume)
        self.eval_log = CSVLog(os.path.join(self.dir, "eval.csv"), resume)
        self.start = time.time() - (checkpoint["elapsed"] if checkpoint else 0.0)
        self.last_eval = self.eval_log.last_row()  # a resumed run shows its last evaluation
        self.stop_signal, self.phases = None, {}
        self.last_print = self.last_save = self.session_start = time.time()
        self.last_step = (self.last_print, self.episode)
        self.guard = NonFiniteGuard()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.on_signal)

    def on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum)
        signal.signal(signum, signal.SIG_DFL)
        print(f"{self.stop_signal.name}: stopping within seconds (again to abort at once)", flush=True)

    def phase(self, name: str, text: str):
        """A line before a model-training phase that took more than a few seconds last time (or has not run yet);
        call again with text None when it ends."""
        if text is None:
            self.phases[name] = time.time() - self.phases[name]
        else:
            if self.phases.get(name, math.inf) > 3:
                print(text, flush=True)
            self.phases[name] = time.time()

    def save(self, name: str, episode: int):
        """Write a checkpoint atomically: a temporary file, then a rename, so a kill never leaves a broken one."""
        state = dict(algorithm=self.algorithm, **structure(self.args), episode=episode, best=self.best,
                     elapsed=time.time() - self.start, rng=rng_states(),
                     **{name: module.state_dict() for name, module in self.modules.items()})
        path = os.path.join(self.dir, name)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.last_save = time.time()

    def log_train(self, episode: int, row: dict):
        """One train.csv row; ends the run if updates keep failing; last.pt every few minutes; a progress line every
        5 seconds: episode k / total, elapsed and time left, steps per second since the last line, training return,
        the last evaluation (and its episode) and the next one's episode."""
        now, steps_per_episode = time.time(), self.args.num_envs * self.args.num_steps
        elapsed, global_step = now - self.start, episode * steps_per_episode
        self.train_log.write(dict(episode=episode, global_step=global_step, time=elapsed, **row,
                                  skipped_updates=self.guard.skipped, sps=global_step / elapsed))
        self.guard.skipped = 0
        if self.guard.in_row >= self.guard.limit:  # last.pt is left as it was: the last good one
            last = os.path.join(self.dir, "last.pt")
            sys.exit(f"error: {self.guard.in_row} updates in a row had a non-finite loss or gradient (episode "
                     f"{episode}); " + (f"the last good checkpoint is {last}" if os.path.exists(last) else
                                        "no checkpoint had been written yet"))
        if now - self.last_save > CHECKPOINT_SECONDS:
            self.save("last.pt", episode)
        if now - self.last_print > 5:
            done, total = episode - self.episode, self.args.episodes - self.episode  # in this session
            left = (now - self.session_start) / max(done, 1) * (total - done)
            sps = (episode - self.last_step[1]) * steps_per_episode / (now - self.last_step[0])
            evaluated = (f"eval {self.last_eval['normalized_return']:.3f} at {int(self.last_eval['episode'])}"
                         if self.last_eval else "no eval yet")
            upcoming = min((episode // self.args.eval_every + 1) * self.args.eval_every, self.args.episodes)
            print(f"episode {episode}/{self.args.episodes} | {duration(elapsed)} elapsed, ~{duration(left)} left | "
                  f"{sps:,.0f} steps/s | train return {row['train_return']:.3f} | {evaluated}, next at {upcoming}",
                  flush=True)
            self.last_print, self.last_step = now, (now, episode)

    def log_eval(self, episode: int, metrics: dict, frames=None):
        """One eval.csv row, a GIF with --capture-video, best.pt and last.pt."""
        global_step = episode * self.args.num_envs * self.args.num_steps
        self.last_eval = dict(episode=episode, **metrics)
        self.eval_log.write(dict(episode=episode, global_step=global_step, time=time.time() - self.start, **metrics))
        print(f"eval episode {episode}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        if frames:
            os.makedirs(os.path.join(self.dir, "videos"), exist_ok=True)
            save_gif(frames, os.path.join(self.dir, "videos", f"episode_{episode}.gif"))
        if metrics["normalized_return"] > self.best:
            self.best = metrics["normalized_return"]
            self.save("best.pt", episode)
        self.save("last.pt", episode)

    def finish(self, episode: int):
        """At the end (budget, early stop or a stop signal): last.pt and, with --save-model, the networks alone.
        A stop by a signal exits with 128 + its number, so a scheduler can tell it from a finished run."""
        self.save("last.pt", episode)
        if self.args.save_model:
            torch.save({name: module.state_dict() for name, module in self.modules.items()
                        if isinstance(module, nn.Module)}, os.path.join(self.dir, "final.pt"))
        if not self.stop_signal:  # the mark of a finished run (budget or early stop): sweep.py skips it
            with open(os.path.join(self.dir, FINISHED), "w") as f:
                f.write(f"{episode}\n")
        reason = f"stopped by {self.stop_signal.name}" if self.stop_signal else "done"
        print(f"{reason} at episode {episode} after {time.time() - self.start:.0f} s: {self.dir}", flush=True)
        if self.stop_signal:
            sys.exit(SIGNAL_EXIT + self.stop_signal.value)
