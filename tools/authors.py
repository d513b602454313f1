# Run the authors' released SHAC++ (https://github.com/f14-bertolotti/shacpp, their algorithm `shacwm`) from a
# checkout of it, with shacpp.py's flag names and defaults, into a run folder like ours (args.json, eval.csv,
# train.csv) that plot.py overlays on our runs. Their code runs unmodified, imported from the checkout at run time:
# it has no licence, so this project holds none of it (docs/authors.md).
#   python tools/authors.py --checkout DIR [--scenario S --n-agents n --arch mlp|transformer ...]
# How: their command line (src/experiments.py ... run --alg-name shacwm ...) gets the flags it has; the settings it
# lacks (caches, epochs, minibatches, architecture ...) are set on their config object experiments.configs.shacwm
# first, as their `modelcfg` command does. Five hooks, installed at run time, record what their code computes:
# their trainer (the clock starts there, as ours starts after the networks are built), their rollout function in
# the trainer (the training returns) and in their evaluation (the evaluation environments right after its reset,
# where our max_return is taken), the last model phase of an episode (the train.csv row) and their evaluation (the
# eval.csv row).
import ast
import json
import logging
import os
import runpy
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # their deterministic mode on CUDA needs it (makefile)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's root: shacpp.py and bookkeeping.py

import torch  # noqa: E402
import tyro  # noqa: E402

from bookkeeping import FINISHED, SIGNAL_EXIT, provenance, write_row  # noqa: E402
from scenarios import max_return  # noqa: E402

REPOSITORY = "https://github.com/f14-bertolotti/shacpp"


@dataclass
class Args:
    checkout: str = ""
    """the authors' code: the folder of a clone of their repository, which holds src/experiments.py
    (default: $SHACPP_AUTHORS_CHECKOUT)"""
    exp_name: str = "authors"
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """their --seed (python, numpy, torch; their training and evaluation environments both get this seed)"""
    torch_deterministic: bool = True
    """their --deterministic: torch.use_deterministic_algorithms"""
    cuda: bool = True
    """their --device cuda:0 when CUDA is available, else cpu"""
    compile: bool = True
    """their --compile (torch.compile of their networks), on CUDA only: on CPU it is always off"""
    scenario: Literal["dispersion", "transport", "discovery", "sampling"] = "dispersion"
    """the VMAS scenario (their --env-name; their versions of the scenarios)"""
    n_agents: int = 1
    """number of agents (their --agents)"""
    arch: Literal["mlp", "transformer"] = "mlp"
    """policy, value and reward networks (their policy_nn, value_nn, reward_nn; mlp with hidden size 32 n, as their
    makefile sets it); the world model is their transformer in both"""
    episodes: int = 20000
    """number of training episodes (their --episodes is one more: their loop stops one short of it)"""
    num_envs: int = 512
    """number of parallel training environments (their --train-envs)"""
    num_steps: int = 32
    """steps per rollout, the horizon (their --train-steps)"""
    reset_every: int = 10
    """their --etr: the training environments are reset at episode 1 and every episode divisible by it"""
    eval_every: int = 100
    """their --etv: evaluate every this many episodes; and, as ours, once more at the end"""
    eval_envs: int = 512
    """number of evaluation environments (their --eval-envs)"""
    eval_steps: int = 512
    """steps per evaluation rollout (their --eval-steps)"""
    stop_fraction: float = 0.9
    """early stop when this fraction of evaluation environments ... (their --early-stopping, second value; their
    rule counts every step's reward against their own max reward) ..."""
    stop_return: float = 0.9
    """... reaches this fraction of its max_return (their --early-stopping, first value; with ours, solved_fraction)"""
    run_dir: str = ""
    """the run folder (default: runs/<scenario>__<n_agents>__<arch>__<exp_name>__<seed>__<unix time>); their own
    files go into its subfolder authors/"""

    learning_rate: float = 1e-3
    """Adam learning rate of every network (their policy_, value_, reward_ and world_learning_rate)"""
    gamma: float = 0.99
    """discount factor (their --gamma)"""
    lam: float = 0.95
    """lambda of the TD(lambda) value targets (their --lambda)"""
    alpha: float = 1.0
    """weight of the action-bound penalty (their --out-coeff)"""
    max_grad_norm: float = 1.0
    """gradient norm clip of the policy step (their policy_clip_coefficient)"""
    policy_dropout: float | None = None
    """dropout of their policy network while training (their policy_dropout; None: their config's, 0.1; ours has no
    dropout). Their evaluation switches it off"""
    model_every: int = 10
    """train the world, reward and value models every this many episodes (their world_, reward_ and value_ett)"""
    model_epochs: int = 10
    """epochs over its cache each time a model trains (their world_, reward_ and value_epochs)"""
    model_minibatch: int = 1000
    """minibatch size of the world, reward and value training (their world_, reward_ and value_batch_size)"""
    world_cache: int = 30000
    """capacity of the world cache, whole rollouts (their world_cache_size)"""
    world_bins: int = 25
    """bins of the world cache (their world_bins)"""
    reward_cache: int = 30000
    """capacity of the reward cache (their reward_cache_size)"""
    reward_bins: int = 9
    """bins of the reward cache (their reward_bins)"""
    value_cache: int = 30000
    """capacity of the value cache (their value_cache_size)"""
    value_bins: int = 9
    """bins of the value cache (their value_bins)"""
    set: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """NAME=VALUE, repeatable: any other attribute of their config object experiments.configs.shacwm, for
    ablations, e.g. --set world_dropout=0.1 --set policy_var=0.25 (VALUE as a Python literal, else a string)"""


