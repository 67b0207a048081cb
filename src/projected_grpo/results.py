"""Run directories -> markdown tables: does each arm hack less than vanilla GRPO at the same solve rate?

A *question* is one setting (preset, model, mix_ratio, basis_modes); within it each *arm*
(intervention, plus its negative control if any) is compared with vanilla (`none`, no control)
run on the same seed. Per run we average the last few steps, not the whole curve: early steps
measure the base model, the end measures what training taught it. Seeds are the unit of
replication, so spread and paired deltas are taken across seeds.

Only complete runs (summary.json says complete and every step is logged) enter the tables; the
rest are listed with the reason, so a crashed or running job can never skew a number silently.

    python -m projected_grpo.results [runs_root] [--out out/results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from projected_grpo.problems import MODES

LAST_STEPS = 5
VANILLA = ("none", "none")
INTERVENTION_ORDER = ("none", "erase", "route")
CONTROL_ORDER = ("none", "random", "shuffled", "nonhack")
# table column -> metrics.jsonl key
COLUMNS = {"hack": "hack_s", "solve": "gt_s", "cin_s": "cin_s", "cin_t": "cin_t", "cout": "cout"}
MISSING = "\u2013"  # en dash: a cell with no data, distinct from a minus sign
# config keys the grouping reads; anything else in config.json is ignored
REQUIRED_CONFIG = ("preset", "model", "mix_ratio", "basis_modes", "intervention", "control", "seed")

LEGEND = f"""\
Each number is a run's mean over its last {LAST_STEPS} logged steps, then mean ± sample std across seeds.

