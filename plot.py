# Learning curves and the normalised-return table of our runs: the layout of the paper's Fig. 4
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
COLOURS = {"ppo": "tab:blue", "shac": "tab:green", "shac+": "tab:orange", "shacpp": "tab:red"}  # each default
VARIANT_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "navy", "lime", "magenta",
                   "teal", "gold", "maroon", "slategray")  # every other configuration gets one of its own, by label
VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # and a marker, so that no two look alike
STYLES = {"mlp": "-", "transformer": "--"}
# arguments that do not make two runs different learners: runs that differ only here form one group
IGNORED = {"seed", "checkpoint", "capture_video", "save_model", "cuda", "runs", "run_dir", "exp_name", "episodes",
           "eval_every", "torch_deterministic", "script", "git_commit", "torch", "vmas"}
PANEL = {"algorithm", "scenario", "n_agents", "arch", "policy"}  # shown by the panel or the label's start
ADDED = {"dynamics": "model", "credit": "team"}  # shacpp.py arguments newer than some runs: what those runs did
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
    if args.get("algorithm") in ("shacpp", "shac+"):
        args = ADDED | args
    path = os.path.join(run, "eval.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if None not in row.values()]
    return (args, rows) if rows else None  # a partial last line (run still writing) is left out above


def group(runs: list[str]) -> dict:
    """Runs whose arguments differ only by seed (and IGNORED) form one group: key -> list of (args, eval rows)."""
    groups = defaultdict(list)
    for run in runs:
        loaded = load(run)
        if loaded is None:
            print(f"skipping {run}: no evaluation yet")
            continue
        groups[tuple(sorted((k, json.dumps(v)) for k, v in loaded[0].items() if k not in IGNORED))].append(loaded)
    return groups


def labels(groups: dict) -> dict:
    """key -> label: the algorithm (and, for a learner, its architecture), then what sets the configuration apart from
    the other configurations of that algorithm and architecture: its experiment names when they are its own, or
    else the arguments that differ among them, as name=value. One configuration has one label in every panel."""
    kinds = defaultdict(list)
    for key, seeds in groups.items():
        args = seeds[0][0]
        kinds[args["algorithm"] if args["algorithm"] in REFERENCES else f"{args['algorithm']} {args['arch']}"].append(key)
    out = {}
    for base, keys in kinds.items():
        config = {key: tuple((k, v) for k, v in key if k not in PANEL) for key in keys}  # the panel aside
        distinct = sorted(set(config.values()))
        names = defaultdict(set)  # configuration -> its experiment names other than the default (the algorithm's)
        for key in keys:
            names[config[key]] |= {a.get("exp_name") for a, _ in groups[key]} - {None, groups[key][0][0]["algorithm"]}
        owners = defaultdict(set)
        for c, ns in names.items():
            for n in ns:
                owners[n].add(c)
        as_dicts = [dict(c) for c in distinct]
        differing = sorted({k for c in as_dicts for k in c if len({d.get(k) for d in as_dicts}) > 1})
        shared = [k for k in differing if all(k in c for c in as_dicts)]  # an argument older runs lack says less
        if len({tuple(c.get(k) for k in shared) for c in as_dicts}) == len(as_dicts):
            differing = shared
        for key in keys:
            own = names[config[key]]
            if len(distinct) == 1:
                out[key] = base
            elif own and all(len(owners[name]) == 1 for name in own):  # names of its own (one per scenario, say)
                out[key] = f"{base} [{'/'.join(sorted(own))}]"
            else:
                c = dict(config[key])
                out[key] = f"{base} (" + ", ".join(f"{k}={json.loads(c[k])}" for k in differing if k in c) + ")"
    return out


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


def is_reference(seeds) -> bool:
    return seeds[0][0]["algorithm"] in REFERENCES


def table(groups: dict) -> str:
    """The paper's Table 1: best normalized return of each run, mean over seeds (their count in brackets), per
    group x scenario x agents; the best learner of each row in bold. Reference controllers (one evaluation each)
    follow the learners as their own columns, never bold."""
    names, cells = labels(groups), {}
    for key, seeds in groups.items():
        best = [max(r["normalized_return"] for r in rows) for _, rows in seeds]
        cells[(seeds[0][0]["scenario"], seeds[0][0]["n_agents"], names[key])] = (sum(best) / len(best), len(best))
    references = {names[key] for key, seeds in groups.items() if is_reference(seeds)}
    columns = sorted(set(names.values()), key=lambda c: (c in references, c))
    lines = ["| scenario | agents | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for scenario, agents in sorted({key[:2] for key in cells}):
        row = [cells.get((scenario, agents, c)) for c in columns]
        top = max((cell[0] for c, cell in zip(columns, row) if cell and c not in references), default=None)
        text = []
        for cell in row:  # "mean (seeds)"; empty where that group did not run
            value = "" if cell is None else f"{cell[0]:.3f}"
            text.append("" if cell is None else (f"**{value}**" if cell[0] == top else value) + f" ({cell[1]})")
        lines.append(f"| {scenario} | {agents} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def plot(groups: dict, x: str, out: str, pdf: bool):
    """One panel per (scenario, agents): scenarios across, agent counts down; a line and a +-std band per group, a
    dotted level per reference controller; one legend for the figure, below the panels."""
    names = labels(groups)
    variants = sorted({names[key] for key, seeds in groups.items() if not is_reference(seeds)
                       and names[key] != f"{seeds[0][0]['algorithm']} {seeds[0][0]['arch']}"})
    colour = dict(zip(variants, itertools.cycle(VARIANT_COLOURS)))  # a default configuration: its algorithm's
    marker = dict(zip(variants, itertools.cycle(VARIANT_MARKERS)))
    scenarios = sorted({seeds[0][0]["scenario"] for seeds in groups.values()})
    counts = sorted({seeds[0][0]["n_agents"] for seeds in groups.values()})
    fig, axes = plt.subplots(len(counts), len(scenarios), figsize=(4.2 * len(scenarios), 3.2 * len(counts)),
                             squeeze=False)
    legend = {}
    for (row, agents), (col, scenario) in itertools.product(enumerate(counts), enumerate(scenarios)):
        ax = axes[row][col]
        members = [key for key, s in groups.items() if (s[0][0]["scenario"], s[0][0]["n_agents"]) == (scenario, agents)]
        if not members:
            ax.axis("off")
            continue
        for key in sorted(members, key=lambda k: names[k]):
            seeds, args = groups[key], groups[key][0][0]
            tag = f"{names[key]} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
            if is_reference(seeds):  # one evaluation, no curve: a dotted level across the panel
                level = sum(rows[-1]["normalized_return"] for _, rows in seeds) / len(seeds)
                legend[f"{names[key]} (reference)"] = ax.axhline(level, linestyle=":", linewidth=1.5, label=(
                    f"{names[key]} (reference)"), color=REFERENCES[args["algorithm"]])
                continue
            xs, means, stds = curve(seeds, x)
            line, = ax.plot(xs, means, STYLES[args["arch"]], marker=marker.get(names[key], "."), markersize=4,
                            linewidth=1.5, label=tag,
                            color=colour.get(names[key], COLOURS.get(args["algorithm"])))
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
            legend.setdefault(tag, line)
        ax.set(title=f"{scenario}, {agents} agent{'s' * (agents > 1)}", xlabel=LABEL[x], ylabel="normalized return")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.02), max(high, 1.05))  # a level at 1 (solved) stays visible off the frame
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
               ncol=max(1, min(3, len(scenarios))), frameon=False)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")  # the legend below the panels is kept
    if pdf:
        fig.savefig(os.path.splitext(out)[0] + ".pdf", bbox_inches="tight")


if __name__ == "__main__":
    args = tyro.cli(Args)
    groups = group(find_runs(args.paths))
    if not groups:
        sys.exit(f"error: found no run with an evaluation under {', '.join(args.paths)}")
    plot(groups, args.x, args.out, args.pdf)
    print(table(groups))
    print(f"wrote {args.out}" + (f" and {os.path.splitext(args.out)[0]}.pdf" if args.pdf else ""))
