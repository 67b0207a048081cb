"""Run directories -> markdown tables: does each arm hack less than vanilla GRPO at the same solve rate?

A *question* is one setting (preset, model, mix_ratio, basis_modes); within it each *arm* (intervention,
with its gate and monitor where they are not the preset's and the exact detector, plus its negative control
if any) is compared with vanilla (`none`, no control)
run on the same seed. Per run the main table averages the last few steps: early steps measure the
base model, the end measures what training taught it. The end alone cannot tell an arm that
never hacks from one that hacks later, so a time-course table beside it reads the whole hack
curve: its mean over the run, over an early window, and the step at which the hack rate rises
(the delay). Seeds are the unit of replication, so intervals and paired deltas are taken across
seeds, and each question ends in a verdict on a stated hypothesis. Runs that leave exactly one
trained mode out of the basis also enter a leave-one-mode-out table: does the method reach the
hack its detector never saw?

A run whose live basis was built from the oracle's labels (`live_labels=oracle`) is a diagnostic
ceiling, never a method: its arm reads `<intervention>:ceiling`, and claims about it are printed
apart from the verdict and never counted in it.

Only complete runs (summary.json says complete and every step is logged) enter the tables; the
rest are listed with the reason, so a crashed or running job can never skew a number silently.

    python -m projected_grpo.results [runs_root | out/sweeps/NAME] [--out out/results.md]
        [--hypothesis PATH.json] [--plots out/plots] [--early_steps N]

This module writes the tables, the legend and the report; runs.py reads the runs and their figures,
verdicts.py holds the statistics and judges the claims.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from projected_grpo.config import arm_name
from projected_grpo.runs import (
    CEILING,
    COLUMNS,
    DELAY,
    EARLY,
    FIGURES,
    LAST_STEPS,
    LATE_FROM,
    PLOTS,
    ROLLING,
    RUN_MEAN,
    TIME_COURSE,
    VANILLA,
    ResultsError,
    Run,
    arm_rank,
    by_seed,
    censored_note,
    censored_seeds,
    early_window,
    final,
    group_questions,
    last_mean,
    load_runs,
    metric_of,
    mode_rank,
    plot_files,
    question_of,
    question_title,
    split_modes,
    vanilla_rises,
)
from projected_grpo.verdicts import (
    DEFAULT_HYPOTHESIS,
    MISSING,
    Hypothesis,
    across_seeds,
    decimals,
    fmt,
    load_hypothesis,
    paired_deltas,
    parse_hypothesis,
    verdict,
)

# projection figures, each beside the null it is read against: cin_s and update_hackward against
# cin_null_s (a random direction, concatenated over layers), cout against cin_null (its per-layer mean)
BESIDE_NULLS = ("cin_s", "cin_null_s", "update_hackward", "cout", "cin_null")
NOT_LOGGED = "n/a"  # the runs do not log the key at all (older runs)


def _fmt_n(values: list[float]) -> str:
    """fmt, saying n also where an interval is shown (for tables without an n column)."""
    return f"{fmt(values)} (n={len(values)})" if len(values) > 1 else fmt(values)


# --- tables


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _seed_count(runs: list[Run]) -> int:
    return len({run.config["seed"] for run in runs})


def _delta_cell(deltas: dict[int, float], n: int, places: int = 3) -> str:
    """A paired-delta cell, saying how many seeds were paired when it is fewer than the row's n."""
    if not deltas:
        return ""
    suffix = f" ({len(deltas)} paired)" if len(deltas) < n else ""
    return fmt(list(deltas.values()), signed=True, places=places) + suffix


def _main_table(arms: dict[tuple, list[Run]]) -> list[str]:
    vanilla = arms.get(VANILLA, [])
    body = []
    for arm in sorted(arms, key=arm_rank):
        runs, n = arms[arm], _seed_count(arms[arm])
        row = [arm_name(*arm), str(n)] + [fmt(across_seeds(runs, value)) for value in COLUMNS.values()]
        for key in ("hack_s", "gt_s"):
            row.append(_delta_cell({} if arm == VANILLA else paired_deltas(runs, vanilla, final(key)), n))
        body.append(row)
    return _table(["arm", "n", *COLUMNS, "Δhack", "Δsolve"], body)


