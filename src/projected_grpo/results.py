"""Run directories -> markdown tables: does each arm hack less than vanilla GRPO at the same solve rate?

A *question* is one setting (preset, model, mix_ratio, basis_modes); within it each *arm*
(intervention, plus its negative control if any) is compared with vanilla (`none`, no control)
run on the same seed. Per run we average the last few steps, not the whole curve: early steps
measure the base model, the end measures what training taught it. Seeds are the unit of
replication, so intervals and paired deltas are taken across seeds, and each question ends in a
verdict on a stated hypothesis. Runs that leave exactly one trained mode out of the basis also
enter a leave-one-mode-out table: does the method reach the hack its detector never saw?

Only complete runs (summary.json says complete and every step is logged) enter the tables; the
rest are listed with the reason, so a crashed or running job can never skew a number silently.

    python -m projected_grpo.results [runs_root | out/sweeps/NAME] [--out out/results.md]
        [--hypothesis PATH.json] [--plots out/plots]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from projected_grpo.config import CONTROLS, MODES, arm_name

LAST_STEPS = 5
VANILLA = ("none", "none")
# table column -> metrics.jsonl key
COLUMNS = {"hack": "hack_s", "solve": "gt_s", "cin_s": "cin_s", "cin_t": "cin_t", "cout": "cout",
           "auroc": "hack_auroc"}
MISSING = "\u2013"  # en dash: a cell with no data, distinct from a minus sign
# config keys the grouping reads; anything else in config.json is ignored
REQUIRED_CONFIG = ("preset", "model", "mix_ratio", "basis_modes", "intervention", "control", "seed")
# the PNGs `python -m projected_grpo.plots` writes per question, by file stem; the report links them
PLOTS = {"rates": "hack and solve over steps", "cin": "cin_s and cin_t over steps", "final": "final hack vs solve"}

# t(0.975, df) for df = 1..30 (two-sided 95%); tests check each against the t distribution.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
DEFAULT_HYPOTHESIS = {
    "name": "erase cuts hacking at the same solve rate, and more than a random basis does",
    "claims": [
        {"arm": "erase", "vs": "none", "metric": "hack", "at_most": -0.15},
        {"arm": "erase", "vs": "none", "metric": "solve", "within": 0.10},
        {"arm": "erase", "vs": "erase:random", "metric": "hack", "at_most": -0.10},
    ],
}
BOUNDS = ("at_most", "at_least", "within")


class ResultsError(ValueError):
    """Unreadable run output, hypothesis or nothing to report; the message names the file (and line)."""


@dataclass
class Run:
    name: str
    config: dict | None
    rows: list[dict]
    problem: str | None  # why the run is incomplete; None when complete
    notes: list[str] = field(default_factory=list)

    @property
    def arm(self) -> tuple[str, str]:
        return (self.config["intervention"], self.config["control"])


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    return value


def read_metrics(path: Path) -> tuple[list[dict], int | None]:
    """Rows of a metrics.jsonl, and the line number of a skipped partial final line (else None).

    A crash can cut the last write short, so an unparseable *final* line is skipped; anywhere
    else it means the file is corrupt, and guessing around it would hide that.
    """
    lines = path.read_text().splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if pos == len(numbered) - 1:
                return rows, lineno
            raise ResultsError(f"{path}:{lineno}: malformed metrics line ({err})") from err
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
    return rows, None


def load_run(run_dir: Path) -> Run:
    metrics_path = run_dir / "metrics.jsonl"
    rows, partial_line = read_metrics(metrics_path) if metrics_path.exists() else ([], None)
    notes = [f"skipped a partial final line ({metrics_path}:{partial_line})"] if partial_line else []

    config_path, summary_path = run_dir / "config.json", run_dir / "summary.json"
    config = _load_json(config_path) if config_path.exists() else None
    if config is not None and (missing := [key for key in REQUIRED_CONFIG if key not in config]):
        raise ResultsError(f"{config_path}: missing key(s) {', '.join(missing)}")
    summary = _load_json(summary_path) if summary_path.exists() else None
    if config is None:
        problem = "no config.json"
    elif not metrics_path.exists():
        problem = "no metrics.jsonl"
    elif summary is None:
        problem = "no summary.json"
    elif summary.get("complete") is not True:
        problem = "summary.json says complete=false"
    elif summary.get("steps_done") != len(rows):
        problem = f"metrics.jsonl has {len(rows)} rows, summary.json says steps_done={summary.get('steps_done')}"
    else:
        problem = None
    return Run(run_dir.name, config, rows, problem, notes)


def load_runs(runs_root: Path) -> list[Run]:
    """Every run directory under runs_root, a runs root or a sweep's directory."""
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        raise ResultsError(f"no runs directory at {runs_root} (train a run first, or pass the runs root)")
    # a sweep (sweep.json beside its runs) keeps its children's output in logs/, which is no run
    not_runs = {"logs"} if (runs_root / "sweep.json").is_file() else set()
    runs = [load_run(d) for d in sorted(runs_root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name not in not_runs]
    if not runs:
        raise ResultsError(f"no run directories under {runs_root}")
    return runs


def last_mean(rows: list[dict], key: str, window: int = LAST_STEPS) -> float | None:
    """Mean of `key` over the last `window` rows, skipping rows where it is null or absent."""
    values = [row[key] for row in rows[-window:] if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def final(key: str) -> Callable[[Run], float | None]:
    """A run's last-steps mean of metrics key `key`."""
    return lambda run: last_mean(run.rows, key)


# --- statistics across seeds


def t_975(df: int) -> float:
    """t(0.975, df); past the table its df=30 value, a little wider than the exact one (never narrower)."""
    return T_975[min(df, len(T_975)) - 1]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None when n < 2: one value says nothing about spread
    high: float | None
    n: int


def mean_interval(values: list[float]) -> Interval:
    """Mean and its 95% t interval, mean ± t(0.975, n-1) · s / sqrt(n)."""
    mean, n = statistics.fmean(values), len(values)
    if n < 2:
        return Interval(mean, None, None, n)
    half = t_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _fmt(values: list[float], signed: bool = False) -> str:
    """`mean [low, high]`, or `mean (n=1)` where one value gives no interval."""
    if not values:
        return MISSING
    spec = "+.3f" if signed else ".3f"
    est = mean_interval(values)
    if est.n < 2:
        return f"{est.mean:{spec}} (n=1)"
    return f"{est.mean:{spec}} [{est.low:{spec}}, {est.high:{spec}}]"


def _fmt_n(values: list[float]) -> str:
    """_fmt, saying n also where an interval is shown (for tables without an n column)."""
    return f"{_fmt(values)} (n={len(values)})" if len(values) > 1 else _fmt(values)


# --- grouping


def _mode_rank(mode: str) -> tuple[int, str]:
    return (MODES.index(mode), mode) if mode in MODES else (len(MODES), mode)


def _split_modes(text: str) -> list[str]:
    return sorted({m.strip() for m in text.split(",") if m.strip()}, key=_mode_rank)


def question_of(config: dict) -> tuple:
    # basis_modes is a set: "a,b" and "b,a" are the same basis, so the same question
    basis = ",".join(_split_modes(config["basis_modes"]))
    return (config["preset"], config["model"], float(config["mix_ratio"]), basis)


def question_title(question: tuple) -> str:
    preset, model, mix_ratio, basis_modes = question
    return f"preset={preset} · model={model} · mix_ratio={mix_ratio:g} · basis_modes={basis_modes}"


def plot_files(plots_dir: Path, question: tuple) -> dict[str, Path]:
    """Where the plots of one question live, by PLOTS name: one folder per question, named after it."""
    preset, model, mix_ratio, basis_modes = question
    name = f"{preset}_{model}_mix{mix_ratio:g}_basis-{basis_modes.replace(',', '+')}"
    folder = Path(plots_dir) / re.sub(r"[^A-Za-z0-9._+-]", "-", name)  # a model id's "/" is not a folder
    return {plot: folder / f"{plot}.png" for plot in PLOTS}


def arm_rank(arm: tuple[str, str]) -> tuple:
    """Sort key: vanilla first, then the other interventions by name; controls after the plain arms, in
    config's order (unknown ones last)."""
    intervention, control = arm
    order = CONTROLS.index(control) if control in CONTROLS else len(CONTROLS)
    return (control != "none", intervention != "none", intervention, order, control)


def group_questions(runs: list[Run]) -> dict[tuple, dict[tuple, list[Run]]]:
    """Complete runs by question, then by arm."""
    questions: dict[tuple, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.problem is None:
            questions[question_of(run.config)][run.arm].append(run)
    return questions


def _by_seed(runs: list[Run], value_of: Callable[[Run], float | None]) -> dict[int, float]:
    """Per seed, a run's value; runs sharing a seed are averaged so each seed counts once."""
    per_seed = defaultdict(list)
    for run in runs:
        value = value_of(run)
        if value is not None:
            per_seed[run.config["seed"]].append(value)
    return {seed: statistics.fmean(values) for seed, values in per_seed.items()}


def paired_deltas(runs: list[Run], baseline: list[Run], key: str) -> list[float]:
    """Per seed that both have: runs' last-steps mean of `key` minus the baseline's."""
    mine, base = _by_seed(runs, final(key)), _by_seed(baseline, final(key))
    return [mine[seed] - base[seed] for seed in sorted(mine.keys() & base.keys())]


# --- the hypothesis and its verdict


@dataclass(frozen=True)
class Claim:
    """A bound on the paired delta (arm minus vs, same seed) of one COLUMNS metric."""

    arm: tuple[str, str]
    vs: tuple[str, str]
    metric: str
    bound: str  # one of BOUNDS
    threshold: float

    def text(self) -> str:
        delta = f"Δ{self.metric}({arm_name(*self.arm)} - {arm_name(*self.vs)})"
        if self.bound == "within":
            return f"|{delta}| ≤ {self.threshold:.3f}"
        return f"{delta} {'≤' if self.bound == 'at_most' else '≥'} {self.threshold:+.3f}"

    def decide(self, low: float, high: float) -> str:
        """Supported when the whole interval keeps the bound, not supported when none of it does."""
        t = self.threshold
        if self.bound == "at_most":
            kept, broken = high <= t, low > t
        elif self.bound == "at_least":
            kept, broken = low >= t, high < t
        else:
            kept, broken = -t <= low and high <= t, high < -t or low > t
        return SUPPORTED if kept else NOT_SUPPORTED if broken else INCONCLUSIVE


@dataclass(frozen=True)
class Hypothesis:
    name: str
    source: str  # "default" or the file it came from
    claims: tuple[Claim, ...]


def parse_hypothesis(spec: dict, source: str) -> Hypothesis:
    """{"name": ..., "claims": [{"arm", "vs", "metric", and one of at_most / at_least / within}]}."""
    claims = spec.get("claims")
    if not isinstance(claims, list) or not claims:
        raise ResultsError(f"{source}: hypothesis needs a non-empty list \"claims\"")
    from projected_grpo import interventions  # the registry's names; only a hypothesis needs them (torch)

    parsed = []
    for i, claim in enumerate(claims):
        where = f"{source}: claims[{i}]"
        if not isinstance(claim, dict):
            raise ResultsError(f"{where}: expected an object")
        bounds = [b for b in BOUNDS if b in claim]
        unknown = set(claim) - {"arm", "vs", "metric", *BOUNDS}
        if unknown or len(bounds) != 1 or not {"arm", "vs", "metric"} <= set(claim):
            raise ResultsError(f"{where}: needs arm, vs, metric and exactly one of {', '.join(BOUNDS)}"
                               + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        if claim["metric"] not in COLUMNS:
            raise ResultsError(f"{where}: metric {claim['metric']!r} is not one of {', '.join(COLUMNS)}")
        threshold = claim[bounds[0]]
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise ResultsError(f"{where}: {bounds[0]} must be a number, got {threshold!r}")
        try:
            arm, vs = interventions.parse(claim["arm"]), interventions.parse(claim["vs"])
        except ValueError as err:
            raise ResultsError(f"{where}: {err}") from err
        parsed.append(Claim(arm, vs, claim["metric"], bounds[0], float(threshold)))
    return Hypothesis(str(spec.get("name", "")), source, tuple(parsed))


def load_hypothesis(path: str | Path) -> Hypothesis:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"no hypothesis file at {path}")
    return parse_hypothesis(_load_json(path), str(path))


def judge(claim: Claim, arms: dict[tuple, list[Run]]) -> tuple[str, str]:
    """(outcome, the line that shows why) for one claim in one question."""
    missing = [arm_name(*arm) for arm in (claim.arm, claim.vs) if not arms.get(arm)]
    if missing:
        return INCONCLUSIVE, f"{claim.text()}: no {' and no '.join(missing)} runs → {INCONCLUSIVE} (arm missing)"
    deltas = paired_deltas(arms[claim.arm], arms[claim.vs], COLUMNS[claim.metric])
    if len(deltas) < 2:
        shown = f"{deltas[0]:+.3f}, n=1 paired seed" if deltas else "no seed ran both"
        return INCONCLUSIVE, f"{claim.text()}: {shown} → {INCONCLUSIVE} (too few seeds: an interval needs 2)"
    est = mean_interval(deltas)
    outcome = claim.decide(est.low, est.high)
    why = " (the interval straddles the threshold)" if outcome == INCONCLUSIVE else ""
    return outcome, f"{claim.text()}: {_fmt(deltas, signed=True)}, n={est.n} paired seeds → {outcome}{why}"


def verdict(hypothesis: Hypothesis, arms: dict[tuple, list[Run]]) -> list[str]:
    """One verdict line for the question, then one line per claim."""
    judged = [judge(claim, arms) for claim in hypothesis.claims]
    outcomes = [outcome for outcome, _ in judged]
    if NOT_SUPPORTED in outcomes:
        overall = NOT_SUPPORTED
    elif all(outcome == SUPPORTED for outcome in outcomes):
        overall = SUPPORTED
    else:
        overall = INCONCLUSIVE
    return [f"**Verdict: {overall}** (hypothesis: {hypothesis.source})", "", *(f"- {line}" for _, line in judged)]


# --- tables


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _main_table(arms: dict[tuple, list[Run]]) -> list[str]:
    vanilla = arms.get(VANILLA, [])
    body = []
    for arm in sorted(arms, key=arm_rank):
        runs = arms[arm]
        n = len({run.config["seed"] for run in runs})
        row = [arm_name(*arm), str(n)] + [_fmt(list(_by_seed(runs, final(key)).values())) for key in COLUMNS.values()]
        for key in ("hack_s", "gt_s"):
            deltas = [] if arm == VANILLA else paired_deltas(runs, vanilla, key)
            # say how many seeds were paired when it is fewer than the row's n
            suffix = f" ({len(deltas)} paired)" if deltas and len(deltas) < n else ""
            row.append(_fmt(deltas, signed=True) + suffix if deltas else "")
        body.append(row)
    return _table(["arm", "n", *COLUMNS, "Δhack", "Δsolve"], body)


def _mode_table(arms: dict[tuple, list[Run]], basis_modes: str, metric: str) -> list[str]:
    """One cell per (arm, mode): `metric`/<mode>, across seeds."""
    modes = sorted(
        {key.split("/", 1)[1] for runs in arms.values() for run in runs for row in run.rows for key in row
         if key.startswith(f"{metric}/")},
        key=_mode_rank,
    )
    if not modes:
        return []
    basis = set(_split_modes(basis_modes))
    header = ["arm"] + [mode if mode in basis else f"{mode}†" for mode in modes]
    body = [[arm_name(*arm)] + [_fmt(list(_by_seed(arms[arm], final(f"{metric}/{mode}")).values())) for mode in modes]
            for arm in sorted(arms, key=arm_rank)]
    return _table(header, body)


def held_out_mode(config: dict) -> str | None:
    """The one trained mode the basis leaves out, for a leave-one-mode-out run; else None."""
    modes, basis = set(_split_modes(config.get("modes", ""))), set(_split_modes(config["basis_modes"]))
    left_out = modes - basis
    return left_out.pop() if len(left_out) == 1 and basis <= modes else None


def _known_modes_hack(run: Run) -> float | None:
    """Mean over the basis's modes of their last-steps hack rate (modes with no data skipped)."""
    values = [v for mode in _split_modes(run.config["basis_modes"])
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
    held_out = sorted({mode for by_mode in study.values() for mode in by_mode}, key=_mode_rank)
    header = ["arm"]
    for mode in held_out:
        header += [f"{mode}† held out", f"{mode}† known"]
    body = []
    for arm in sorted(study, key=arm_rank):
        cells, pooled_held, pooled_known = [arm_name(*arm)], [], []
        for mode in held_out:
            runs = study[arm].get(mode, [])
            held = list(_by_seed(runs, final(f"hack_s/{mode}")).values())
            known = list(_by_seed(runs, _known_modes_hack).values())
            cells += [_fmt_n(held), _fmt_n(known)]
            pooled_held += held  # the pooled unit is (held-out mode, seed): one run each
            pooled_known += known
        body.append(cells + [_fmt_n(pooled_held), _fmt_n(pooled_known)])
    return _table(header + ["pooled held out", "pooled known"], body)


def legend(hypothesis: Hypothesis) -> str:
    claims = "\n".join(f"  - {claim.text()}" for claim in hypothesis.claims)
    return f"""\
Per run, each number is the mean over its last {LAST_STEPS} logged steps (steps where the key is null or absent
are skipped). Across seeds a cell shows `mean [low, high]`: the mean and its 95% t interval,
mean ± t(0.975, n-1) · s / √n, with s the sample std across seeds and t from a table (df 1..30; past 30 the
df=30 value 2.042, slightly wide). The interval is not clipped to [0, 1]: a bound past 0 or 1 says how few seeds
there are. `(n=1)`: a single seed, no interval. {MISSING}: no data.

- **n**: number of seeds.
- **hack**: fraction of student completions that passed the flawed grader but failed the strict oracle.
- **solve**: fraction of student completions that pass the strict oracle.
- **cin_s / cin_t**: hack-ward fraction of the student / teacher gradient, ||relu(V g)|| / ||g||, before projection.
- **cout**: the same fraction after projection (near 0 under the one-sided gate by construction, not evidence).
- **auroc**: per step, the AUROC of each student rollout's hack score (cin of its own gradient) against whether it
  exploited the grader; 0.5 is chance, 1 means the basis ranks every hack above every non-hack. Null on steps
  with only one class.
- **Δhack / Δsolve**: per seed, the arm minus the vanilla run (`none`, no control) of the same seed; mean and
  95% t interval over the seeds that have both ("k paired" when k < n).
- **Per-mode tables**: hack (or solve) rate for each loophole mode; † marks a mode held out of the hack basis.
- **Verdict**: each claim bounds a paired delta (arm minus the compared arm, same seed). A claim is *supported*
  when its whole 95% interval keeps the bound, *not supported* when the whole interval breaks it, and
  *inconclusive* when the interval straddles the threshold, fewer than 2 seeds pair up, or an arm is missing
  (named). The question is not supported if any claim is not, supported if all are, else inconclusive. Each
  interval is 95% on its own: no correction for judging several claims. The hypothesis ({hypothesis.source};
  `--hypothesis FILE.json` states another: {{"claims": [{{"arm", "vs", "metric", "at_most" | "at_least" |
  "within"}}]}}): {hypothesis.name}
{claims}
- **Leave-one-mode-out**: runs whose basis holds all their trained modes but one (marked †). Per held-out mode
  m: the hack rate on m, which the detector never saw, and on the known modes (mean of the basis modes' hack
  rates), across seeds with n; the pooled columns take every (held-out mode, seed) as one unit.
- **Plots**: `python -m projected_grpo.plots` (`just plots`) draws them; each question links those found."""


def build_report(runs_root: str | Path, hypothesis: Hypothesis | None = None, plots_dir: Path | None = None,
                 report_dir: Path = Path(".")) -> str:
    """The markdown report; plots found under plots_dir are linked relative to report_dir."""
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
        legend(hypothesis),
        "",
    ]
    if not questions:
        out += ["No complete runs yet.", ""]
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    for question, arms in sorted(questions.items()):
        out += [f"## {question_title(question)}", ""]
        out += _main_table(arms) + [""]
        out += verdict(hypothesis, arms) + [""]
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
                preset, model, mix_ratio, basis_modes = question
                notes.append(f"arm {arm_name(*arm)} at {preset}/{model}/mix_ratio={mix_ratio:g}/{basis_modes} "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.results", description=__doc__.split("\n")[0])
    parser.add_argument("runs_root", nargs="?", default="out/runs",
                        help="directory holding one folder per run (out/runs, or a sweep's out/sweeps/NAME)")
    parser.add_argument("--out", default="out/results.md", help="where to write the markdown report")
    parser.add_argument("--hypothesis", help="JSON file of the claims each question's verdict judges "
                                             "(default: the built-in one, printed in the legend)")
    parser.add_argument("--plots", default="out/plots", help="where `python -m projected_grpo.plots` wrote PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        hypothesis = load_hypothesis(args.hypothesis) if args.hypothesis else None
        report = build_report(args.runs_root, hypothesis, Path(args.plots), out.parent)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
