# Learning curves in the layout of the SHAC++ paper's Fig. 4, and on stdout a Markdown table of the best normalized
# return per scenario, agents and algorithm. Usage: python plot.py results/ [--x steps|time|episodes] [--out F]
import csv
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import matplotlib.pyplot as plt
import tyro

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


def group(runs: list[str]) -> dict:
    """Runs differing only in IGNORED arguments (seed, ...) form a group: (scenario, n_agents, column, arguments) ->
    [(args, eval.csv rows)]. Runs without evaluations are skipped, a partial last line (still writing) left out."""
    groups = defaultdict(list)
    for run in runs:
        args, path = json.load(open(os.path.join(run, "args.json"))), os.path.join(run, "eval.csv")
        reader = csv.DictReader(open(path)) if os.path.exists(path) else []
        rows = [{k: float(v) for k, v in row.items()} for row in reader if None not in row.values()]
        column = "authors" if args.get("implementation") == "authors" else args["algorithm"]  # table column and colour
        if not rows:
            print(f"skipping {run}: no evaluation yet", file=sys.stderr)
        elif column in SHOWN:
            config = tuple(sorted((k, json.dumps(v)) for k, v in args.items() if k not in IGNORED))
            groups[(args["scenario"], args["n_agents"], column, config)].append((args, rows))
    return groups


def cells(groups: dict) -> dict:
    """(scenario, n_agents, column) -> {key: tag} of its groups, in the paper's order. A tag is the experiment name
    and, where groups of one cell share it, the arguments they differ in as name=value."""
    out = defaultdict(dict)
    for key, seeds in groups.items():
        out[key[:3]][key] = "/".join(sorted({a.get("exp_name") or a["algorithm"] for a, _ in seeds}))
    for cell, names in out.items():
        tags = {}
        for key, name in names.items():
            namesakes = [dict(k[3]) for k in names if names[k] == name]
            differing = sorted({a for c in namesakes for a in c if len({d.get(a) for d in namesakes}) > 1})
            # an argument a run lacks is "unset": the run is from before the argument existed
            values = ",".join(f"{a}={json.loads(dict(key[3]).get(a, json.dumps('unset')))}" for a in differing)
            tags[key] = f"{name} {values}" if values else name
        out[cell] = dict(sorted(tags.items(), key=lambda kv: kv[1]))
    rank = {s: i for i, s in enumerate(SCENARIOS)}  # an unknown scenario: after the paper's, by name
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0][0], 4), *kv[0][:2], [*SHOWN].index(kv[0][2]))))


def best(seeds) -> float:
    """The best evaluation normalized return of each seed, mean over the seeds."""
    return sum(max(r["normalized_return"] for r in rows) for _, rows in seeds) / len(seeds)


def curve(seeds, x: str):
    """Mean, min and max over seeds at each evaluated episode, x the seeds' mean there (time in minutes). A seed that
    early-stopped keeps its last return from then on; one still going counts only as far as it got."""
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
        configs = [by_cell.get((scenario, n, c), {}) for c in columns]
        texts = ["; ".join((f"{tag}: " if len(names) > 1 else "") + entry(groups[key], c in REFERENCES)
                           for key, tag in names.items()) or "–" for c, names in zip(columns, configs)]
        lines.append(f"| {scenario} | {n} | " + " | ".join(texts) + " |")
    return "\n".join(lines + ["", CAPTION])


def plot(groups: dict, x: str, out: str):
    """Scenarios down, agent counts across; per group a mean line and a light min-max band over seeds (colour: the
    algorithm, line style: the architecture); a dotted level per reference controller; one legend below."""
    by_cell = cells(groups)
    scenarios, counts = list(dict.fromkeys(c[0] for c in by_cell)), sorted({c[1] for c in by_cell})
    fig, axes = plt.subplots(len(scenarios), len(counts), figsize=(4.5 * len(counts), 3.2 * len(scenarios)),
                             squeeze=False)
    for (scenario, n, c), names in by_cell.items():
        ax, (label, colour) = axes[scenarios.index(scenario), counts.index(n)], SHOWN[c]
        ax.set(title=f"{scenario}, {n} agent{'s' * (n > 1)}", xlabel=XAXIS[x][1], ylabel="normalized return")
        for key, tag in names.items():
            if c in REFERENCES:  # one evaluation, no curve: a dotted level across the panel
                ax.axhline(best(groups[key]), linestyle=":", linewidth=1.5, color=colour, label=label)
                continue
            arch = groups[key][0][0]["arch"]
            twins = [k for k in names if groups[k][0][0]["arch"] == arch]  # told apart by a marker and the tag
            xs, means, lows, highs = curve(groups[key], x)
            marker = MARKERS[twins.index(key) % len(MARKERS)] if len(twins) > 1 else "." if len(xs) < 2 else None
            ax.plot(xs, means, STYLES.get(arch, "-"), color=colour, linewidth=1.5, marker=marker, markersize=4,
                    label=label + f" [{tag}]" * (len(twins) > 1))
            ax.fill_between(xs, lows, highs, color=colour, alpha=0.12, linewidth=0)
            if len(twins) > 1:  # the tag at the curve's end
                ax.text(xs[-1], means[-1], tag, ha="right", va="bottom", fontsize=6.5, color=colour)
    for ax in axes.flat:
        ax.set_ylim(min(ax.get_ylim()[0], -0.02), max(ax.get_ylim()[1], 1.05))  # the solved level stays in view
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.axis("off")  # no run: a blank panel
    drawn = {cell[2] for cell in by_cell} | {seeds[0][0].get("arch") for seeds in groups.values()}  # legend entries
    handles = [plt.Line2D([], [], color=colour, label=name) for c, (name, colour) in ALGORITHMS.items() if c in drawn]
    handles += [plt.Line2D([], [], color=colour, linestyle=":", label=f"{name} (reference)")
                for c, (name, colour) in REFERENCES.items() if c in drawn]
    handles += [plt.Line2D([], [], color="black", linestyle=STYLES[a], label=a) for a in STYLES if a in drawn]
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
