# Learning curves in the layout of the SHAC++ paper's Fig. 4, and on stdout a Markdown table of the best normalized
# return per scenario, agents and algorithm. Usage: python plot.py results/ [--x steps|time|episodes] [--out F]
import csv
import itertools
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import matplotlib.pyplot as plt
import tyro
from matplotlib.lines import Line2D

plt.switch_backend("Agg")  # files only, no display

SCENARIOS = ("dispersion", "transport", "discovery", "sampling")  # the paper's order
ALGORITHMS = {"ppo": ("PPO/MAPPO", "tab:blue"), "shac": ("SHAC", "tab:green"), "shac+": ("SHAC+", "tab:orange"),
              "shacpp": ("SHAC++", "tab:red"), "authors": ("SHAC++ (authors' code)", "tab:purple")}
# reference.py's controllers, a dotted level each; its zero-action controller (0.00-0.01 everywhere) is left out
REFERENCES = {"heuristic": ("heuristic", "black"), "greedy": ("greedy", "dimgray"), "random": ("random", "darkgray")}
SHOWN = ALGORITHMS | REFERENCES  # the table's columns, in order: name and colour
STYLES = {"mlp": "-", "transformer": "--"}
MARKERS = "os^DvPX*"  # several configurations of one algorithm, architecture and panel: a marker each
XAXIS = {"steps": ("global_step", "environment steps"), "time": ("time", "wall-clock minutes"),
         "episodes": ("episode", "episodes")}  # the eval.csv column and the axis label
# arguments that do not make two runs different learners: runs that differ only here form one group
IGNORED = {"seed", "checkpoint", "capture_video", "save_model", "cuda", "runs", "run_dir", "exp_name", "episodes",
           "eval_every", "torch_deterministic", "script", "git_commit", "torch", "vmas"}
CAPTION = ("Cell: best evaluation normalized_return, mean over seeds (seeds, wall-clock minutes); a reference "
           "controller: its one evaluation; several configurations: separated by ';', named by exp_name; –: no run.")


@dataclass
class Args:
    paths: tyro.conf.Positional[tuple[str, ...]] = ("runs",)
    """run folders, or folders to search for runs (a run is a folder with args.json and eval.csv)"""
    x: Literal["steps", "time", "episodes"] = "steps"
    """x axis: environment steps (runs of different window lengths compare), wall-clock minutes, or episodes"""
    out: str = "results.png"
    """where to write the figure (its format from the extension: .png, .pdf, .svg)"""


def find_runs(paths) -> list[str]:
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            sys.exit(f"error: {path} is not a folder")
        runs += sorted(root for root, _, files in os.walk(path) if "args.json" in files)
    return runs


def column(args: dict) -> str:
    """The table column (and the colour) of a run: its algorithm, or "authors" for the authors' SHAC++ code."""
    return "authors" if args.get("implementation") == "authors" else args["algorithm"]


def group(runs: list[str]) -> dict:
    """Runs whose arguments differ only by seed (and IGNORED) form one group: key -> list of (args, eval.csv rows as
    floats). A run with no evaluation yet is skipped; a partial last line (a run still writing) is left out."""
    groups = defaultdict(list)
    for run in runs:
        args, path = json.load(open(os.path.join(run, "args.json"))), os.path.join(run, "eval.csv")
        reader = csv.DictReader(open(path)) if os.path.exists(path) else []
        rows = [{k: float(v) for k, v in row.items()} for row in reader if None not in row.values()]
        if not rows:
            print(f"skipping {run}: no evaluation yet", file=sys.stderr)
        elif column(args) in SHOWN:
            groups[tuple(sorted((k, json.dumps(v)) for k, v in args.items() if k not in IGNORED))].append((args, rows))
    return groups


def cells(groups: dict) -> dict:
    """(scenario, n_agents, column) -> {key: tag} of its groups, in the paper's order. A tag tells the configurations
    of one cell apart: their experiment names or, where those coincide, the arguments that differ, as name=value."""
    out = defaultdict(list)
    for key, seeds in groups.items():
        out[(seeds[0][0]["scenario"], seeds[0][0]["n_agents"], column(seeds[0][0]))].append(key)
    for cell, keys in out.items():
        names = {k: "/".join(sorted({a.get("exp_name") or a["algorithm"] for a, _ in groups[k]})) for k in keys}
        for name in {v for v in names.values() if list(names.values()).count(v) > 1}:  # a name shared by groups
            configs = {k: dict(k) for k in keys if names[k] == name}
            differing = sorted({a for c in configs.values() for a in c if len({d.get(a) for d in configs.values()})
                                > 1})
            names |= {k: name + " " + ",".join(f"{a}={json.loads(c[a]) if a in c else 'unset'}" for a in differing)
                      for k, c in configs.items()}  # unset: a run from before the argument existed
        out[cell] = dict(sorted(names.items(), key=lambda kv: kv[1]))
    rank = {s: i for i, s in enumerate(SCENARIOS)}  # an unknown scenario: after the paper's, by name
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0][0], 4), *kv[0][:2], [*SHOWN].index(kv[0][2]))))


def best(seeds) -> float:
    """The best evaluation normalized return of each seed, mean over the seeds."""
    return sum(max(r["normalized_return"] for r in rows) for _, rows in seeds) / len(seeds)