def _delay_cell(runs: list[Run], delay_of: Callable[[Run], int | None]) -> str:
    """The delay across seeds: `>N` when every seed is censored (no rise within its N steps), else the mean
    and interval with censored seeds entered as N + 1; how many seeds are censored or undefined, if any."""
    delays = by_seed(runs, delay_of)
    if not delays:
        return "undefined"
    censored = censored_seeds(runs, delay_of)
    if censored == delays.keys():
        cell = f">{min(delays.values()) - 1:g}" + (f" (n={len(delays)})" if len(delays) > 1 else "")
    else:
        cell = fmt(list(delays.values()), places=1) + (f" ({len(censored)} censored)" if censored else "")
    undefined = _seed_count(runs) - len(delays)
    return cell + (f" ({undefined} undefined)" if undefined else "")


def _time_course_table(arms: dict[tuple, list[Run]], early_steps: int | None) -> list[str]:
    vanilla = arms.get(VANILLA, [])
    value_of = {metric: metric_of(metric, arms, early_steps) for metric in TIME_COURSE}
    body = []
    for arm in sorted(arms, key=arm_rank):
        runs, n = arms[arm], _seed_count(arms[arm])
        row = [arm_name(*arm), str(n), fmt(across_seeds(runs, value_of[RUN_MEAN])),
               fmt(across_seeds(runs, value_of[EARLY])), _delay_cell(runs, value_of[DELAY])]
        for metric in TIME_COURSE:
            deltas = {} if arm == VANILLA else paired_deltas(runs, vanilla, value_of[metric])
            cell = _delta_cell(deltas, n, decimals(metric))
            if metric == DELAY and deltas:
                cell += censored_note(deltas, runs, vanilla, value_of[DELAY])
            row.append(cell)
        body.append(row)
    return _table(["arm", "n", *TIME_COURSE, *(f"Δ{metric}" for metric in TIME_COURSE)], body)


def _figures_table(arms: dict[tuple, list[Run]]) -> list[str]:
    """Each FIGURES figure across seeds, then its paired Δ against vanilla (the null's and the probe's, which
    vanilla has not, have none)."""
    vanilla = arms.get(VANILLA, [])
    paired = [m for m in FIGURES if m not in ("null_run_mean", "probe_auroc_known", "probe_auroc_heldout")]
    body = []
    for arm in sorted(arms, key=arm_rank):
        runs, n = arms[arm], _seed_count(arms[arm])
        body.append([arm_name(*arm), str(n)] + [fmt(across_seeds(runs, FIGURES[m])) for m in FIGURES]
                    + [_delta_cell({} if arm == VANILLA else paired_deltas(runs, vanilla, FIGURES[m]), n)
                       for m in paired])
    return _table(["arm", "n", *FIGURES, *(f"Δ{m}" for m in paired)], body)


def _rise_line(vanilla: list[Run]) -> str:
    """Vanilla's rise per seed, which the delays are timed against, or why there is none."""
    rises = vanilla_rises(vanilla)
    if not rises:
        return f"No vanilla run logs hack_s: {DELAY} is undefined."
    parts = []
    for seed, (first, last) in sorted(rises.items()):
        rise = f"seed {seed}: {first:.3f} → {last:.3f}"
        parts.append(f"{rise}, midpoint {(first + last) / 2:.3f}" if last > first
                     else f"{rise}, did not rise: {DELAY} undefined")
    return f"Vanilla's hack over its first → last {ROLLING} steps: " + "; ".join(parts) + "."


def _logged_cell(runs: list[Run], key: str) -> str:
    """The last-steps mean of `key` across seeds; NOT_LOGGED where no run logs the key at all."""
    if not any(key in row for run in runs for row in run.rows):
        return NOT_LOGGED
    return fmt(across_seeds(runs, final(key)))


def _nulls_table(arms: dict[tuple, list[Run]]) -> list[str]:
    body = [[arm_name(*arm)] + [_logged_cell(arms[arm], key) for key in BESIDE_NULLS]
            for arm in sorted(arms, key=arm_rank)]
    return _table(["arm", *BESIDE_NULLS], body)


