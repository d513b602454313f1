"""plot.py on synthetic run folders: seeds grouped, the Markdown table's layout, early-stopped seeds, configurations
kept apart, the x axis, the legend, and clear messages on bad input."""
import json
import os

import pytest
import tyro

import plot
from test_smoke import run_script

HEADER = "episode,global_step,time,eval_return,max_return,normalized_return,solved_fraction\n"
CAPTION = plot.CAPTION


def fake_run(root, algorithm, scenario, seed, returns, n_agents=1, arch="mlp", tail="", **extra):
    """A run folder as the training scripts write it: an evaluation every 10 episodes (320 steps, one minute)."""
    run = root / f"{scenario}__{n_agents}__{arch}__{algorithm}__{seed}__{len(os.listdir(root)) if root.exists() else 0}"
    run.mkdir(parents=True)
    args = dict(exp_name=algorithm, seed=seed, scenario=scenario, n_agents=n_agents, arch=arch, episodes=100,
                checkpoint="", algorithm=algorithm) | extra
    (run / "args.json").write_text(json.dumps(args))
    if returns is not None:
        lines = [f"{10 * (i + 1)},{320 * (i + 1)},{60 * (i + 1)},{r},1,{r},0\n" for i, r in enumerate(returns)]
        (run / "eval.csv").write_text(HEADER + "".join(lines) + tail)
    return run


def fake_reference(root, policy, scenario, n_agents, value):
    """A run folder as reference.py writes it: no architecture, one evaluation."""
    run = root / f"{scenario}__{n_agents}__reference__{policy}__1"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(dict(policy=policy, scenario=scenario, n_agents=n_agents, seed=1,
                                                   algorithm=policy, script="reference.py")))
    (run / "eval.csv").write_text(HEADER + f"0,0,30,{value},1,{value},0\n")


def groups_of(runs):
    return plot.group(plot.find_runs([str(runs)]))


def test_plot_groups_seeds_and_prints_table(tmp_path):
    """Seeds of one configuration are one cell (mean of each seed's best, their minutes as a range); rows in the
    paper's order (transport before discovery); a column without runs (SHAC+, the authors' code) left out."""
    runs = tmp_path / "runs"
    fake_run(runs, "ppo", "transport", 1, [0.1, 0.5, 0.4])
    fake_run(runs, "ppo", "transport", 2, [0.2, 0.3])
    fake_run(runs, "shacpp", "transport", 1, [0.6, 0.9])
    fake_run(runs, "shacpp", "transport", 2, [0.7], tail="20,640,3")  # still going: half-written last line
    fake_run(runs, "shac", "discovery", 1, [0.25])
    empty = fake_run(runs, "shac", "discovery", 2, None)  # no evaluation yet
    for x, suffix in (("steps", "png"), ("time", "png"), ("episodes", "pdf")):
        out = run_script("plot.py", [str(runs), "--x", x, "--out", str(tmp_path / f"{x}.{suffix}")], tmp_path)
        assert out.returncode == 0, out.stderr
        assert os.path.getsize(tmp_path / f"{x}.{suffix}") > 10_000
    assert open(tmp_path / "episodes.pdf", "rb").read(4) == b"%PDF"
    assert out.stderr.splitlines() == [f"skipping {empty}: no evaluation yet"]
    assert out.stdout.splitlines() == [
        "| scenario | agents | PPO/MAPPO | SHAC | SHAC++ |",
        "|---|---|---|---|---|",
        "| transport | 1 | 0.400 (2 seeds, 2–3 min) | – | 0.800 (2 seeds, 1–2 min) |",
        "| discovery | 1 | – | 0.250 (1 seed, 1 min) | – |",
        "",
        CAPTION,
        f"wrote {tmp_path / 'episodes.pdf'}",
    ]