- **n**: number of seeds.
- **hack**: fraction of student completions that passed the flawed grader but failed the strict oracle.
- **solve**: fraction of student completions that pass the strict oracle.
- **cin_s / cin_t**: hack-ward fraction of the student / teacher gradient, ||relu(V g)|| / ||g||, before projection.
- **cout**: the same fraction after projection (near 0 under the one-sided gate by construction, not evidence).
- **Δhack / Δsolve**: arm minus the same-seed vanilla run, mean ± std over seeds with both ("k paired" if k < n).
- **per-mode cells**: hack/solve for that loophole mode; † marks a mode held out of the hack basis."""


class ResultsError(ValueError):
    """Unreadable run output or nothing to report; the message names the file (and line)."""


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
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        raise ResultsError(f"no runs directory at {runs_root} (train a run first, or pass the runs root)")
    runs = [load_run(d) for d in sorted(runs_root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not runs:
        raise ResultsError(f"no run directories under {runs_root}")
    return runs


def last_mean(rows: list[dict], key: str, window: int = LAST_STEPS) -> float | None:
    """Mean of `key` over the last `window` rows, skipping rows where it is null or absent."""
    values = [row[key] for row in rows[-window:] if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def _mode_rank(mode: str) -> tuple[int, str]:
    return (MODES.index(mode), mode) if mode in MODES else (len(MODES), mode)


def _split_modes(text: str) -> list[str]:
    return sorted({m.strip() for m in text.split(",") if m.strip()}, key=_mode_rank)


def question_of(config: dict) -> tuple:
    # basis_modes is a set: "a,b" and "b,a" are the same basis, so the same question
    basis = ",".join(_split_modes(config["basis_modes"]))
    return (config["preset"], config["model"], float(config["mix_ratio"]), basis)


def arm_name(arm: tuple[str, str]) -> str:
    intervention, control = arm
    return intervention if control == "none" else f"{intervention}+{control}"


def _arm_rank(arm: tuple[str, str]) -> tuple:
    def rank(name, order):
        return (order.index(name), name) if name in order else (len(order), name)

    intervention, control = arm
    return (control != "none", rank(intervention, INTERVENTION_ORDER), rank(control, CONTROL_ORDER))


def _by_seed(runs: list[Run], key: str) -> dict[int, float]:
    """Per seed, the last-steps mean of `key`; runs sharing a seed are averaged so each seed counts once."""
    per_seed = defaultdict(list)
    for run in runs:
        value = last_mean(run.rows, key)
        if value is not None:
            per_seed[run.config["seed"]].append(value)
    return {seed: statistics.fmean(values) for seed, values in per_seed.items()}


def _fmt(values: list[float], signed: bool = False, spread: bool = True) -> str:
    if not values:
        return MISSING
    mean = format(statistics.fmean(values), "+.3f" if signed else ".3f")
    return mean if len(values) == 1 or not spread else f"{mean} ± {statistics.stdev(values):.3f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _main_table(arms: dict[tuple, list[Run]]) -> list[str]:
    vanilla = arms.get(VANILLA, [])
    body = []
    for arm in sorted(arms, key=_arm_rank):
        runs = arms[arm]
        n = len({run.config["seed"] for run in runs})
        row = [arm_name(arm), str(n)] + [_fmt(list(_by_seed(runs, key).values())) for key in COLUMNS.values()]
        for key in ("hack_s", "gt_s"):
            if arm == VANILLA:
                row.append("")
                continue
            mine, base = _by_seed(runs, key), _by_seed(vanilla, key)
            deltas = [mine[seed] - base[seed] for seed in sorted(mine.keys() & base.keys())]
            # say how many seeds were paired when it is fewer than the row's n
            suffix = f" ({len(deltas)} paired)" if deltas and len(deltas) < n else ""
            row.append(_fmt(deltas, signed=True) + suffix if deltas else "")
        body.append(row)
    return _table(["arm", "n", *COLUMNS, "Δhack", "Δsolve"], body)


def _mode_table(arms: dict[tuple, list[Run]], basis_modes: str) -> list[str]:
    modes = sorted(
        {key.split("/", 1)[1] for runs in arms.values() for run in runs for row in run.rows for key in row
         if key.startswith("hack_s/")},
        key=_mode_rank,
    )
    if not modes:
        return []
    basis = set(_split_modes(basis_modes))
    header = ["arm"] + [mode if mode in basis else f"{mode}†" for mode in modes]
    body = []
    for arm in sorted(arms, key=_arm_rank):
        cells = [arm_name(arm)]
        for mode in modes:
            hack = _fmt(list(_by_seed(arms[arm], f"hack_s/{mode}").values()), spread=False)
            solve = _fmt(list(_by_seed(arms[arm], f"gt_s/{mode}").values()), spread=False)
            cells.append(f"{hack}/{solve}")
        body.append(cells)
    return _table(header, body)


def build_report(runs_root: str | Path) -> str:
    runs = load_runs(Path(runs_root))
    complete = [run for run in runs if run.problem is None]
    incomplete = [run for run in runs if run.problem is not None]

    questions: dict[tuple, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in complete:
        questions[question_of(run.config)][run.arm].append(run)

    out = [
        "# Results",
        "",
        f"`{runs_root}`: {len(complete)} complete runs, {len(incomplete)} incomplete.",
        "",
        "## Legend",
        "",
        LEGEND,
        "",
    ]
    if not questions:
        out += ["No complete runs yet.", ""]
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    for (preset, model, mix_ratio, basis_modes), arms in sorted(questions.items()):
        out += [f"## preset={preset} · model={model} · mix_ratio={mix_ratio:g} · basis_modes={basis_modes}", ""]
        out += _main_table(arms) + [""]
        mode_table = _mode_table(arms, basis_modes)
        if mode_table:
            out += ["Per mode (hack/solve):", "", *mode_table, ""]
        for arm, arm_runs in arms.items():
            seeds = [run.config["seed"] for run in arm_runs]
            if len(seeds) != len(set(seeds)):
                # a repeated seed usually means a setting outside the question key differs (gate, steps, ...)
                notes.append(f"arm {arm_name(arm)} at {preset}/{model}/mix_ratio={mix_ratio:g}/{basis_modes} "
                             f"has repeated seeds; their runs were averaged per seed")

    if incomplete:
        body = [[run.name, f"{len(run.rows)} / {run.config.get('steps', '?') if run.config else '?'}", run.problem]
                for run in incomplete]
        out += ["## Incomplete runs", "", *_table(["run", "steps done / steps", "why"], body), ""]
    if notes:
        out += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.results", description=__doc__.split("\n")[0])
    parser.add_argument("runs_root", nargs="?", default="out/runs", help="directory holding one folder per run")
    parser.add_argument("--out", default="out/results.md", help="where to write the markdown report")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.runs_root)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
