# Learning curves and the normalised-return table of our runs (SPEC section 9): the layout of the paper's Fig. 4
# and Table 1. Usage: python plot.py runs/ [more run folders or parents] [--x steps|time] [--out FILE] [--pdf]
import csv
import itertools
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

COLUMN = {"episodes": "episode", "steps": "global_step", "time": "time"}
LABEL = {"episodes": "episode", "steps": "environment steps", "time": "wall-clock seconds"}
COLOURS = {"ppo": "tab:blue", "shac": "tab:green", "shac+": "tab:orange", "shacpp": "tab:red"}
STYLES = {"mlp": "-", "transformer": "--"}
VARIANT_MARKERS = ("x", "+", "^", "s", "v", "d")  # each variant of a panel has its own
IGNORED = {"seed", "checkpoint", "capture_video", "save_model", "cuda", "runs"}  # runs differing only here: one group
REFERENCES = {"heuristic": "black", "greedy": "tab:purple", "random": "tab:gray", "zero": "tab:brown"}  # reference.py


@dataclass
class Args:
    paths: tyro.conf.Positional[tuple[str, ...]] = ("runs",)
    """run folders, or folders to search for runs (a run is a folder with args.json and eval.csv)"""
    x: Literal["episodes", "steps", "time"] = "episodes"
    """x axis: training episodes, environment steps, or wall-clock seconds"""
    out: str = "results.png"
    """where to write the figure"""
    pdf: bool = False
    """also write the figure as PDF (same name, .pdf)"""


def find_runs(paths) -> list[str]:
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            sys.exit(f"error: {path} is not a folder")
        runs += sorted(root for root, _, files in os.walk(path) if "args.json" in files)
    return runs


