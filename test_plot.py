"""plot.py on a synthetic runs folder: seeds grouped, a run still going, a run with no evaluation yet."""
import json
import os

import pytest

import plot
from test_smoke import run_script

HEADER = "episode,global_step,time,eval_return,max_return,normalized_return,solved_fraction\n"


def fake_run(root, algorithm, scenario, seed, returns, tail=""):
    run = root / f"{scenario}__1__mlp__{algorithm}__{seed}__{1000 + seed}"
    run.mkdir(parents=True)
    args = dict(exp_name=algorithm, seed=seed, scenario=scenario, n_agents=1, arch="mlp", episodes=100,
                checkpoint="", algorithm=algorithm)
    (run / "args.json").write_text(json.dumps(args))
    if returns is not None:
        lines = [f"{10 * (i + 1)},{320 * (i + 1)},{1.5 * (i + 1)},{r},1,{r},0\n" for i, r in enumerate(returns)]
        (run / "eval.csv").write_text(HEADER + "".join(lines) + tail)
    return run


def test_plot_groups_seeds_and_prints_table(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "ppo", "dispersion", 1, [0.1, 0.5, 0.4])
    fake_run(runs, "ppo", "dispersion", 2, [0.2, 0.3])
    fake_run(runs, "shacpp", "dispersion", 1, [0.6, 0.9])
    fake_run(runs, "shacpp", "dispersion", 2, [0.7], tail="20,640,3")  # still going: half-written last line
    fake_run(runs, "shac", "transport", 1, [0.25])
    empty = fake_run(runs, "shac", "transport", 2, None)  # no evaluation yet
    for x in ("episodes", "steps", "time"):
        out = run_script("plot.py", [str(runs), "--x", x, "--out", str(tmp_path / f"{x}.png"), "--pdf"], tmp_path)
        assert out.returncode == 0, out.stderr
        assert os.path.getsize(tmp_path / f"{x}.png") > 10_000 and os.path.exists(tmp_path / f"{x}.pdf")
    lines = out.stdout.splitlines()
    assert lines[0] == f"skipping {empty}: no evaluation yet"
    assert lines[1:5] == [
        "| scenario | agents | ppo mlp | shac mlp | shacpp mlp |",
        "|---|---|---|---|---|",
        "| dispersion | 1 | 0.400 (2) |  | **0.800** (2) |",  # mean over seeds of each seed's best
        "| transport | 1 |  | **0.250** (1) |  |",
    ]