def test_table_columns_in_order_with_references(tmp_path):
    """Algorithms in the paper's order, the authors' SHAC++ code a column of its own, then the reference controllers
    that have runs (greedy has none here; zero is never shown), their cells the value alone."""
    runs = tmp_path / "runs"
    fake_reference(runs, "random", "transport", 3, -0.00004)
    fake_reference(runs, "zero", "transport", 3, 0.0)
    fake_reference(runs, "heuristic", "transport", 3, 0.969)
    fake_run(runs, "shacpp", "transport", 1, [0.3], n_agents=3, implementation="authors")
    fake_run(runs, "shacpp", "transport", 1, [0.5], n_agents=3)
    fake_run(runs, "shac+", "transport", 1, [0.4], n_agents=3)
    fake_run(runs, "shac", "transport", 1, [0.2], n_agents=3)
    fake_run(runs, "ppo", "transport", 1, [0.1], n_agents=3)
    fake_run(runs, "ppo", "dispersion", 1, [0.6], n_agents=5)
    assert plot.table(groups_of(runs)).splitlines()[:4] == [
        "| scenario | agents | PPO/MAPPO | SHAC | SHAC+ | SHAC++ | SHAC++ (authors' code) | heuristic | random |",
        "|---|---|---|---|---|---|---|---|---|",
        "| dispersion | 5 | 0.600 (1 seed, 1 min) | – | – | – | – | – | – |",
        "| transport | 3 | 0.100 (1 seed, 1 min) | 0.200 (1 seed, 1 min) | 0.400 (1 seed, 1 min) | "
        "0.500 (1 seed, 1 min) | 0.300 (1 seed, 1 min) | 0.969 | 0.000 |",
    ]


def test_reference_py_runs_are_dotted_levels(tmp_path):
    """reference.py's own run folders are read as reference controllers: a dotted horizontal level at their value."""
    runs = tmp_path / "runs"
    fake_run(runs, "ppo", "dispersion", 1, [0.1, 0.3])
    out = run_script("tools/reference.py", ["--policy", "greedy", "--scenario", "dispersion", "--n-agents", "1",
                                      "--eval-envs", "4", "--eval-steps", "100", "--runs", str(runs)], tmp_path)
    assert out.returncode == 0, out.stderr
    groups = groups_of(runs)
    assert plot.table(groups).splitlines()[2] == "| dispersion | 1 | 0.300 (1 seed, 2 min) | 1.000 |"  # eats all
    fig = plot.plot(groups, "steps", str(tmp_path / "r.png"))
    (ax,) = fig.axes
    (level,) = [line for line in ax.get_lines() if line.get_label() == "greedy"]
    assert level.get_linestyle() == ":" and list(level.get_ydata()) == [1.0, 1.0]
    plot.plt.close(fig)


def test_curve_keeps_early_stopped_seed():
    """A seed that early-stopped keeps its last return in the mean and the band; one still going counts only where
    it got to. The x axis is environment steps by default, time in minutes."""
    def row(episode, ret, solved):
        return dict(episode=episode, global_step=episode * 10, time=episode * 6, normalized_return=ret,
                    solved_fraction=solved)
    stopped = ({"stop_fraction": 0.9}, [row(10, 0.2, 0.0), row(20, 0.8, 0.95)])
    going = ({"stop_fraction": 0.9}, [row(10, 0.4, 0.0), row(20, 0.4, 0.0), row(30, 0.6, 0.0)])
    partial = ({"stop_fraction": 0.9}, [row(10, 0.0, 0.0)])
    xs, means, lows, highs = plot.curve([stopped, going, partial], plot.Args().x)
    assert xs == [100, 200, 300]
    assert means == pytest.approx([0.2, 0.6, 0.7])
    assert lows == pytest.approx([0.0, 0.4, 0.6]) and highs == pytest.approx([0.4, 0.8, 0.8])
    assert plot.curve([going], "episodes")[0] == [10, 20, 30] and plot.curve([going], "time")[0] == [1, 2, 3]


def test_x_axis_is_environment_steps_by_default(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "shacpp", "dispersion", 1, [0.1, 0.2, 0.3])
    args = tyro.cli(plot.Args, args=[str(runs)])
    assert args.x == "steps"
    fig = plot.plot(groups_of(runs), args.x, str(tmp_path / "x.png"))
    (ax,) = fig.axes
    assert list(ax.get_lines()[0].get_xdata()) == [320, 640, 960] and ax.get_xlabel() == "environment steps"
    plot.plt.close(fig)


