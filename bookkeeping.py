"""Run plumbing for ppo.py, shac.py and shacpp.py (copy it along with a script): argument checks, seeding, the run
folder with its CSV logs, atomic checkpoints with every random state, resuming, stop signals, the non-finite update
guard and GIFs. No algorithm lives here; a script names what a checkpoint must share with it in `Args.STRUCTURE`."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import tyro
from vmas.simulator.environment import Environment as VmasEnvironment

CHECKPOINT_SECONDS = 300  # last.pt at least this often, besides every evaluation: a kill loses minutes, not hours
FINISHED = "finished"  # a file in the run folder, written when the run ends by its budget or by early stopping
SIGNAL_EXIT = 128  # a run stopped by a signal exits with 128 + its number (130 SIGINT, 143 SIGTERM), as shells do


def clock(device) -> float:
    """Seconds, once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def render_frame(env):
    """Environment 0 drawn by VMAS's renderer, as an (H, W, 3) uint8 array."""
    import matplotlib.cm
    if not hasattr(matplotlib.cm, "get_cmap"):  # VMAS's sampling renderer calls cm.get_cmap, gone in matplotlib 3.9
        matplotlib.cm.get_cmap = lambda name, lut=None: matplotlib.colormaps[name].resampled(lut)
    return env.render(mode="rgb_array", env_index=0, visualize_when_rgb=False)


