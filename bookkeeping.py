"""Bookkeeping shared by ppo.py, shac.py and shacpp.py (SPEC section 8): the run folder and its CSV logs, checkpoints
(atomic, with every random state), resuming, stop signals, the non-finite update guard, phase clocks and GIFs.
None of it is part of an algorithm, so it lives here once instead of in each training script."""
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict

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


# ---------------------------------------------------------------- checkpoints and failures (SPEC section 8)
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
    """Applies an optimiser step only if the loss and the gradient are finite, and counts the skipped ones."""

    limit = 10  # this many skipped updates in a row end the run

    def __init__(self):
        self.skipped = self.in_row = 0

    def step(self, optimizer, loss, params, max_grad_norm: float = math.inf):
        grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
        if torch.isfinite(loss + grad_norm):  # one host synchronisation per update, never per simulator step
            optimizer.step()
            self.in_row = 0
        else:
            self.skipped, self.in_row = self.skipped + 1, self.in_row + 1
        return grad_norm


class Run:
    """The run's folder, logs, checkpoints and stop requests (SPEC section 8). A new run gets a new folder under
    runs/; a resumed one continues in its checkpoint's folder. Ctrl-C or SIGTERM ends the run after the current
    episode, with last.pt written; a second one aborts at once."""

    def __init__(self, args, modules: dict, checkpoint: dict | None, algorithm: str):
        self.modules, self.args, self.algorithm = modules, args, algorithm  # modules: networks and optimisers by name
        self.episode, self.best = (checkpoint["episode"], checkpoint["best"]) if checkpoint else (0, -math.inf)
        if checkpoint:
            self.dir = os.path.dirname(os.path.abspath(args.checkpoint))
        else:
            self.dir = os.path.join("runs", f"{args.scenario}__{args.n_agents}__{args.arch}__{args.exp_name}__"
                                            f"{args.seed}__{int(time.time())}")
            os.makedirs(self.dir)
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(asdict(args) | {"algorithm": algorithm}, f, indent=2)
        resume = self.episode if checkpoint else None
        self.train_log = CSVLog(os.path.join(self.dir, "train.csv"), resume)
        self.eval_log = CSVLog(os.path.join(self.dir, "eval.csv"), resume)
        self.start = time.time() - (checkpoint["elapsed"] if checkpoint else 0.0)
        self.last_print, self.last_eval, self.stop_signal = time.time(), {}, None
        self.guard = NonFiniteGuard()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.on_signal)

    def on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
        print(f"{self.stop_signal}: stopping after this episode (again to abort at once)", flush=True)

    def save(self, name: str, episode: int):
        """Write a checkpoint atomically: a temporary file, then a rename, so a kill never leaves a broken one."""
        state = dict(algorithm=self.algorithm, **structure(self.args), episode=episode, best=self.best,
                     elapsed=time.time() - self.start, rng=rng_states(),
                     **{name: module.state_dict() for name, module in self.modules.items()})
        path = os.path.join(self.dir, name)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def log_train(self, episode: int, row: dict):
        """One train.csv row; ends the run if updates keep failing; a progress line every 5 seconds."""
        elapsed, global_step = time.time() - self.start, episode * self.args.num_envs * self.args.num_steps
        self.train_log.write(dict(episode=episode, global_step=global_step, time=elapsed, **row,
                                  skipped_updates=self.guard.skipped, sps=global_step / elapsed))
        self.guard.skipped = 0
        if self.guard.in_row >= self.guard.limit:  # last.pt is left as it was: the last good one
            last = os.path.join(self.dir, "last.pt")
            sys.exit(f"error: {self.guard.in_row} updates in a row had a non-finite loss or gradient (episode "
                     f"{episode}); " + (f"the last good checkpoint is {last}" if os.path.exists(last) else
                                        "no checkpoint had been written yet"))
        if time.time() - self.last_print > 5:
            self.last_print = time.time()
            print(f"episode {episode} sps {global_step / elapsed:.0f} train_return {row['train_return']:.3f} "
                  f"last eval {self.last_eval.get('normalized_return', math.nan):.3f}", flush=True)

    def log_eval(self, episode: int, metrics: dict, frames=None) -> bool:
        """One eval.csv row, a GIF with --capture-video, best.pt and last.pt; True when the run should stop early."""
        self.last_eval = metrics
        global_step = episode * self.args.num_envs * self.args.num_steps
        self.eval_log.write(dict(episode=episode, global_step=global_step, time=time.time() - self.start, **metrics))
        print(f"eval episode {episode}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        if frames:
            os.makedirs(os.path.join(self.dir, "videos"), exist_ok=True)
            save_gif(frames, os.path.join(self.dir, "videos", f"episode_{episode}.gif"))
        if metrics["normalized_return"] > self.best:
            self.best = metrics["normalized_return"]
            self.save("best.pt", episode)
        self.save("last.pt", episode)
        if metrics["solved_fraction"] >= self.args.stop_fraction:
            print(f"early stop at episode {episode}: {metrics['solved_fraction']:.0%} of evaluation environments "
                  f"reached {self.args.stop_return:.0%} of max_return")
            return True
        return False

    def finish(self, episode: int):
        """At the end (budget, early stop or a stop signal): last.pt and, with --save-model, the networks alone."""
        self.save("last.pt", episode)
        if self.args.save_model:
            torch.save({name: module.state_dict() for name, module in self.modules.items()
                        if isinstance(module, nn.Module)}, os.path.join(self.dir, "final.pt"))
        reason = f"stopped by {self.stop_signal}" if self.stop_signal else "done"
        print(f"{reason} at episode {episode} after {time.time() - self.start:.0f} s: {self.dir}")