def test_configurations_are_never_merged(tmp_path):
    """Two SHAC++ configurations that differ only in --num-steps, both with the default experiment name: two
    groups, two curves told apart by the differing argument and their markers, one cell listing both; seeds of one
    configuration stay one group. An mlp and a transformer configuration are no cause for a warning."""
    runs = tmp_path / "runs"
    for seed, steps, returns in ((1, 32, [0.2, 0.5]), (2, 32, [0.3, 0.4]), (1, 8, [0.6, 1.0])):
        fake_run(runs, "shacpp", "dispersion", seed, returns, num_steps=steps, run_dir=f"runs/{seed}_{steps}")
    fake_run(runs, "ppo", "dispersion", 1, [0.1], arch="mlp")
    fake_run(runs, "ppo", "dispersion", 1, [0.2], arch="transformer")
    groups = groups_of(runs)
    assert sorted(len(seeds) for seeds in groups.values()) == [1, 1, 1, 2]
    assert plot.table(groups).splitlines()[2] == (
        "| dispersion | 1 | ppo arch=mlp: 0.100 (1 seed, 1 min); ppo arch=transformer: 0.200 (1 seed, 1 min) | "
        "shacpp num_steps=32: 0.450 (2 seeds, 2 min); shacpp num_steps=8: 1.000 (1 seed, 2 min) |")
    fig = plot.plot(groups, "steps", str(tmp_path / "c.png"))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"SHAC++ [shacpp num_steps=32]", "SHAC++ [shacpp num_steps=8]", "PPO/MAPPO"}
    assert lines["SHAC++ [shacpp num_steps=32]"].get_marker() != lines["SHAC++ [shacpp num_steps=8]"].get_marker()
    assert {text.get_text() for text in ax.texts} == {"shacpp num_steps=32", "shacpp num_steps=8"}
    assert fig.legends and not ax.get_legend()  # one legend, for the figure
    plot.plt.close(fig)


def test_experiment_names_tell_configurations_apart(tmp_path):
    runs = tmp_path / "runs"
    for name, steps in (("paper", 32), ("fast", 8)):
        fake_run(runs, "shacpp", "transport", 1, [0.5], exp_name=name, num_steps=steps)
    out = run_script("plot.py", [str(runs), "--out", str(tmp_path / "n.png")], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines()[2] == "| transport | 1 | fast: 0.500 (1 seed, 1 min); paper: 0.500 (1 seed, 1 min) |"


def test_legend_has_an_entry_per_algorithm_reference_and_architecture(tmp_path):
    """Every algorithm in both architectures, two configurations of one, and every reference controller: ten
    entries at most (colour = algorithm, dotted = reference, line style = architecture); a panel without runs is
    hidden."""
    runs = tmp_path / "runs"
    for algorithm, extra in (("ppo", {}), ("shac", {}), ("shac+", {}), ("shacpp", {}), ("shacpp", {"num_steps": 8}),
                             ("shacpp", {"implementation": "authors"})):
        for arch in ("mlp", "transformer"):
            fake_run(runs, algorithm, "dispersion", 1, [0.1, 0.4], arch=arch, **extra)
    for policy, value in (("heuristic", 0.7), ("greedy", 1.0), ("random", 0.2), ("zero", 0.0)):
        fake_reference(runs, policy, "dispersion", 1, value)
    fake_run(runs, "ppo", "transport", 1, [0.3], n_agents=3)
    fig = plot.plot(groups_of(runs), "steps", str(tmp_path / "l.png"))
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "PPO/MAPPO", "SHAC", "SHAC+", "SHAC++", "SHAC++ (authors' code)", "heuristic (reference)",
        "greedy (reference)", "random (reference)", "mlp", "transformer"]
    handles = legend.legend_handles if hasattr(legend, "legend_handles") else legend.legendHandles
    assert len({h.get_color() for h in handles[:5]}) == 5 and {h.get_linestyle() for h in handles[5:8]} == {":"}
    assert [h.get_linestyle() for h in handles[8:]] == ["-", "--"]
    panels = {ax.get_title(): ax for ax in fig.axes if ax.axison}
    assert set(panels) == {"dispersion, 1 agent", "transport, 3 agents"}  # (dispersion, 3), (transport, 1): hidden
    assert len(fig.axes) == 4
    styles = [line.get_linestyle() for line in panels["dispersion, 1 agent"].get_lines()]
    assert sorted(styles) == ["-"] * 6 + ["--"] * 6 + [":"] * 3  # six curves per architecture, three levels
    levels = [line for line in panels["dispersion, 1 agent"].get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_ydata()[0] for line in levels) == [0.2, 0.7, 1.0]  # zero is not drawn
    plot.plt.close(fig)


def test_plot_says_when_it_found_nothing(tmp_path):
    fake_run(tmp_path, "ppo", "dispersion", 1, None)
    out = run_script("plot.py", [str(tmp_path)], tmp_path)
    assert out.returncode != 0
    assert out.stderr.splitlines()[-1] == f"error: found no run with an evaluation under {tmp_path}"
    assert not os.path.exists(tmp_path / "results.png")
    out = run_script("plot.py", [str(tmp_path / "missing")], tmp_path)
    assert out.returncode != 0 and out.stderr.strip() == f"error: {tmp_path / 'missing'} is not a folder"
