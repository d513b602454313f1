# Sweeps: a grid of training runs (scripts x scenarios x agent counts x architectures x seeds) on a local pool of
# workers or as a SLURM job array, in the manner of CleanRL's benchmark utility. Not to be confused with bench.py,
# which measures throughput. Every run gets a fixed folder, <root>/<scenario>__<agents>__<arch>__<algorithm>__<seed>,
# so a relaunch of the same sweep skips the finished runs and resumes the others from their last.pt.
# Examples: python sweep.py --scripts shacpp.py ppo.py --scenarios dispersion --n-agents 3 --archs transformer \
#               --seeds 1 2 3 --extra="--episodes 3000" --workers 2
#           python sweep.py --slurm --dry-run   (prints the sbatch script for the paper's whole grid)
import concurrent.futures
import itertools
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Literal

import tyro

from bookkeeping import FINISHED

HERE = os.path.dirname(os.path.abspath(__file__))
Scenario = Literal["dispersion", "transport", "discovery", "sampling"]


@dataclass
class Args:
    scripts: tuple[Literal["shacpp.py", "shac.py", "ppo.py"], ...] = ("shacpp.py", "shac.py", "ppo.py")
    """training scripts (shac.py is left out on dispersion and discovery, whose rewards are not differentiable)"""
    scenarios: tuple[Scenario, ...] = ("dispersion", "transport", "discovery", "sampling")
    """VMAS scenarios"""
    n_agents: tuple[int, ...] = (1, 3, 5)
    """agent counts"""
    archs: tuple[Literal["mlp", "transformer"], ...] = ("mlp", "transformer")
    """architectures"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds"""
    extra: str = ""
    """flags added to every command, written with '=': --extra="--episodes 3000 --num-steps 8" (a relaunch uses the
    same ones; a run that resumes takes its flags from its own args.json)"""
    root: str = "runs/sweep"
    """folder of the sweep's run folders and logs"""
    workers: int = 1
    """runs at a time on this machine, one thread each (OMP_NUM_THREADS=1); with --slurm, array tasks at a time"""
    slurm: bool = False
    """write <root>/sweep.sbatch (a job array, one task per run) and submit it with sbatch"""
    sbatch: tuple[str, ...] = ("cpus-per-task=1", "time=24:00:00")
    """#SBATCH options without their dashes, e.g. --sbatch partition=gpu gres=gpu:1 time=48:00:00"""
    dry_run: bool = False
    """print what would run (or the sbatch script) and start nothing"""
    task: int = -1
    """internal: run the task-th run of the grid here (what each SLURM array task does)"""


def grid(args: Args) -> list[tuple[str, list[str]]]:
    """The runs of the grid as (run folder, argument list for a new run), in a fixed order."""
    runs = []
    for script, scenario, n, arch, seed in itertools.product(args.scripts, args.scenarios, args.n_agents,
                                                              args.archs, args.seeds):
        if script == "shac.py" and scenario in ("dispersion", "discovery"):
            continue
        name = script[:-3]
        folder = os.path.join(args.root, f"{scenario}__{n}__{arch}__{name}__{seed}")
        runs.append((folder, [script, "--scenario", scenario, "--n-agents", str(n), "--arch", arch, "--seed", str(seed),
                              "--exp-name", name, "--run-dir", folder, *shlex.split(args.extra)]))
    return runs


def command(folder: str, fresh: list[str]) -> list[str] | None:
    """What to run for a folder: None if it finished, a resume from last.pt if it has one, else a new run."""
    if os.path.exists(os.path.join(folder, FINISHED)):
        return None
    if os.path.exists(os.path.join(folder, "last.pt")):
        return [sys.executable, os.path.join(HERE, fresh[0]), "--checkpoint", folder]
    return [sys.executable, os.path.join(HERE, fresh[0]), *fresh[1:]]


def execute(folder: str, cmd: list[str], children: dict) -> int:
    """Run one command, its output appended to <folder>.log; returns its exit status."""
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    with open(folder + ".log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
        children[folder] = proc
        code = proc.wait()
        del children[folder]
    return code


def sbatch_script(args: Args, count: int) -> str:
    """A job array with one task per run; each task asks sweep.py which of skip, resume or new its run needs, so a
    requeued task resumes. SLURM signals a task 120 s before its time limit; a run stopped by a signal exits with
    128 + its number, and the task then requeues itself."""
    flags = []
    for name in ("scripts", "scenarios", "n_agents", "archs", "seeds"):
        flags += [f"--{name.replace('_', '-')}", *map(str, getattr(args, name))]
    flags += [f"--extra={args.extra}", "--root", args.root]
    options = "\n".join(f"#SBATCH --{option}" for option in args.sbatch)
    return f"""#!/bin/bash
#SBATCH --job-name=shacpp-sweep
#SBATCH --array=0-{count - 1}%{args.workers}
#SBATCH --output={args.root}/slurm-%A_%a.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
{options}
export OMP_NUM_THREADS=1
cd {shlex.quote(os.getcwd())}
srun {shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'sweep.py'))} {shlex.join(flags)} --task "$SLURM_ARRAY_TASK_ID"
code=$?
if [ "$code" -ge 128 ]; then  # stopped by a signal (time limit, preemption): run it again, it resumes from last.pt
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$code"
"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.workers < 1:
        sys.exit(f"error: --workers must be at least 1, got {args.workers}")
    runs = grid(args)
    if not runs:
        sys.exit("error: the grid is empty (shac.py runs only on transport and sampling)")
    if args.task >= 0:  # one SLURM array task: its run, as the status of its folder says
        if args.task >= len(runs):
            sys.exit(f"error: --task {args.task} is outside the grid of {len(runs)} runs")
        folder, fresh = runs[args.task]
        cmd = command(folder, fresh)
        if cmd is None:
            sys.exit(0)
        os.execv(cmd[0], cmd)  # the run takes this process's place: SLURM's signals and exit status are its own
    if args.slurm:
        script = sbatch_script(args, len(runs))
        if args.dry_run:
            print(script, end="")
            sys.exit(0)
        os.makedirs(args.root, exist_ok=True)
        path = os.path.join(args.root, "sweep.sbatch")
        with open(path, "w") as f:
            f.write(script)
        print(f"wrote {path} ({len(runs)} runs)")
        sys.exit(subprocess.call(["sbatch", path]))

    todo = [(folder, command(folder, fresh)) for folder, fresh in runs]
    for folder, cmd in todo:
        print(f"skip    {folder} (finished)" if cmd is None else
              f"{'resume' if '--checkpoint' in cmd else 'new   '}  {folder}: {shlex.join(cmd[1:])}")
    todo = [(folder, cmd) for folder, cmd in todo if cmd is not None]
    if args.dry_run or not todo:
        sys.exit(0)
    children, stopping = {}, threading.Event()

    def stop(signum, frame):  # pass the stop on: every running run writes last.pt and exits; start no new one
        stopping.set()
        for proc in list(children.values()):
            proc.send_signal(signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)

    def job(folder, cmd):
        return None if stopping.is_set() else execute(folder, cmd, children)
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        codes = list(pool.map(lambda item: job(*item), todo))
    failed = [(folder, code) for (folder, _), code in zip(todo, codes) if code not in (0, None)]
    print(f"{len(todo) - len(failed)} of {len(todo)} runs ended normally" + "".join(
        f"\n  {folder}: exit status {code} (log {folder}.log)" for folder, code in failed))
    sys.exit(1 if failed else 0)
