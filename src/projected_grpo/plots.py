"""Run directories -> PNG plots per question, beside the tables `results` prints.

Per question (the grouping `results` uses), three figures:

- rates: hack and solve rate over steps, the early window `results` reads shaded;
- cin: cin_s and cin_t over steps per arm, each arm's cin_null_s (a random direction) dashed;
- final: each run's last-steps hack rate against its solve rate, one colour per arm;
- recall, where an arm ran with the detector at more than one recall: each arm's run-mean hack rate on
  the known modes and on the held-out ones against the recall, vanilla (which reads no monitor) flat.

Over steps each arm is a bold trailing mean (the window `results` times the rise with) drawn over
its faint per-step curve, the mean across its runs with a min-max band: the per-step curves of
several arms overlap into one band, their trailing means stay apart.

matplotlib is an optional extra (`pip install -e '.[plot]'`); the tables never need it.

    python -m projected_grpo.plots [runs_root | out/sweeps/NAME] [--out out/plots] [--early_steps N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from projected_grpo.config import arm_name, split_monitor, with_monitor
from projected_grpo.results import EARLY_HELP, positive_int
from projected_grpo.runs import (
    LAST_STEPS,
    ROLLING,
    VANILLA,
    ResultsError,
    Run,
    arm_rank,
    early_window,
    group_questions,
    last_mean,
    load_runs,
    modes_run_mean,
    plot_files,
    question_title,
    rolling_means,
)
from projected_grpo.verdicts import across_seeds, mean_interval

BAND = (f"bold: trailing {ROLLING}-step mean of the mean across runs (seeds); faint: that mean per step, "
        "band: min-max across runs")
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


def _smoothed_over_raw(ax, runs: list[Run], key: str, colour, label: str) -> bool:
    """Draw the faint per-step mean and min-max band, and over them their bold trailing mean (from the
    first full window on); False when no run logged `key`."""
    steps, mean, low, high = step_series(runs, key)
    if steps:
        ax.plot(steps, mean, color=colour, alpha=0.3, linewidth=0.8)
        ax.fill_between(steps, low, high, color=colour, alpha=0.1, linewidth=0)
        ax.plot(steps[ROLLING - 1:], rolling_means(mean), color=colour, linewidth=2, label=label)
    return bool(steps)


def early_span(runs: list[Run], early_steps: int | None) -> tuple[int, int] | None:
    """The steps the early window covers, first to last, over the runs (the longest window where they
    differ); None when no run logged a step."""
    windows = [run.rows[:early_window(run, early_steps)] for run in runs if run.rows]
    if not windows:
        return None
    return min(window[0]["step"] for window in windows), max(window[-1]["step"] for window in windows)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:  # an empty panel should say why it is empty
        ax.text(0.5, 0.5, "not logged by these runs", transform=ax.transAxes, ha="center")


def _finish(fig, title: str, caption: str):
    """The question as a wrapped title, the caption saying how to read the figure, under one layout."""
    width = int(fig.get_figwidth() * 14)  # characters of small type a line holds
    fig.suptitle(textwrap.fill(title, width) + "\n" + textwrap.fill(caption, width), fontsize="small")
    fig.tight_layout()
    return fig


def _over_steps(plt, arms: dict, colours: dict, keys: dict[str, str], title: str, caption: str,
                null_key: str | None = None, ylim: tuple[float, float] | None = None,
                shaded: tuple[int, int] | None = None):
    """One panel per metrics key, each arm smoothed over its raw curve; null_key dashed per arm and the
    steps `shaded` (the early window) shaded, when given."""
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], keys.items()):
        if shaded:
            ax.axvspan(*shaded, color="grey", alpha=0.15, linewidth=0)
        for arm, runs in arms.items():
            if _smoothed_over_raw(ax, runs, key, colours[arm], arm_name(*arm)) and null_key:
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


def recall_lines(arms: dict) -> dict[tuple, dict[tuple[float, float], list[Run]]]:
    """The arms that ran with the detector at more than one recall: each as its arm with the exact detector
    (its probe kept) -> {(recall, false-positive rate): its runs there}."""
    lines: dict[tuple, dict[tuple[float, float], list[Run]]] = defaultdict(dict)
    for arm, runs in arms.items():
        intervention, monitor = split_monitor(arm[0])
        line = (with_monitor(intervention, monitor.get("monitor", "detector"), 1.0, 0.0,
                             float(monitor.get("probe_threshold", 0.5))), arm[1])
        lines[line][(float(monitor.get("detector_recall", 1.0)), float(monitor.get("detector_fpr", 0.0)))] = runs
    return {line: dict(sorted(points.items())) for line, points in lines.items() if len(points) > 1}


def _by_recall(plt, arms: dict, title: str):
    """Each recall line's run-mean hack rate on the known and on the held-out modes against the detector's
    recall (the false-positive rate under each tick), its 95% interval over seeds as error bars; vanilla,
    which reads no monitor, a flat line with its band. None when no arm ran at more than one recall."""
    lines = recall_lines(arms)
    if not lines:
        return None
    palette = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, known in zip(axes, (True, False)):
        value_of = modes_run_mean(known)
        if VANILLA in arms and (values := across_seeds(arms[VANILLA], value_of)):
            est = mean_interval(values)
            ax.axhline(est.mean, color="black", linestyle=":", label=f"{arm_name(*VANILLA)} (reads no monitor)")
            if est.low is not None:
                ax.axhspan(est.low, est.high, color="black", alpha=0.08, linewidth=0)
        for i, (line, points) in enumerate(sorted(lines.items(), key=lambda item: arm_rank(item[0]))):
            xs, ys, errors = [], [], []
            for (recall, _), runs in points.items():
                if values := across_seeds(runs, value_of):
                    est = mean_interval(values)
                    xs.append(recall)
                    ys.append(est.mean)
                    errors.append(0.0 if est.low is None else est.mean - est.low)
            if xs:
                ax.errorbar(xs, ys, yerr=errors, color=palette(i % palette.N), marker="o", capsize=3,
                            linestyle="--" if line[1] != "none" else "-", label=arm_name(*line))
        settings = sorted({point for points in lines.values() for point in points})
        ax.set_xticks([recall for recall, _ in settings], [f"{recall:g}\nfp {fpr:g}" for recall, fpr in settings])
        ax.set_xlim(settings[0][0] - 0.05, settings[-1][0] + 0.05)
        ax.set(title=f"hack rate over the run, {'known' if known else 'held-out'} modes",
               xlabel="the detector's recall of the known modes' hacks", ylim=RATE_LIMITS)
        _legend(ax)
    return _finish(fig, title, "one point per arm and recall: the mean across seeds of each run's hack rate over "
                               "its steps, 95% t interval; dashed: a control; dotted: vanilla with its interval")


def make_plots(runs_root: str | Path, plots_dir: str | Path, early_steps: int | None = None) -> list[Path]:
    """Write every question's PNGs under plots_dir; returns their paths. early_steps: the early window's
    length, as `results` takes it (None: a quarter of each run)."""
    plt = _pyplot()
    written = []
    for question, arms in sorted(group_questions(load_runs(Path(runs_root))).items()):
        arms = {arm: arms[arm] for arm in sorted(arms, key=arm_rank)}
        palette = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")  # distinct colours for up to 20 arms
        colours = {arm: palette(i % palette.N) for i, arm in enumerate(arms)}
        title = question_title(question)
        early = early_span([run for runs in arms.values() for run in runs], early_steps)
        shading = f"; shaded: the early window, steps {early[0]}-{early[1]}" if early else ""
        figures = {
            "rates": _over_steps(plt, arms, colours, {"hack_s": "hack rate (hack_s)", "gt_s": "solve rate (gt_s)"},
                                 title, BAND + shading, ylim=RATE_LIMITS, shaded=early),
            "cin": _over_steps(plt, arms, colours, {"cin_s": "cin_s (student)", "cin_t": "cin_t (teacher)"},
                               title, f"{BAND}; dashed: cin_null_s, a random direction", null_key="cin_null_s"),
            "final": _final_scatter(plt, arms, colours, title),
            "recall": _by_recall(plt, arms, title),
        }
        for plot, path in plot_files(Path(plots_dir), question).items():
            if figures[plot] is None:
                continue
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
    parser.add_argument("--early_steps", type=positive_int, help=EARLY_HELP)
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.runs_root, args.out, args.early_steps)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written) if written else "No complete runs yet: nothing to plot.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
