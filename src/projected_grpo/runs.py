"""Run directories read back: each run's config, metrics rows and summary (complete runs only enter the
tables; the rest carry the reason), its per-run figures (last-steps means, the hack curve's time course,
the known and held-out modes, the final evaluation), and runs grouped by question and arm.

A *question* is one setting (preset, model, mix_ratio, basis_modes); an *arm* is the intervention, with its
gate and monitor where they are not the preset's and the exact detector, and its control.

Module order: above config and files; verdicts, results and plots import it.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from projected_grpo.config import CONTROLS, MODES, with_gate, with_monitor
from projected_grpo.files import read_json

LAST_STEPS = 5
ROLLING = 10  # steps in the trailing mean that times the rise, and in vanilla's first and last windows
VANILLA = ("none", "none")
CEILING = "ceiling"  # the arm suffix of a run whose basis knew the oracle's labels
# the time course of hack_s, as hypothesis metrics and table columns; the delay is in steps
RUN_MEAN, EARLY, DELAY = "hack_run_mean", "hack_early", "hack_delay"
TIME_COURSE = (RUN_MEAN, EARLY, DELAY)
LATE_FROM = 50  # the slope of hack_s past this step: "prevents" and "delays" differ in whether it still rises
# config keys the grouping reads; anything else in config.json is ignored
REQUIRED_CONFIG = ("preset", "model", "mix_ratio", "basis_modes", "intervention", "control", "seed")
# the PNGs `python -m projected_grpo.plots` writes per question, by file stem; the report links them
PLOTS = {"rates": "hack and solve over steps", "cin": "cin_s and cin_t over steps", "final": "final hack vs solve",
         "recall": "hack against the detector's recall"}


class ResultsError(ValueError):
    """Unreadable run output, hypothesis or nothing to report; the message names the file (and line)."""


@dataclass
class Run:
    name: str
    config: dict | None
    rows: list[dict]
    problem: str | None  # why the run is incomplete; None when complete
    notes: list[str] = field(default_factory=list)
    summary: dict | None = None  # summary.json: the final evaluation lives there

    @property
    def arm(self) -> tuple[str, str]:
        """(intervention[@gate][~monitor], control): a gate written where it is not the preset's and the arm
        trains with V, a monitor where it is not the exact detector and the arm reads it (only there can either
        change a run), so two gates or two monitors are two arms; a run whose basis knew the oracle's labels is
        its intervention's ceiling."""
        config, intervention = self.config, self.config["intervention"]
        uses_basis, reads_monitor = _reads(intervention)
        labelled = with_gate(intervention, config["gate"], config["preset"]) if "gate" in config and uses_basis \
            else intervention
        # the detector's recall and false positives reach a V built from its flags (self or live pairs)
        reads_detector = reads_monitor or (uses_basis and config.get("pairs") in ("self", "live")
                                           and not is_ceiling(config))
        if reads_detector:
            labelled = with_monitor(labelled, config.get("monitor", "detector") if reads_monitor else "detector",
                                    float(config.get("detector_recall", 1.0)), float(config.get("detector_fpr", 0.0)),
                                    float(config.get("probe_threshold", 0.5)))
        return (labelled, CEILING if is_ceiling(config) else config["control"])


@functools.cache
def _reads(intervention: str) -> tuple[bool, bool]:
    """Whether V shapes the arm's update, and whether its advantages read the monitor; an arm the registry
    does not know (one a test registered) is assumed to do both."""
    from projected_grpo import interventions  # the registry (torch): only labelling a run needs it

    try:
        arm = interventions.get(intervention)
    except ValueError:
        return True, True
    return arm.uses_basis, arm.reads_monitor


def is_ceiling(config: dict) -> bool:
    # configs older than live_labels built V from the detector; config allows oracle only with pairs=live
    return config.get("live_labels", "detector") == "oracle"


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
    config = read_json(config_path, ResultsError) if config_path.exists() else None
    if config is not None and (missing := [key for key in REQUIRED_CONFIG if key not in config]):
        raise ResultsError(f"{config_path}: missing key(s) {', '.join(missing)}")
    if config is not None and is_ceiling(config) and config["control"] != "none":
        # the arm would have to be both a control and a ceiling; no table row can name it honestly
        raise ResultsError(f"{config_path}: live_labels=oracle (a diagnostic ceiling) with control="
                           f"{config['control']}; a ceiling run has no control")
    summary = read_json(summary_path, ResultsError) if summary_path.exists() else None
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
    return Run(run_dir.name, config, rows, problem, notes, summary)


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


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean of `key` over rows, skipping rows where it is null or absent."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def last_mean(rows: list[dict], key: str, window: int = LAST_STEPS) -> float | None:
    """Mean of `key` over the last `window` rows, skipping rows where it is null or absent."""
    return mean_of(rows[-window:], key)


