"""Run directories -> PNG plots per question, beside the tables `results` prints.

Per question (the grouping `results` uses), three figures:

- rates: hack and solve rate over steps, one line per arm (mean across its runs) with a min-max band;
- cin: cin_s and cin_t over steps per arm, each arm's cin_null_s (a random direction) dashed;
- final: each run's last-steps hack rate against its solve rate, one colour per arm.

matplotlib is an optional extra (`pip install -e '.[plot]'`); the tables never need it.

    python -m projected_grpo.plots [runs_root | out/sweeps/NAME] [--out out/plots]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from projected_grpo.config import arm_name
from projected_grpo.results import (
    LAST_STEPS,
    ResultsError,
    Run,
    arm_rank,
    group_questions,
    last_mean,
    load_runs,
    plot_files,
    question_title,
)

BAND = "line: mean across runs (seeds), band: min-max across them"
RATE_LIMITS = (-0.02, 1.02)  # rates share one scale, so figures compare at a glance


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ResultsError("plots need matplotlib: pip install -e '.[plot]'") from err
    matplotlib.use("Agg")  # files only: no display on a GPU box or in CI
    import matplotlib.pyplot as plt

    return plt


def step_series(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per logged step: steps, and the mean, min and max of `key` over the runs that have it there."""
    by_step = defaultdict(list)
    for run in runs:
        for row in run.rows:
            if row.get(key) is not None:
                by_step[row["step"]].append(row[key])
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def _mean_and_band(ax, runs: list[Run], key: str, colour, label: str) -> bool:
    """Draw the mean line and min-max band; False when no run logged `key`."""
    steps, mean, low, high = step_series(runs, key)
    if steps:
        ax.plot(steps, mean, color=colour, label=label)
        ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
    return bool(steps)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:  # an empty panel should say why it is empty
        ax.text(0.5, 0.5, "not logged by these runs", transform=ax.transAxes, ha="center")


def _finish(fig, title: str, caption: str):
    """The question as a wrapped title, the caption saying how to read the figure, under one layout."""
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 14)) + "\n" + caption, fontsize="small")
    fig.tight_layout()
    return fig


def _over_steps(plt, arms: dict, colours: dict, keys: dict[str, str], title: str, caption: str,
                null_key: str | None = None, ylim: tuple[float, float] | None = None):
    """One panel per metrics key, one mean line and band per arm; null_key dashed per arm when given."""
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], keys.items()):
        for arm, runs in arms.items():
            if _mean_and_band(ax, runs, key, colours[arm], arm_name(*arm)) and null_key:
                steps, null, _, _ = step_series(runs, null_key)
                ax.plot(steps, null, color=colours[arm], linestyle="--", linewidth=1)
        ax.set(title=panel_title, xlabel="step", ylim=ylim)
        _legend(ax)
    return _finish(fig, title, caption)


def _final_scatter(plt, arms: dict, colours: dict, title: str):
    fig, ax = plt.subplots(figsize=(6, 5))
    for arm, runs in arms.items():
        points = [(last_mean(run.rows, "gt_s"), last_mean(run.rows, "hack_s")) for run in runs]
        points = [(solve, hack) for solve, hack in points if solve is not None and hack is not None]
        if points:
            ax.scatter(*zip(*points), color=colours[arm], label=arm_name(*arm), alpha=0.8)
    ax.set(xlabel="solve (gt_s)", ylabel="hack (hack_s)", xlim=RATE_LIMITS, ylim=RATE_LIMITS)
    _legend(ax)
    return _finish(fig, title, f"one point per run: its mean over the last {LAST_STEPS} steps")


def make_plots(runs_root: str | Path, plots_dir: str | Path) -> list[Path]:
    """Write every question's PNGs under plots_dir; returns their paths."""
    plt = _pyplot()
    written = []
    for question, arms in sorted(group_questions(load_runs(Path(runs_root))).items()):
        arms = {arm: arms[arm] for arm in sorted(arms, key=arm_rank)}
        palette = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")  # distinct colours for up to 20 arms
        colours = {arm: palette(i % palette.N) for i, arm in enumerate(arms)}
        title = question_title(question)
        figures = {
            "rates": _over_steps(plt, arms, colours, {"hack_s": "hack rate (hack_s)", "gt_s": "solve rate (gt_s)"},
                                 title, BAND, ylim=RATE_LIMITS),
            "cin": _over_steps(plt, arms, colours, {"cin_s": "cin_s (student)", "cin_t": "cin_t (teacher)"},
                               title, f"{BAND}; dashed: cin_null_s, a random direction", null_key="cin_null_s"),
            "final": _final_scatter(plt, arms, colours, title),
        }
        for plot, path in plot_files(Path(plots_dir), question).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            figures[plot].savefig(path, dpi=100)
            plt.close(figures[plot])
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.plots", description=__doc__.split("\n")[0])
    parser.add_argument("runs_root", nargs="?", default="out/runs",
                        help="directory holding one folder per run (out/runs, or a sweep's out/sweeps/NAME)")
    parser.add_argument("--out", default="out/plots", help="folder for the PNGs, one subfolder per question")
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.runs_root, args.out)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written) if written else "No complete runs yet: nothing to plot.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