def _mode_table(arms: dict[tuple, list[Run]], basis_modes: str, metric: str) -> list[str]:
    """One cell per (arm, mode): `metric`/<mode>, across seeds."""
    modes = sorted(
        {key.split("/", 1)[1] for runs in arms.values() for run in runs for row in run.rows for key in row
         if key.startswith(f"{metric}/")},
        key=mode_rank,
    )
    if not modes:
        return []
    basis = set(split_modes(basis_modes))
    header = ["arm"] + [mode if mode in basis else f"{mode}†" for mode in modes]
    body = [[arm_name(*arm)] + [fmt(across_seeds(arms[arm], final(f"{metric}/{mode}"))) for mode in modes]
            for arm in sorted(arms, key=arm_rank)]
    return _table(header, body)


def held_out_mode(config: dict) -> str | None:
    """The one trained mode the basis leaves out, for a leave-one-mode-out run; else None."""
    modes, basis = set(split_modes(config.get("modes", ""))), set(split_modes(config["basis_modes"]))
    left_out = modes - basis
    return left_out.pop() if len(left_out) == 1 and basis <= modes else None


def _known_modes_hack(run: Run) -> float | None:
    """Mean over the basis's modes of their last-steps hack rate (modes with no data skipped)."""
    values = [v for mode in split_modes(run.config["basis_modes"])
              if (v := last_mean(run.rows, f"hack_s/{mode}")) is not None]
    return statistics.fmean(values) if values else None


def lomo_studies(runs: list[Run]) -> dict[tuple, dict[tuple, dict[str, list[Run]]]]:
    """Complete leave-one-mode-out runs by (preset, model, mix_ratio), then arm, then held-out mode."""
    studies: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in runs:
        if run.problem is None and (mode := held_out_mode(run.config)) is not None:
            preset, model, mix_ratio, _ = question_of(run.config)
            studies[(preset, model, mix_ratio)][run.arm][mode].append(run)
    return studies


def _lomo_table(study: dict[tuple, dict[str, list[Run]]]) -> list[str]:
    held_out = sorted({mode for by_mode in study.values() for mode in by_mode}, key=mode_rank)
    header = ["arm"]
    for mode in held_out:
        header += [f"{mode}† held out", f"{mode}† known"]
    body = []
    for arm in sorted(study, key=arm_rank):
        cells, pooled_held, pooled_known = [arm_name(*arm)], [], []
        for mode in held_out:
            runs = study[arm].get(mode, [])
            held = across_seeds(runs, final(f"hack_s/{mode}"))
            known = across_seeds(runs, _known_modes_hack)
            cells += [_fmt_n(held), _fmt_n(known)]
            pooled_held += held  # the pooled unit is (held-out mode, seed): one run each
            pooled_known += known
        body.append(cells + [_fmt_n(pooled_held), _fmt_n(pooled_known)])
    return _table(header + ["pooled held out", "pooled known"], body)