def final(key: str) -> Callable[[Run], float | None]:
    """A run's last-steps mean of metrics key `key`."""
    return lambda run: last_mean(run.rows, key)


# --- the time course of hack_s


def rolling_means(values: list[float], window: int = ROLLING) -> list[float]:
    """Trailing means over full windows only: the i-th is the mean of values[i : i + window], so it
    belongs to the step of values[i + window - 1]; a partial window would let one noisy step count."""
    return [statistics.fmean(values[i:i + window]) for i in range(len(values) - window + 1)]


def hack_curve(run: Run) -> tuple[list[int], list[float]]:
    """The steps where the run logged hack_s, and hack_s there."""
    logged = [(row["step"], row["hack_s"]) for row in run.rows if row.get("hack_s") is not None]
    return [step for step, _ in logged], [hack for _, hack in logged]


def run_mean(run: Run) -> float | None:
    """hack_s averaged over every step: the area under the hack curve divided by the steps."""
    return mean_of(run.rows, "hack_s")


def early_window(run: Run, early_steps: int | None) -> int:
    """How many first steps the early window holds: early_steps, else a quarter of the run (at least 1)."""
    return early_steps or max(1, len(run.rows) // 4)


def early_mean(run: Run, early_steps: int | None) -> float | None:
    return mean_of(run.rows[:early_window(run, early_steps)], "hack_s")


def vanilla_rises(vanilla: list[Run]) -> dict[int, tuple[float, float]]:
    """Per seed, vanilla's mean hack_s over its first and its last ROLLING steps."""
    first = by_seed(vanilla, lambda run: mean_of(run.rows[:ROLLING], "hack_s"))
    last = by_seed(vanilla, lambda run: last_mean(run.rows, "hack_s", ROLLING))
    return {seed: (first[seed], last[seed]) for seed in first.keys() & last.keys()}


def delay_against(rises: dict[int, tuple[float, float]]) -> Callable[[Run], int | None]:
    """A run's delay: the first step whose trailing ROLLING-step mean of hack_s reaches the midpoint of
    vanilla's rise on the run's seed. A run that never reaches it is censored and gets its last step + 1,
    the earliest it could still have got there. None where vanilla did not rise on the seed (or did not
    run on it): no rise, no midpoint to time."""

    def delay(run: Run) -> int | None:
        rise = rises.get(run.config["seed"])
        steps, hacks = hack_curve(run)
        if rise is None or rise[1] <= rise[0] or not steps:
            return None
        midpoint = (rise[0] + rise[1]) / 2
        return next((step for step, mean in zip(steps[ROLLING - 1:], rolling_means(hacks)) if mean >= midpoint),
                    steps[-1] + 1)

    return delay


def censored_seeds(runs: list[Run], delay_of: Callable[[Run], int | None]) -> set[int]:
    """Seeds with a run whose delay is censored: past its last logged step, as delay_against marks it."""
    return {run.config["seed"] for run in runs
            if (delay := delay_of(run)) is not None and delay > hack_curve(run)[0][-1]}


def censored_note(deltas: dict[int, float], runs: list[Run], baseline: list[Run],
                  delay_of: Callable[[Run], int | None]) -> str:
    """How many of the paired seeds hold a censored delay on either side, where any do."""
    censored = (censored_seeds(runs, delay_of) | censored_seeds(baseline, delay_of)) & deltas.keys()
    return f" ({len(censored)} censored)" if censored else ""


def late_slope(run: Run) -> float | None:
    """The least-squares slope of hack_s over the steps after LATE_FROM, per 100 steps."""
    points = [(step, hack) for step, hack in zip(*hack_curve(run)) if step > LATE_FROM]
    if len(points) < 2:
        return None
    mean_step, mean_hack = statistics.fmean(s for s, _ in points), statistics.fmean(h for _, h in points)
    spread = sum((s - mean_step) ** 2 for s, _ in points)
    return 100 * sum((s - mean_step) * (h - mean_hack) for s, h in points) / spread


def modes_run_mean(known: bool) -> Callable[[Run], float | None]:
    """hack_s over every step on the trained modes the basis (and the detector) knew, or never saw, pooled by
    step and mode."""
    def run_mean(run: Run) -> float | None:
        trained, basis = split_modes(run.config.get("modes", "")), set(split_modes(run.config["basis_modes"]))
        modes = [mode for mode in trained if (mode in basis) == known]
        values = [row[f"hack_s/{mode}"] for row in run.rows for mode in modes if f"hack_s/{mode}" in row]
        return statistics.fmean(values) if values else None
    return run_mean


def summary_figure(key: str) -> Callable[[Run], float | None]:
    """A whole-run figure of summary.json: the hack score's AUROC over every step that took one, the probe's
    (under --monitor=probe only)."""
    return lambda run: (run.summary or {}).get(key)


def final_evaluation(key: str) -> Callable[[Run], float | None]:
    """A figure of the run's final held-out evaluation (summary.json's eval)."""
    return lambda run: ((run.summary or {}).get("eval") or {}).get(key)


# table column -> a run's value: the last-steps mean of a metrics.jsonl key, or (auroc) the whole run's; each is
# also a hypothesis metric
COLUMNS = {"hack": final("hack_s"), "solve": final("gt_s"), "cin_s": final("cin_s"), "cin_t": final("cin_t"),
           "cout": final("cout"), "auroc": summary_figure("hack_auroc")}
# more figures of each run, as hypothesis metrics and a table: reward and code-block rate (last steps); the known and
# the held-out modes and the update's hack-ward fraction (beside its null) over every step; the late slope; the probe
# monitor's AUROCs over the run; the final evaluation of the deployed (and kept) model
FIGURES = {"reward": final("reward"), "format": final("format_s"),
           "known_run_mean": modes_run_mean(known=True), "heldout_run_mean": modes_run_mean(known=False),
           "hack_late_slope": late_slope,
           "update_hackward_run_mean": lambda run: mean_of(run.rows, "update_hackward"),
           "null_run_mean": lambda run: mean_of(run.rows, "cin_null_s"),
           "probe_auroc_known": summary_figure("probe_auroc_known"),
           "probe_auroc_heldout": summary_figure("probe_auroc_heldout"),
           "eval_deployed_hack": final_evaluation("eval_deployed_hack"),
           "eval_kept_hack": final_evaluation("eval_kept_hack"),
           "eval_deployed_solve": final_evaluation("eval_deployed_solve")}
METRICS = (*COLUMNS, *TIME_COURSE, *FIGURES)


def metric_of(metric: str, arms: dict[tuple, list[Run]], early_steps: int | None) -> Callable[[Run], float | None]:
    """A run's value of a hypothesis metric: a COLUMNS one (mostly last-steps means), a whole-run figure, or a point of
    the time course (the delay timed against vanilla's rise on the run's seed)."""
    if metric in COLUMNS:
        return COLUMNS[metric]
    if metric in FIGURES:
        return FIGURES[metric]
    if metric == RUN_MEAN:
        return run_mean
    if metric == EARLY:
        return lambda run: early_mean(run, early_steps)
    return delay_against(vanilla_rises(arms.get(VANILLA, [])))


# --- grouping


def mode_rank(mode: str) -> tuple[int, str]:
    return (MODES.index(mode), mode) if mode in MODES else (len(MODES), mode)


def split_modes(text: str) -> list[str]:
    return sorted({m.strip() for m in text.split(",") if m.strip()}, key=mode_rank)


def question_of(config: dict) -> tuple:
    # basis_modes is a set: "a,b" and "b,a" are the same basis, so the same question
    basis = ",".join(split_modes(config["basis_modes"]))
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


def by_seed(runs: list[Run], value_of: Callable[[Run], float | None]) -> dict[int, float]:
    """Per seed, a run's value; runs sharing a seed are averaged so each seed counts once."""
    per_seed = defaultdict(list)
    for run in runs:
        value = value_of(run)
        if value is not None:
            per_seed[run.config["seed"]].append(value)
    return {seed: statistics.fmean(values) for seed, values in per_seed.items()}