def test_plot_says_when_it_found_nothing(tmp_path):
    fake_run(tmp_path, "ppo", "dispersion", 1, None)
    out = run_script("plot.py", [str(tmp_path)], tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip() == f"error: found no run with an evaluation under {tmp_path}"
    assert not os.path.exists(tmp_path / "results.png")


def test_curve_keeps_early_stopped_seed():
    """A seed that early-stopped keeps its last return in the mean; one still going counts only where it got to."""
    def row(episode, ret, solved):
        return dict(episode=episode, global_step=episode * 10, time=episode, normalized_return=ret,
                    solved_fraction=solved)
    stopped = ({"stop_fraction": 0.9}, [row(10, 0.2, 0.0), row(20, 0.8, 0.95)])
    going = ({"stop_fraction": 0.9}, [row(10, 0.4, 0.0), row(20, 0.4, 0.0), row(30, 0.6, 0.0)])
    partial = ({"stop_fraction": 0.9}, [row(10, 0.0, 0.0)])
    xs, means, stds = plot.curve([stopped, going, partial], "episodes")
    assert xs == [10, 20, 30]
    assert means == pytest.approx([0.2, 0.6, 0.7]) and stds[2] == pytest.approx(0.1)


def test_reference_rows(tmp_path):
    """reference.py's run folders (one evaluation, no architecture) are columns of their own after the learners,
    never bold, even when above them, and dashed levels in their panel of the figure."""
    runs = tmp_path / "runs"
    fake_run(runs, "ppo", "dispersion", 1, [0.1, 0.3])
    random = runs / "dispersion__1__reference__random__1"  # as reference.py writes it (one real run below)
    random.mkdir()
    (random / "args.json").write_text(json.dumps(dict(policy="random", scenario="dispersion", n_agents=1, seed=1,
                                                      algorithm="random")))
    (random / "eval.csv").write_text(HEADER + "0,0,1,0.2,1,0.2,0\n")
    out = run_script("reference.py", ["--policy", "greedy", "--scenario", "dispersion", "--n-agents", "1",
                                      "--eval-envs", "4", "--eval-steps", "100", "--runs", str(runs)], tmp_path)
    assert out.returncode == 0, out.stderr
    groups = plot.group(plot.find_runs([str(runs)]))
    assert plot.table(groups).splitlines() == [
        "| scenario | agents | ppo mlp | greedy | random |",
        "|---|---|---|---|---|",
        "| dispersion | 1 | **0.300** (1) | 1.000 (1) | 0.200 (1) |",  # greedy eats every food
    ]
    plot.plot(groups, "episodes", str(tmp_path / "r.png"), False)
    (ax,) = plot.plt.gcf().axes
    assert sorted(line.get_label() for line in ax.get_lines()) == [
        "greedy (reference)", "ppo mlp (1 seed)", "random (reference)"]
    levels = [line for line in ax.get_lines() if "reference" in line.get_label()]
    assert [line.get_ydata()[0] for line in levels] == [1.0, 0.2]
    assert all(line.get_linestyle() == ":" and line.get_ydata()[0] == line.get_ydata()[1] for line in levels)


def test_configurations_are_never_merged(tmp_path):
    """Two SHAC++ configurations that differ only in --num-steps, both without --exp-name: two groups, two labels
    naming the difference, two colours, two table columns; seeds of one configuration stay one group."""
    runs = tmp_path / "runs"
    for seed, steps, returns in ((1, 32, [0.2, 0.5]), (2, 32, [0.3, 0.4]), (1, 8, [0.6, 1.0])):
        run = fake_run(runs, "shacpp", "dispersion", seed, returns)
        args = json.loads((run / "args.json").read_text())
        (run / "args.json").write_text(json.dumps(args | dict(num_steps=steps, run_dir=str(run))))
        run.rename(run.with_name(run.name + f"_{steps}"))
    groups = plot.group(plot.find_runs([str(runs)]))
    assert sorted(plot.labels(groups).values()) == ["shacpp mlp (num_steps=32)", "shacpp mlp (num_steps=8)"]
    assert plot.table(groups).splitlines()[2] == "| dispersion | 1 | 0.450 (2) | **1.000** (1) |"
    plot.plot(groups, "episodes", str(tmp_path / "c.png"), False)
    (ax,) = plot.plt.gcf().axes
    lines = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert set(lines) == {"shacpp mlp (num_steps=32) (2 seeds)", "shacpp mlp (num_steps=8) (1 seed)"}
    assert len(set(lines.values())) == 2
    assert plot.plt.gcf().legends and not ax.get_legend()  # one legend, outside the panels


def test_experiment_names_label_their_configuration(tmp_path):
    runs = tmp_path / "runs"
    for name, steps in (("fast", 8), ("paper", 32)):
        run = fake_run(runs, "shacpp", "dispersion", 1, [0.5])
        args = json.loads((run / "args.json").read_text())
        (run / "args.json").write_text(json.dumps(args | dict(exp_name=name, num_steps=steps)))
        run.rename(run.with_name(run.name + name))
    labels = plot.labels(plot.group(plot.find_runs([str(runs)])))
    assert sorted(labels.values()) == ["shacpp mlp [fast]", "shacpp mlp [paper]"]


def test_runs_older_than_an_argument_join_their_configuration(tmp_path):
    """A SHAC++ run made before --credit existed ran with what is now --credit team: one configuration with a run
    that records it; a configuration with one experiment name per scenario is labelled with all of them."""
    runs = tmp_path / "runs"
    for name, scenario, steps, extra in (("old", "dispersion", 8, {}), ("new", "transport", 8, dict(credit="team")),
                                         ("paper", "dispersion", 32, dict(credit="team"))):
        run = fake_run(runs, "shacpp", scenario, 1, [0.5])
        args = json.loads((run / "args.json").read_text())
        (run / "args.json").write_text(json.dumps(args | dict(exp_name=name, num_steps=steps) | extra))
        run.rename(run.with_name(run.name + name))
    groups = plot.group(plot.find_runs([str(runs)]))
    assert sorted(plot.labels(groups).values()) == ["shacpp mlp [new/old]", "shacpp mlp [new/old]",
                                                    "shacpp mlp [paper]"]