def save_gif(frames, path: str):
    from PIL import Image
    images = [Image.fromarray(frame).resize((frame.shape[1] // 2, frame.shape[0] // 2)) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


def report_evaluation(checkpoint: str, metrics: dict, frames=None):
    """--episodes 0: print a checkpoint's evaluation and, with frames, write <checkpoint>.gif."""
    print(f"{checkpoint}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if frames:
        save_gif(frames, os.path.splitext(checkpoint)[0] + ".gif")
        print(f"wrote {os.path.splitext(checkpoint)[0]}.gif")


def parse_args(Args):
    """tyro.cli, then the ranges it cannot check (Args.MAY_BE_ZERO, Args.AT_MOST_ONE). --checkpoint: every flag not
    given comes from the run's args.json; a given one of Args.STRUCTURE must agree with it."""
    args = tyro.cli(Args)
    if args.checkpoint:
        path = os.path.join(args.checkpoint, "last.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
        saved_path, saved = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json"), {}
        try:  # a checkpoint moved out of its run folder: the command line as given
            saved = json.load(open(saved_path)) if os.path.isfile(saved_path) else {}
        except (OSError, ValueError):
            sys.exit(f"error: {saved_path} is not readable JSON")
        names = {f.name for f in fields(Args)} - {"checkpoint"}
        args = tyro.cli(Args, default=Args(**{k: v for k, v in saved.items() if k in names}, checkpoint=path))
        for name in (n for n in Args.STRUCTURE if n in saved and getattr(args, n) != saved[n]):  # a flag given
            sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)} contradicts the checkpoint's run "
                     f"({saved[name]} in {saved_path}); leave the flag out")
        args.checkpoint = path
    for name, value in asdict(args).items():
        flag, zero, high = "--" + name.replace("_", "-"), name in Args.MAY_BE_ZERO, name in Args.AT_MOST_ONE
        if type(value) is int and name not in ("seed", "episodes") and value < 1:  # counts, sizes and intervals
            sys.exit(f"error: {flag} must be at least 1, got {value}")
        if type(value) is float and not (0 < value <= (1.0 if high else math.inf) or (zero and value == 0)):
            sys.exit(f"error: {flag} must be in {'[' if zero else '('}0, {'1]' if high else 'inf)'}, got {value}")
    if args.episodes < 0 or (args.episodes == 0 and not args.checkpoint):
        sys.exit(f"error: --episodes must be at least 1 (0, evaluation only, needs --checkpoint), got {args.episodes}")
    return args


def load_checkpoint(path: str, args, modules: dict, algorithm: str) -> dict:
    """Networks, optimisers and random states into `modules`, from a checkpoint of `algorithm` and Args.STRUCTURE."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        episode, rng = state["episode"], state["rng"]
    except Exception:
        sys.exit(f"error: checkpoint {path} is truncated or not a checkpoint")
    for key, ours in (("algorithm", algorithm), *((k, getattr(args, k)) for k in args.STRUCTURE if k in state)):
        if state.get(key) != ours:
            sys.exit(f"error: checkpoint {path} was written with {key} {state.get(key)}, not {ours}")
    if args.episodes and args.episodes <= episode:
        sys.exit(f"error: checkpoint {path} is at episode {episode}: --episodes must be larger to resume")
    try:
        for name, module in modules.items():
            module.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError) as e:  # e.g. networks of another size
        sys.exit(f"error: checkpoint {path} does not fit these networks: {' '.join(str(e).split())}")
    array = lambda s: (s[0], np.array(s[1], dtype=np.uint32), *s[2:])  # noqa: E731  (NumPy's state, saved as a list)
    random.setstate(rng["python"])
    np.random.set_state(array(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    VmasEnvironment.vmas_random_state[:] = [rng["vmas"][0], array(rng["vmas"][1]), rng["vmas"][2]]
    return state


def provenance(script: str) -> dict:
    """What args.json records besides the arguments: the script, its git commit and the library versions."""
    import vmas
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(script)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(script=os.path.basename(script), git_commit=commit, torch=torch.__version__, vmas=vmas.__version__)


def write_row(path: str, row: dict):
    """Append a row to a CSV file, with a header line first if the file is new. Every row must have the header's
    columns in its order (so a run is resumed by the script version that started it)."""
    with open(path, "a") as f:
        if f.tell() == 0:  # a new file
            f.write(",".join(row) + "\n")
        f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n")


class NonFiniteGuard:
    """`if guard.finite(loss, grad_norm): optimizer.step()` skips and counts an update that is not finite."""
    limit, skipped, in_row = 10, 0, 0  # limit: this many in a row end the run (Run.check_finite)

    def finite(self, loss, grad_norm=0.0) -> bool:
        ok = bool(torch.isfinite(loss + grad_norm))
        self.skipped, self.in_row = (self.skipped, 0) if ok else (self.skipped + 1, self.in_row + 1)
        return ok


class Run:
    """The run folder (new under runs/, the one --run-dir names, or a resumed checkpoint's), its logs and
    checkpoints. Ctrl-C or SIGTERM sets stop_signal: the script ends the run within seconds; a second one aborts."""

    def __init__(self, args, modules: dict, checkpoint: dict | None, algorithm: str, script: str):
        self.modules, self.args, self.algorithm = modules, args, algorithm  # modules: networks and optimisers
        state = checkpoint or dict(episode=0, best=-math.inf, elapsed=0.0)
        self.episode, self.best = state["episode"], state["best"]  # best: the best evaluation's normalized_return
        new = f"runs/{args.scenario}__{args.n_agents}__{args.arch}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.dir = os.path.dirname(os.path.abspath(args.checkpoint)) if checkpoint else (args.run_dir or new)
        os.makedirs(self.dir, exist_ok=bool(checkpoint or args.run_dir))
        for name in ("train.csv", "eval.csv", FINISHED):  # resuming keeps the rows up to its episode; else none
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path) as f:
                    rows = f.readlines() if checkpoint and name != FINISHED else []
                os.remove(path)
                if rows:
                    with open(path, "w") as f:
                        f.writelines(rows[:1] + [r for r in rows[1:] if int(r.split(",", 1)[0]) <= self.episode])
        if not checkpoint:
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(asdict(args) | {"algorithm": algorithm} | provenance(script), f, indent=2)
        self.start, self.last_print, self.last_save = time.time() - state["elapsed"], 0.0, time.time()
        self.stop_signal, self.guard = None, NonFiniteGuard()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.on_signal)

    def on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum)
        signal.signal(signum, signal.SIG_DFL)
        print(f"{self.stop_signal.name}: stopping within seconds (again to abort at once)", flush=True)

    def save(self, name: str, episode: int):
        """A checkpoint with every random state, written to a temporary file and renamed: a kill leaves none broken."""
        plain = lambda s: (s[0], s[1].tolist(), *s[2:])  # noqa: E731  (NumPy's states as lists: weights_only loads)
        vmas_torch, vmas_numpy, vmas_python = VmasEnvironment.vmas_random_state
        rng = dict(python=random.getstate(), numpy=plain(np.random.get_state()), torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                   vmas=(vmas_torch, plain(vmas_numpy), vmas_python))
        state = dict(algorithm=self.algorithm, **{k: getattr(self.args, k) for k in self.args.STRUCTURE},
                     episode=episode, best=self.best, elapsed=time.time() - self.start, rng=rng,
                     **{name: module.state_dict() for name, module in self.modules.items()})
        path = os.path.join(self.dir, name)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.last_save = time.time()

    def log_train(self, episode: int, row: dict):
        """A train.csv row, last.pt every few minutes, and a progress line every 5 seconds (the first at once)."""
        now, steps = time.time(), episode * self.args.num_envs * self.args.num_steps
        write_row(os.path.join(self.dir, "train.csv"), dict(episode=episode, global_step=steps, time=now - self.start,
                                                            **row, skipped_updates=self.guard.skipped,
                                                            sps=steps / (now - self.start)))
        self.guard.skipped = 0
        if now - self.last_save > CHECKPOINT_SECONDS:
            self.save("last.pt", episode)
        if now - self.last_print > 5:
            best = f"best eval {self.best:.3f}" if self.best > -math.inf else "no eval yet"
            print(f"episode {episode}/{self.args.episodes} | {(now - self.start) / 60:.1f} min | train return "
                  f"{row['train_return']:.3f} | {best}", flush=True)
            self.last_print = now

    def log_eval(self, episode: int, metrics: dict, frames=None):
        """An eval.csv row, a GIF with --capture-video, best.pt and last.pt."""
        global_step = episode * self.args.num_envs * self.args.num_steps
        write_row(os.path.join(self.dir, "eval.csv"), dict(episode=episode, global_step=global_step,
                                                           time=time.time() - self.start, **metrics))
        print(f"eval episode {episode}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        if frames:
            os.makedirs(os.path.join(self.dir, "videos"), exist_ok=True)
            save_gif(frames, os.path.join(self.dir, "videos", f"episode_{episode}.gif"))
        if metrics["normalized_return"] > self.best:
            self.best = metrics["normalized_return"]
            self.save("best.pt", episode)
        self.save("last.pt", episode)

    def check_finite(self, episode: int):
        """End the run, with last.pt left as the last good one, after NonFiniteGuard.limit bad updates in a row."""
        if self.guard.in_row >= self.guard.limit:
            path = os.path.join(self.dir, "last.pt")
            last = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written yet"
            sys.exit(f"error: {self.guard.in_row} updates in a row had a non-finite loss or gradient (episode "
                     f"{episode}); {last}")

    def finish(self, episode: int):
        """last.pt, and the `finished` mark unless a signal stopped the run (which then exits with 128 + its number)."""
        self.save("last.pt", episode)
        if not self.stop_signal:
            with open(os.path.join(self.dir, FINISHED), "w") as f:
                f.write(f"{episode}\n")
        reason = f"stopped by {self.stop_signal.name}" if self.stop_signal else "done"
        print(f"{reason} at episode {episode} after {time.time() - self.start:.0f} s: {self.dir}", flush=True)
        if self.stop_signal:
            sys.exit(SIGNAL_EXIT + self.stop_signal.value)