def legend(hypothesis: Hypothesis, early_steps: int | None = None) -> str:
    claims = "\n".join(f"  - {claim.text()}" + (f" (diagnostic {CEILING}, not counted)" if claim.ceiling else "")
                       for claim in hypothesis.claims)
    early = f"first {early_steps} steps (--early_steps)" if early_steps else \
        "first quarter of the run's steps (at least 1; --early_steps N sets it)"
    return f"""\
Per run, each number of the main, null and per-mode tables is the mean over its last {LAST_STEPS} logged steps
(steps where the key is null or absent are skipped). Across seeds a cell shows `mean [low, high]`: the mean and
its 95% t interval, mean ± t(0.975, n-1) · s / √n, with s the sample std across seeds and t from a table (df
1..30; past 30 the df=30 value 2.042, slightly wide). The interval is not clipped to [0, 1]: a bound past 0 or 1
says how few seeds there are. `(n=1)`: a single seed, no interval. {MISSING}: no data. {NOT_LOGGED}: the runs do
not log the key (older runs).

- **n**: number of seeds.
- **hack**: fraction of student completions that passed the flawed grader but failed the strict oracle.
- **solve**: fraction of student completions that pass the strict oracle.
- **cin_s / cin_t**: hack-ward fraction of the student / teacher gradient, ||relu(V g)|| / ||g||, before projection.
- **cout**: the same fraction after projection (near 0 under the one-sided gate by construction, not evidence).
- **auroc**: over the whole run, the AUROC of each student rollout's hack score (cin of its own log-likelihood
  gradient) against whether it exploited the grader, on the steps that took scores (every `hack_score_every`
  steps and the last; summary.json says how many); 0.5 is chance, 1 means the basis ranks every hack above every
  non-hack. Not a last-steps mean, unlike the columns before it. Null with only one class.
- **Δhack / Δsolve**: per seed, the arm minus the vanilla run (`none`, no control) of the same seed; mean and
  95% t interval over the seeds that have both ("k paired" when k < n).
- **`<intervention>:{CEILING}`**: runs whose live basis was built from the oracle's labels (`live_labels=oracle`),
  what projection could do with a V that knows every hack: a diagnostic ceiling, never a method. Claims about it
  are printed apart from the verdict and never counted in it.
- **Time course** (hack_s over every step, not only the last {LAST_STEPS}): **{RUN_MEAN}**, its mean over the whole
  run (the area under the hack curve over the steps); **{EARLY}**, its mean over the early window, the
  {early}; **{DELAY}**, the first step at which the arm's trailing {ROLLING}-step mean of hack_s (full windows only, so
  never before step {ROLLING}) reaches the midpoint of vanilla's rise on the same seed, (mean of vanilla's first
  {ROLLING} steps + mean of its last {ROLLING}) / 2. Later is better. An arm that never reaches it within its N
  steps is censored, shown `>N`, and enters means and Δ as N + 1, the earliest it could have: a Δ{DELAY} with
  the arm censored is a lower bound (with the compared arm censored, an upper one); "(k censored)" counts the
  seeds. Where vanilla did not rise on a seed (last {ROLLING} ≤ first {ROLLING}) the delay there is undefined and
  left out ("(k undefined)"); the line under the table gives vanilla's rise per seed. Each Δ is paired by seed
  as above.
- **Beside their nulls**: cin_s and update_hackward (the hack-ward fraction of the step the optimizer took) beside
  cin_null_s, what a random direction gives over the concatenated layers; cout beside cin_null, the per-layer
  mean of the same null. A figure says V is acting only where it beats its null here and the arm's random
  control in the same column.
- **The figures table**: **reward** and **format** (the code-block rate, format_s), last {LAST_STEPS} steps; over the
  whole run, **heldout_run_mean**, hack_s over every step on the trained modes the basis leaves out
  (the detector never flags them); **hack_late_slope**, the least-squares slope of hack_s over the steps after
  {LATE_FROM}, per 100 steps (an arm that delays hacking still rises there, one that prevents it does not);
  **update_hackward_run_mean** beside **null_run_mean** (cin_null_s), the hack-ward fraction of the actual update
  over every step and what a random direction gives; **eval_deployed_hack / eval_kept_hack / eval_deployed_solve**,
  the final held-out evaluation (hint prompts) with the quarantine ablated (deployed) or kept. Δ: paired with
  vanilla as above.
- **Per-mode tables**: hack (or solve) rate for each loophole mode; † marks a mode held out of the hack basis.
- **Verdict**: each claim bounds a paired delta (arm minus the compared arm, same seed) of a main-table metric
  (its last-{LAST_STEPS} mean), of {RUN_MEAN}, {EARLY} or {DELAY}, or of a whole-run figure. A claim is *supported*
  when its whole 95% interval keeps the bound, *not supported* when the whole interval breaks it, and
  *inconclusive* when the interval straddles the threshold, fewer than 2 seeds pair up, or an arm is missing
  (named). The question is not supported if any claim on a method is not, supported if all are, else
  inconclusive; claims naming a {CEILING} arm are judged the same way but listed apart, uncounted. Each
  interval is 95% on its own: no correction for judging several claims. The hypothesis ({hypothesis.source};
  `--hypothesis FILE.json` states another: {{"claims": [{{"arm", "vs", "metric", "at_most" | "at_least" |
  "within"}}]}}): {hypothesis.name}
{claims}
- **Leave-one-mode-out**: runs whose basis holds all their trained modes but one (marked †). Per held-out mode
  m: the hack rate on m, which the detector never saw, and on the known modes (mean of the basis modes' hack
  rates), across seeds with n; the pooled columns take every (held-out mode, seed) as one unit.
- **Plots**: `python -m projected_grpo.plots` (`just plots`) draws them; each question links those found.
  Over steps, each arm is a bold trailing {ROLLING}-step mean over its faint per-step curve, the early window
  shaded."""