# our flag -> the attributes of their config it sets (--episodes, --arch, --cuda, --compile, the stop rule: below)
CONFIG = {
    "seed": ("seed",), "torch_deterministic": ("is_deterministic",), "scenario": ("env_name",),
    "n_agents": ("agents",), "num_envs": ("train_envs",), "num_steps": ("train_steps",), "reset_every": ("etr",),
    "eval_every": ("etv",), "eval_envs": ("eval_envs",), "eval_steps": ("eval_steps",),
    "learning_rate": tuple(f"{m}_learning_rate" for m in ("policy", "value", "reward", "world")),
    "gamma": ("gamma_factor",), "lam": ("lambda_factor",), "alpha": ("out_coefficient",),
    "max_grad_norm": ("policy_clip_coefficient",), "policy_dropout": ("policy_dropout",),
    "model_epochs": ("world_epochs", "reward_epochs", "value_epochs"),
    "model_minibatch": ("world_batch_size", "reward_batch_size", "value_batch_size"),
    "model_every": ("world_ett", "reward_ett", "value_ett"),
    **{f"{m}_cache": (f"{m}_cache_size",) for m in ("world", "reward", "value")},
    **{f"{m}_bins": (f"{m}_bins",) for m in ("world", "reward", "value")},
}
ARCH = tuple(f"{m}_{k}" for m in ("policy", "value", "reward") for k in ("nn", "hidden_size"))
# what their `run` command assigns from its own flags (defaults included): --set cannot reach these
THEIR_FLAGS = ("compile", "device", "env_name", "agents", "episodes", "seed", "etr", "etv", "var", "train_envs",
               "train_steps", "eval_envs", "eval_steps", "gamma_factor", "lambda_factor", "is_deterministic",
               "out_coefficient", "early_stopping", "restore_path", "log_grads", "dir")


def fail(message: str):
    sys.exit(f"error: {message}")