def curve(seeds, x: str):
    """Mean, min and max over seeds at each evaluated episode; a seed that early-stopped keeps its last return after,
    one still going counts only where it got to. x: the mean over the seeds that evaluated there (time in minutes)."""
    by_episode, stopped = defaultdict(list), []
    for args, rows in seeds:
        for row in rows:
            by_episode[row["episode"]].append(row)
        if rows[-1]["solved_fraction"] >= args.get("stop_fraction", 0.9):
            stopped.append(rows[-1])
    points = []
    for episode, rows in sorted(by_episode.items()):
        values = [r["normalized_return"] for r in rows + [s for s in stopped if s["episode"] < episode]]
        at = sum(r[XAXIS[x][0]] for r in rows) / len(rows) / (60 if x == "time" else 1)
        points.append((at, sum(values) / len(values), min(values), max(values)))
    return tuple(map(list, zip(*points)))  # xs, means, lows, highs


def entry(seeds, reference: bool) -> str:
    """A table cell's text for one group: "0.730 (2 seeds, 21 min)", the minutes a range where the seeds differ."""
    low, high = (f(round(rows[-1]["time"] / 60) for _, rows in seeds) for f in (min, max))
    value = f"{round(best(seeds), 3) + 0.0:.3f}"  # + 0.0: no "-0.000"
    span = f"{low}" if low == high else f"{low}–{high}"
    return value if reference else f"{value} ({len(seeds)} seed{'s' * (len(seeds) > 1)}, {span} min)"


def table(groups: dict) -> str:
    """Markdown: a row per (scenario, agents), a column per algorithm then per reference controller that has runs."""
    by_cell = cells(groups)
    columns = [c for c in SHOWN if any(cell[2] == c for cell in by_cell)]
    lines = ["| scenario | agents | " + " | ".join(SHOWN[c][0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for scenario, n in dict.fromkeys(cell[:2] for cell in by_cell):
        texts = [by_cell.get((scenario, n, c), {}) for c in columns]
        texts = ["; ".join((f"{tag}: " if len(names) > 1 else "") + entry(groups[k], c in REFERENCES)
                           for k, tag in names.items()) or "–" for c, names in zip(columns, texts)]
        lines.append(f"| {scenario} | {n} | " + " | ".join(texts) + " |")
    return "\n".join(lines + ["", CAPTION])


def plot(groups: dict, x: str, out: str):
    """Scenarios down, agent counts across; per group a mean line with a light min-max band over seeds, its colour
    the algorithm, its style the architecture; a dotted level per reference controller; one legend below."""
    by_cell = cells(groups)
    scenarios, counts = list(dict.fromkeys(c[0] for c in by_cell)), sorted({c[1] for c in by_cell})
    fig, axes = plt.subplots(len(scenarios), len(counts), figsize=(4.5 * len(counts), 3.2 * len(scenarios)),
                             squeeze=False)
    used = set()  # algorithms, references and architectures drawn: the legend's entries
    for ax, (scenario, n) in zip(axes.flat, itertools.product(scenarios, counts)):
        here = [(c, names) for (s, m, c), names in by_cell.items() if (s, m) == (scenario, n)]
        if not here:
            ax.axis("off")  # no run: a blank panel
            continue
        for c, names in here:
            label, colour = SHOWN[c]
            for key, tag in names.items():
                seeds, args = groups[key], groups[key][0][0]
                used.update((c, args.get("arch")))
                if c in REFERENCES:  # one evaluation, no curve: a dotted level across the panel
                    ax.axhline(best(seeds), linestyle=":", linewidth=1.5, color=colour, label=label)
                    continue
                twins = [k for k in names if groups[k][0][0]["arch"] == args["arch"]]
                xs, means, lows, highs = curve(seeds, x)
                marker = MARKERS[twins.index(key) % len(MARKERS)] if len(twins) > 1 else "." if len(xs) < 2 else None
                ax.plot(xs, means, STYLES.get(args["arch"], "-"), color=colour, linewidth=1.5, marker=marker,
                        markersize=4, label=label + f" [{tag}]" * (len(twins) > 1))
                ax.fill_between(xs, lows, highs, color=colour, alpha=0.12, linewidth=0)
                if len(twins) > 1:  # which configuration: its name at its curve's end
                    ax.text(xs[-1], means[-1], tag, ha="right", va="bottom", fontsize=6.5, color=colour)
        ax.set(title=f"{scenario}, {n} agent{'s' * (n > 1)}", xlabel=XAXIS[x][1], ylabel="normalized return",
               ylim=(min(ax.get_ylim()[0], -0.02), max(ax.get_ylim()[1], 1.05)))  # the solved level stays in view
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, linestyle=":" if c in REFERENCES else "-", label=name + " (reference)"
                      * (c in REFERENCES)) for c, (name, colour) in SHOWN.items() if c in used]
    handles += [Line2D([], [], color="black", linestyle=STYLES[a], label=a) for a in STYLES if a in used]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=(len(handles) + 1) // 2,
               frameon=False)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")  # the legend below the panels is kept
    return fig


if __name__ == "__main__":
    args = tyro.cli(Args)
    groups = group(find_runs(args.paths))
    if not groups:
        sys.exit(f"error: found no run with an evaluation under {', '.join(args.paths)}")
    plot(groups, args.x, args.out)
    print(table(groups))
    print(f"wrote {args.out}")