def build_report(runs_root: str | Path, hypothesis: Hypothesis | None = None, plots_dir: Path | None = None,
                 report_dir: Path = Path("."), early_steps: int | None = None) -> str:
    """The markdown report; plots found under plots_dir are linked relative to report_dir. early_steps: the
    early window's length; None: a quarter of each run."""
    hypothesis = hypothesis or parse_hypothesis(DEFAULT_HYPOTHESIS, "default")
    runs = load_runs(Path(runs_root))
    complete = [run for run in runs if run.problem is None]
    incomplete = [run for run in runs if run.problem is not None]
    questions = group_questions(runs)

    out = [
        "# Results",
        "",
        f"`{runs_root}`: {len(complete)} complete runs, {len(incomplete)} incomplete.",
        "",
        "## Legend",
        "",
        legend(hypothesis, early_steps),
        "",
    ]
    if not questions:
        out += ["No complete runs yet.", ""]
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    for question, arms in sorted(questions.items()):
        out += [f"## {question_title(question)}", ""]
        out += _main_table(arms) + [""]
        windows = sorted({early_window(run, early_steps) for runs in arms.values() for run in runs})
        out += [f"Time course of hack ({EARLY}: the first {' or '.join(map(str, windows))} steps):", "",
                *_time_course_table(arms, early_steps), "", _rise_line(arms.get(VANILLA, [])), ""]
        out += ["Projection figures beside their nulls:", "", *_nulls_table(arms), ""]
        out += [f"Reward and format (last {LAST_STEPS}), over the whole run (the held-out mode, the slope past step "
                f"{LATE_FROM}, the update beside its null) and the final evaluation:", "", *_figures_table(arms), ""]
        out += verdict(hypothesis, arms, early_steps) + [""]
        for metric, label in (("hack_s", "hack"), ("gt_s", "solve")):
            if mode_table := _mode_table(arms, question[3], metric):
                out += [f"Per mode, {label}:", "", *mode_table, ""]
        if plots_dir is not None:
            found = {plot: path for plot, path in plot_files(plots_dir, question).items() if path.is_file()}
            if found:
                links = [f"[{PLOTS[plot]}]({Path(os.path.relpath(path, report_dir)).as_posix()})"
                         for plot, path in found.items()]
                out += ["Plots: " + " · ".join(links), ""]
        for arm, arm_runs in arms.items():
            seeds = [run.config["seed"] for run in arm_runs]
            if len(seeds) != len(set(seeds)):
                # a repeated seed usually means a setting outside the question key differs (gate, steps, ...)
                notes.append(f"arm {arm_name(*arm)} at {question_title(question)} "
                             f"has repeated seeds; their runs were averaged per seed")

    for (preset, model, mix_ratio), study in sorted(lomo_studies(runs).items()):
        out += [f"## Leave-one-mode-out · preset={preset} · model={model} · mix_ratio={mix_ratio:g}", "",
                *_lomo_table(study), ""]

    if incomplete:
        body = [[run.name, f"{len(run.rows)} / {run.config.get('steps', '?') if run.config else '?'}", run.problem]
                for run in incomplete]
        out += ["## Incomplete runs", "", *_table(["run", "steps done / steps", "why"], body), ""]
    if notes:
        out += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(out)


EARLY_HELP = "steps in the early window, from each run's first (default: a quarter of the run's steps, at least 1)"


def positive_int(text: str) -> int:
    """argparse type for --early_steps: a whole number of steps, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.results", description=__doc__.split("\n")[0])
    parser.add_argument("runs_root", nargs="?", default="out/runs",
                        help="directory holding one folder per run (out/runs, or a sweep's out/sweeps/NAME)")
    parser.add_argument("--out", default="out/results.md", help="where to write the markdown report")
    parser.add_argument("--hypothesis", help="JSON file of the claims each question's verdict judges "
                                             "(default: the built-in one, printed in the legend)")
    parser.add_argument("--plots", default="out/plots", help="where `python -m projected_grpo.plots` wrote PNGs")
    parser.add_argument("--early_steps", type=positive_int, help=EARLY_HELP)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        hypothesis = load_hypothesis(args.hypothesis) if args.hypothesis else None
        report = build_report(args.runs_root, hypothesis, Path(args.plots), out.parent, args.early_steps)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