def parse_args() -> Args:
    """tyro.cli (a bad flag or a value of the wrong type is reported by tyro), then what it cannot check."""
    args = tyro.cli(Args)
    args.checkout = args.checkout or os.environ.get("SHACPP_AUTHORS_CHECKOUT", "")
    if not args.checkout:
        fail(f"no checkout of the authors' code: give --checkout DIR (git clone {REPOSITORY} DIR)")
    if not os.path.isdir(args.checkout):
        fail(f"--checkout {args.checkout} is not a folder (git clone {REPOSITORY} DIR)")
    if not os.path.isfile(os.path.join(args.checkout, "src", "experiments.py")):
        fail(f"--checkout {args.checkout} holds no src/experiments.py: not a checkout of {REPOSITORY}")
    args.checkout = os.path.abspath(args.checkout)
    for name, value in asdict(args).items():  # every count, size and interval (not the seed) is >= 1
        if type(value) is int and name != "seed" and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("world", "reward", "value"):  # their caches are split into equal bins
        if getattr(args, f"{name}_cache") < getattr(args, f"{name}_bins"):
            fail(f"--{name}-cache must be at least --{name}-bins")
    if args.eval_steps < args.num_steps:  # their evaluation runs their world model over the first num_steps steps
        fail(f"--eval-steps must be at least --num-steps for their evaluation ({args.eval_steps} < {args.num_steps})")
    for name in ("stop_fraction", "stop_return"):
        if not 0 < getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if args.policy_dropout is not None and not 0 <= args.policy_dropout < 1:
        fail(f"--policy-dropout must be in [0, 1), got {args.policy_dropout}")
    for item in args.set:
        if "=" not in item or not item.split("=", 1)[0].strip():
            fail(f"--set takes NAME=VALUE, got {item!r}")
    return args


def load_their_code(checkout: str):
    """Their config object and their `cli` (click), with their src/ first on the import path."""
    sys.path.insert(0, os.path.join(checkout, "src"))
    try:
        import experiments  # noqa: F401 -- their package: configs, experiments, and through them trainers, models ...
        import evaluate  # noqa: F401
        import trainers  # noqa: F401
        config = experiments.configs.shacwm
        cli = runpy.run_path(os.path.join(checkout, "src", "experiments.py"), run_name="authors_experiments")["cli"]
    except ModuleNotFoundError as e:
        fail(f"the authors' code needs the module {e.name}: pip install click tqdm (and their requirements.txt)")
    except (ImportError, AttributeError, KeyError) as e:
        fail(f"{checkout} is not a checkout of {REPOSITORY} this tool knows: {' '.join(str(e).split())}")
    return config, cli