def load(run: str):
    """(args, rows of eval.csv as floats), or None when the run has no evaluation yet."""
    with open(os.path.join(run, "args.json")) as f:
        args = json.load(f)
    path = os.path.join(run, "eval.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if None not in row.values()]
    return (args, rows) if rows else None  # a partial last line (run still writing) is left out above


def label(args: dict) -> str:
    algorithm = args.get("algorithm", args.get("exp_name"))
    name = args.get("exp_name", algorithm)
    return algorithm if name == algorithm else f"{algorithm} ({name})"


def column(args: dict) -> str:
    """A learner's column names its architecture; a reference controller (reference.py) has none."""
    return label(args) if args.get("algorithm") in REFERENCES else f"{label(args)} {args['arch']}"


def group(runs: list[str]) -> dict:
    """Runs whose arguments differ only by seed form one group: key -> list of (args, eval rows), one per seed."""
    groups = defaultdict(list)
    for run in runs:
        loaded = load(run)
        if loaded is None:
            print(f"skipping {run}: no evaluation yet")
            continue
        args = loaded[0]
        groups[tuple(sorted((k, str(v)) for k, v in args.items() if k not in IGNORED))].append(loaded)
    return groups


def curve(seeds, x: str):
    """Mean and standard deviation over the seeds at each evaluated episode. A seed that stopped early (its last
    evaluation met the early-stop rule) keeps its last return afterwards; a seed still going counts only where it
    got to. x is the mean of the chosen column over the seeds that really evaluated there."""
    by_episode, stopped = defaultdict(list), []
    for args, rows in seeds:
        for row in rows:
            by_episode[row["episode"]].append(row)
        if rows[-1]["solved_fraction"] >= args.get("stop_fraction", 0.9):
            stopped.append(rows[-1])
    xs, means, stds = [], [], []
    for episode in sorted(by_episode):
        rows = by_episode[episode]
        values = [r["normalized_return"] for r in rows] + [r["normalized_return"] for r in stopped
                                                             if r["episode"] < episode]
        mean = sum(values) / len(values)
        xs.append(sum(r[COLUMN[x]] for r in rows) / len(rows))
        means.append(mean)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
    return xs, means, stds


def table(groups: dict) -> str:
    """The paper's Table 1: best normalized return of each run, mean over seeds, per algorithm x scenario x agents x
    architecture; the best learner of each row in bold. Reference controllers (one evaluation each) follow the
    learners as their own columns, never bold."""
    cells, columns = {}, set()
    for seeds in groups.values():
        args = seeds[0][0]
        best = [max(r["normalized_return"] for r in rows) for _, rows in seeds]
        cells[(args["scenario"], args["n_agents"], column(args))] = (sum(best) / len(best), len(best))
        columns.add(column(args))
    columns = sorted(columns, key=lambda c: (c in REFERENCES, c))
    lines = ["| scenario | agents | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for scenario, agents in sorted({key[:2] for key in cells}):
        row = [cells.get((scenario, agents, c)) for c in columns]
        top = max((cell[0] for c, cell in zip(columns, row) if cell and c not in REFERENCES), default=None)
        text = []
        for cell in row:  # "mean (seeds)"; empty where that algorithm did not run
            value = "" if cell is None else f"{cell[0]:.3f}"
            text.append("" if cell is None else (f"**{value}**" if cell[0] == top else value) + f" ({cell[1]})")
        lines.append(f"| {scenario} | {agents} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def plot(groups: dict, x: str, out: str, pdf: bool):
    """One panel per (scenario, agents): scenarios across, agent counts down; a line and a +-std band per group."""
    scenarios = sorted({seeds[0][0]["scenario"] for seeds in groups.values()})
    counts = sorted({seeds[0][0]["n_agents"] for seeds in groups.values()})
    fig, axes = plt.subplots(len(counts), len(scenarios), figsize=(4.2 * len(scenarios), 3.4 * len(counts)),
                             squeeze=False)
    for (row, agents), (col, scenario) in itertools.product(enumerate(counts), enumerate(scenarios)):
        ax = axes[row][col]
        members = [s for s in groups.values() if (s[0][0]["scenario"], s[0][0]["n_agents"]) == (scenario, agents)]
        if not members:
            ax.axis("off")
            continue
        markers = itertools.cycle(VARIANT_MARKERS)
        for seeds in sorted(members, key=lambda s: (label(s[0][0]), s[0][0].get("arch", ""))):
            args = seeds[0][0]
            if args.get("algorithm") in REFERENCES:  # one evaluation, no curve: a dashed level across the panel
                level = sum(rows[-1]["normalized_return"] for _, rows in seeds) / len(seeds)
                ax.axhline(level, linestyle="--", linewidth=1, color=REFERENCES[args["algorithm"]],
                           label=f"{label(args)} (reference, {len(seeds)} seed{'s' * (len(seeds) > 1)})")
                continue
            xs, means, stds = curve(seeds, x)
            variant = label(args) != args.get("algorithm")  # e.g. a reduced configuration: same colour, lighter
            line, = ax.plot(xs, means, STYLES[args["arch"]], marker=next(markers) if variant else ".", markersize=4,
                            color=COLOURS.get(args.get("algorithm")), alpha=0.6 if variant else 1.0,
                            label=f"{label(args)} {args['arch']} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{scenario}, {agents} agent{'s' * (agents > 1)}", xlabel=LABEL[x], ylabel="normalized return")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.02), max(high, 1.05))  # a level at 1 (solved) stays visible off the frame
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=90)
    if pdf:
        fig.savefig(os.path.splitext(out)[0] + ".pdf")


if __name__ == "__main__":
    args = tyro.cli(Args)
    groups = group(find_runs(args.paths))
    if not groups:
        sys.exit(f"error: found no run with an evaluation under {', '.join(args.paths)}")
    plot(groups, args.x, args.out, args.pdf)
    print(table(groups))
    print(f"wrote {args.out}" + (f" and {os.path.splitext(args.out)[0]}.pdf" if args.pdf else ""))