def commit_of(checkout: str):
    """The checkout's git commit, or None (not a git clone, or git missing)."""
    try:
        top = subprocess.run(["git", "-C", checkout, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not top or os.path.realpath(top) != os.path.realpath(checkout):  # a folder inside another repository
            return None
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(args: Args, config, device: str, folder: str) -> tuple[list[str], dict, dict]:
    """Set what their command line lacks on their config object, and the --set values; returns their command line for
    the rest, what was set on the config, and the --set values."""
    settings = {their: getattr(args, ours) for ours, names in CONFIG.items() for their in names}
    hidden = 32 * args.n_agents if args.arch == "mlp" else None  # their makefile: mlp hidden size 32 n
    for model in ("policy", "value", "reward"):
        settings[f"{model}_nn"] = args.arch
        if hidden is not None:
            settings[f"{model}_hidden_size"] = hidden
    extra = {}
    for item in args.set:
        name, value = (part.strip() for part in item.split("=", 1))
        ours = [f"--{flag.replace('_', '-')}" for flag, names in CONFIG.items() if name in names]
        if ours or name in settings or name in THEIR_FLAGS:
            fail(f"--set {name}: set by this tool's " + (f"{ours[0]}" if ours else "flags and their command line"))
        if not hasattr(config, name):
            fail(f"--set {name}: their config (experiments.configs.shacwm) has no attribute {name}")
        extra[name] = literal(value)
    missing = [name for name in settings if not hasattr(config, name)]
    if missing:
        fail(f"their config (experiments.configs.shacwm) lacks {', '.join(missing)}: another version of their code?")
    for name, value in (settings | extra).items():
        setattr(config, name, value)
    argv = ["run", "--alg-name", "shacwm", "--env-name", args.scenario, "--agents", str(args.n_agents),
            "--episodes", str(args.episodes + 1), "--seed", str(args.seed), "--etr", str(args.reset_every),
            "--etv", str(args.eval_every), "--compile", str(args.compile and device != "cpu"), "--device", device,
            "--deterministic", str(args.torch_deterministic), "--dir", os.path.join(folder, "authors"),
            "--early-stopping", str(args.stop_return), str(args.stop_fraction), "--out-coeff", str(args.alpha),
            "--lambda", str(args.lam), "--gamma", str(args.gamma), "--train-envs", str(args.num_envs),
            "--train-steps", str(args.num_steps), "--eval-envs", str(args.eval_envs), "--eval-steps",
            str(args.eval_steps)]
    return argv, {k: v for k, v in settings.items() if k not in THEIR_FLAGS} | extra, extra


def terminated(dones: torch.Tensor) -> torch.Tensor:
    """Their rollout's done flags (steps + 1, envs, agents), VMAS's done of each step, to ours: (steps, envs), an
    environment terminated before each step, for good once it has been done (as shacpp.py's done |= dones)."""
    return dones[:-1, :, 0].int().cummax(0).values.bool()


class Recorder:
    """Our logs of their run, fed by the hooks: train.csv per episode, eval.csv per evaluation."""

    def __init__(self, args: Args, folder: str):
        self.args, self.folder = args, folder
        self.start, self.trainer_kwargs = None, None  # set when their trainer starts
        self.episode, self.evaluated = 0, 0  # the last episode trained, the last one evaluated
        self.rollout, self.eval_rollout = None, None

    def elapsed(self) -> float:
        return time.time() - self.start

    def trainer(self, their_trainer):
        def hooked(*a, **kw):
            self.trainer_kwargs, self.start = kw, time.time()
            return their_trainer(*a, **kw)
        return hooked

    def train_unroll(self, their_unroll):
        """Their rollout in the trainer: the training return as ours counts it (team reward of the steps before an
        environment terminated, over the environments alive at the start) and as they count it (every step)."""
        def hooked(*a, **kw):
            data = their_unroll(*a, **kw)
            with torch.no_grad():
                rewards, alive = data["rewards"].detach().sum(-1), ~terminated(data["dones"])  # (T, N)
                live = alive[0]
                ours = ((rewards * alive).sum(0) * live).sum() / live.sum()  # NaN when none is alive
                self.rollout = dict(zip(("train_return", "authors_train_return"),
                                        torch.stack([ours, rewards.sum() / rewards.shape[1]]).tolist()))
            return data
        return hooked

    def eval_unroll(self, their_unroll):
        """Their rollout inside their evaluation: our max_return of the evaluation environments right after their
        reset, and the termination flags (ours counts nothing after an environment terminated)."""
        def hooked(*a, **kw):
            world = kw["world"] if "world" in kw else a[1]
            world.scenario_name, best = self.args.scenario, {}

            def reset(*ra, **rkw):
                out = type(world).reset(world, *ra, **rkw)
                best["max_return"] = max_return(world)
                return out
            world.reset = reset
            try:
                data = their_unroll(*a, **kw)
            finally:
                del world.reset
            self.eval_rollout = dict(dones=data["dones"], **best)
            return data
        return hooked

    def train_row(self, their_routine):
        """Their last model phase of an episode (the value model's): the episode is over, one train.csv row."""
        def hooked(*a, **kw):
            out = their_routine(*a, **kw)
            self.episode = kw["episode"]
            steps = self.episode * self.args.num_envs * self.args.num_steps
            row = dict(episode=self.episode, global_step=steps, time=self.elapsed(), **self.rollout)
            write_row(os.path.join(self.folder, "train.csv"), row)
            return out
        return hooked

    def evaluation(self, their_evaluate):
        """Their evaluation: one eval.csv row, computed as ours (evaluate() in shacpp.py) from the per-environment
        rewards it returns, with our max_return; their own counts follow as authors_* columns."""
        def hooked(*a, **kw):
            began = time.time()
            result = their_evaluate(*a, **kw)
            episode, rollout = kw["episode"], self.eval_rollout
            with torch.no_grad():
                rewards = result["rewards"].sum(-1)  # (steps, envs): team reward
                team = (rewards * ~terminated(rollout["dones"])).sum(0)  # nothing counts after termination (ours)
                theirs, their_best, best = rewards.sum(0), result["max_reward"].float(), rollout["max_return"]
                stop = self.args.stop_return
                values = torch.stack([team.mean(), best.mean(), team.mean() / best.mean(),
                                      (team >= stop * best).float().mean(), theirs.mean(), their_best.mean(),
                                      (theirs >= stop * their_best).float().mean()]).tolist()
            metrics = dict(zip(("eval_return", "max_return", "normalized_return", "solved_fraction", "authors_return",
                                "authors_max_return", "authors_solved_fraction"), values))
            steps = episode * self.args.num_envs * self.args.num_steps
            row = dict(episode=episode, global_step=steps, time=self.elapsed(), **metrics)
            row["eval_time"] = time.time() - began
            write_row(os.path.join(self.folder, "eval.csv"), row)
            print(f"eval episode {episode}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
            self.evaluated = episode
            return result
        return hooked

    def final_evaluation(self, their_evaluate):
        """As ours: one more evaluation at the end when the last episode was not evaluated (their code evaluates only
        every --eval-every episodes), with their evaluation function on their evaluation environments."""
        kw = self.trainer_kwargs
        if kw is None or self.episode != self.args.episodes or self.evaluated == self.episode:
            return
        their_evaluate(episode=self.episode, policy_model=kw["policy_model"], reward_model=kw["reward_model"],
                       world_model=kw["world_model"], world=kw["eval_world"], steps=kw["eval_steps"],
                       envs=kw["eval_envs"], reward_tolerance=kw["reward_tolerance"],
                       world_tolerance=kw["world_tolerance"],
                       logger=logging.getLogger(os.path.join(kw["dir"], "eval.log")))  # their logger, by its name


def main():
    args = parse_args()
    config, cli = load_their_code(args.checkout)
    if args.policy_dropout is None:
        args.policy_dropout = config.policy_dropout
    device = "cuda:0" if args.cuda and torch.cuda.is_available() else "cpu"
    folder = args.run_dir or os.path.join("runs", f"{args.scenario}__{args.n_agents}__{args.arch}__{args.exp_name}__"
                                                  f"{args.seed}__{int(time.time())}")
    if os.path.exists(os.path.join(folder, "authors")):  # their code refuses an existing folder
        fail(f"{os.path.join(folder, 'authors')} exists (an earlier run): remove it or give another --run-dir")
    argv, settings, extra = configure(args, config, device, folder)
    os.makedirs(folder, exist_ok=bool(args.run_dir))
    for name in ("train.csv", "eval.csv", FINISHED):  # a --run-dir used before starts afresh, as ours
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    saved = asdict(args) | dict(set=extra, compile=args.compile and device != "cpu", algorithm="shacpp",
                                implementation="authors", authors_commit=commit_of(args.checkout))
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(saved | provenance(__file__), f, indent=2)

    recorder = Recorder(args, folder)
    trainers, trainer_module, evaluate_module = (sys.modules[m] for m in ("trainers", "trainers.shacwm", "evaluate"))
    trainers.shacwm = recorder.trainer(trainers.shacwm)
    trainers.routines.train_value = recorder.train_row(trainers.routines.train_value)
    trainer_module.unroll = recorder.train_unroll(trainer_module.unroll)
    evaluate_module.unroll = recorder.eval_unroll(evaluate_module.unroll)
    trainer_module.evaluate = recorder.evaluation(trainer_module.evaluate)
    print(f"run {folder} on {device}: the authors' shacwm from {args.checkout}\n  their command: python "
          f"src/experiments.py {' '.join(argv)}\n  their config: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
          flush=True)
    try:
        cli.main(args=argv, prog_name="experiments.py", standalone_mode=False)
        recorder.final_evaluation(trainer_module.evaluate)
    except KeyboardInterrupt:
        print(f"interrupted at episode {recorder.episode}: {folder}", flush=True)
        sys.exit(SIGNAL_EXIT + 2)
    if recorder.evaluated == recorder.episode < args.episodes:
        print(f"early stop at episode {recorder.episode} (their rule: {args.stop_fraction:.0%} of evaluation "
              f"environments at {args.stop_return:.0%} of their max reward, every step's reward counted)")
    with open(os.path.join(folder, FINISHED), "w") as f:
        f.write(f"{recorder.episode}\n")
    print(f"done at episode {recorder.episode} after {recorder.elapsed():.0f} s: {folder}", flush=True)


if __name__ == "__main__":
    main()
