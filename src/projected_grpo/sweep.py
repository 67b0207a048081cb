"""Sweeps: grids of arms x seeds, and the leave-one-mode-out (LOMO) study.

    python -m projected_grpo.sweep PRESET [--arms none,erase,route] [--seeds 1,2,3] [--jobs N]
        [--devices cuda:0,cuda:1] [--name NAME] [--lomo] [--force] [--field=value ...]

An arm is `intervention[@gate][~monitor][:control]`: `erase:random` is the erase arm on a random basis,
`erase@no_gate:random` the same under --gate=no_gate, `screen~probe~r0.7~fp0.02` screen reading the probe
trained from a detector of recall 0.7 and false-positive rate 0.02, `screen+erase` two arms composed. Each run is
a child `python -m projected_grpo.train PRESET ...` writing out/sweeps/<name>/<run_name>/ (the
name defaults to the preset), with its output in out/sweeps/<name>/logs/<run_name>.log, so that
`python -m projected_grpo.results out/sweeps/<name>` tables the study. Running the same command
again skips finished runs and resumes interrupted ones. `--lomo` trains every run on all of the
config's modes but builds the basis without one of them, each mode in turn (name: <preset>-lomo):
does V reach the hack it never saw? Extra `--field=value` overrides go to every run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from . import __version__, checkpoints, interventions, reporting
from .config import (
    PRESETS,
    Config,
    ConfigError,
    InputError,
    arm_name,
    default_run_name,
    make_config,
    parse_overrides,
    split_gate,
    split_monitor,
    with_gate,
)
from .distributed import available_cores
from .files import read_json, write_atomically
from .usage import field_help, preset_help

SWEEPS_ROOT = Path("out/sweeps")
# Fields the sweep sets for each run itself, and what to use instead.
SET_BY_SWEEP = {
    "run_name": "runs are named <preset>-<intervention>[-<control>]-s<seed>; --name names the sweep",
    "out_dir": "runs land in out/sweeps/<name>; --name names the sweep",
    "seed": "use --seeds",
    "intervention": "use --arms",
    "control": "use --arms intervention:control",
    "resume": "running the sweep again resumes interrupted runs",
    "threads": "--jobs splits the cores between the runs",
}
SWEEP_OPTIONS = ("arms", "seeds", "jobs", "devices", "name", "lomo", "force")  # the parser's, for spelling hints
# What makes two invocations the same study: one directory must never mix two.
STUDY_KEYS = ("preset", "arms", "seeds", "lomo_modes", "overrides")
POLL_SECONDS = 0.2


class SweepError(InputError):
    """A bad grid, a run directory that cannot be resumed, or a directory holding another study."""


@dataclass
class PlannedRun:
    name: str
    overrides: dict[str, str]  # the child's --field=value arguments
    action: str = "fresh"  # fresh, resume or skip: decided up front from the run directory
    device: str | None = None  # a resumed run goes back to the device it started on; None: any
    status: str = "pending"  # pending, done, failed or interrupted
    exit_code: int | None = None


# ----------------------------------------------------------------------------- the grid


def parse_arms(text: str) -> list[tuple[str, str]]:
    """`none,erase:random` -> [("none", "none"), ("erase", "random")]."""
    arms = []
    for text_arm in text.split(","):
        try:
            arm = interventions.parse(text_arm)
        except ConfigError as e:
            raise SweepError(f"--arms: {e}") from None
        if arm in arms:
            raise SweepError(f"--arms: {text_arm!r} is listed twice")
        arms.append(arm)
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if len(seeds) != len(set(seeds)):
        raise SweepError(f"--seeds: {text!r} repeats a seed")
    return seeds


def expand_grid(preset: str, arms: list[tuple[str, str]], seeds: list[int], lomo_modes: list[str] | None,
                overrides: dict[str, str], sweep_dir: Path) -> list[PlannedRun]:
    """One run per (left-out mode,) seed and arm. Seeds vary slowest within a mode, so a sweep cut
    short already holds every arm of its first seeds: complete same-seed comparisons."""
    runs = []
    for left_out in lomo_modes or [None]:
        for seed in seeds:
            for intervention, control in arms:
                gated, monitor = split_monitor(intervention)
                arm, gate = split_gate(gated)
                if gate and "gate" in overrides:
                    raise SweepError(f"--arms {intervention} and --gate={overrides['gate']}: give a run's gate once")
                if gate and with_gate(arm, gate, preset) == arm:
                    raise SweepError(f"--arms {intervention}: {gate} is the {preset} preset's gate; write the arm "
                                     f"without @{gate}")
                if both := sorted(monitor.keys() & overrides.keys()):
                    raise SweepError(f"--arms {intervention} and --{both[0]}={overrides[both[0]]}: give a run's "
                                     "monitor once")
                run_fields = {**overrides, "seed": str(seed), "intervention": arm, "control": control,
                              "out_dir": str(sweep_dir), **({"gate": gate} if gate else {}), **monitor}
                if left_out:
                    run_fields["basis_modes"] = ",".join(m for m in lomo_modes if m != left_out)
                # named as make_config names a run: the arm's gate and monitor, or those every run of the sweep gets
                run_fields["run_name"] = name = default_run_name(make_config(preset, run_fields, check=False), preset,
                                                                 left_out)
                runs.append(PlannedRun(name, run_fields))
    return runs


def check_overrides(overrides: dict[str, str], lomo: bool, devices: bool) -> None:
    """Refuse the fields the sweep sets per run, before they silently lose to it, and a misspelt
    sweep option, before it reads as a config field."""
    config_fields = [f.name for f in fields(Config)]
    for name in overrides:
        closest = difflib.get_close_matches(name, config_fields + list(SWEEP_OPTIONS), n=1)
        if name not in config_fields and closest and closest[0] in SWEEP_OPTIONS:
            raise SweepError(f"unknown option --{name}; did you mean --{closest[0]}?")
    set_here = dict(SET_BY_SWEEP)
    if lomo:
        set_here["basis_modes"] = "--lomo sets it per run: the config's modes minus the one left out"
    if devices:
        set_here["device"] = "--devices gives each run its device"
    for name in overrides:
        if name in set_here:
            raise SweepError(f"--{name} is set by the sweep for each run ({set_here[name]})")


def validate_runs(preset: str, runs: list[PlannedRun]) -> dict[str, int]:
    """Every run's config made and validated before anything starts; returns each run's steps."""
    steps = {}
    for run in runs:
        try:
            cfg = make_config(preset, run.overrides)
            interventions.check(cfg)
            reporting.check(cfg)
            steps[run.name] = cfg.steps
        except InputError as e:
            raise SweepError(f"run {run.name}: {e}") from None
    return steps


# ----------------------------------------------------------------------------- cores and devices


def thread_split(cores: int, concurrent: int, overrides: dict[str, str]) -> dict[str, str]:
    """Each of `concurrent` runs gets its share of the cores for torch and for grading: runs that
    each assume every core fight over them and can step 10-100x slower than alone."""
    share = str(max(1, cores // concurrent))
    return {"threads": share} if "grade_workers" in overrides else {"threads": share, "grade_workers": share}


def device_slots(device: str, jobs: int | None, devices: list[str]) -> list[str | None]:
    """One entry per run that may go at once: a device to pass, or None to keep the config's."""
    if devices:
        if jobs is not None:
            raise SweepError("--jobs and --devices: give one (with --devices, one run per device at a time)")
        not_gpus = [d for d in devices if not d.startswith("cuda")]
        if not_gpus or len(devices) != len(set(devices)):
            raise SweepError(f"--devices: expected distinct cuda devices (cuda:0,cuda:1), got {','.join(devices)}; "
                             f"on CPU use --jobs")
        return list(devices)
    jobs = 1 if jobs is None else jobs
    if jobs < 1:
        raise SweepError(f"--jobs: must be >= 1, got {jobs}")
    if jobs > 1 and device.startswith("cuda"):
        raise SweepError(f"--jobs {jobs} on {device}: runs would share one GPU; list GPUs with --devices "
                         f"cuda:0,cuda:1 or run one at a time")
    return [None] * jobs


def child_invocation(preset: str, overrides: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The train command line and environment of one run."""
    argv = [sys.executable, "-m", "projected_grpo.train", preset, *(f"--{k}={v}" for k, v in overrides.items())]
    # OpenMP pools (MKL, OpenBLAS) size themselves before torch.set_num_threads can. A run resumed
    # with threads=0 (torch's default) keeps whatever the environment says.
    threads = overrides["threads"]
    return argv, {**os.environ, **({"OMP_NUM_THREADS": threads} if threads != "0" else {})}


# ----------------------------------------------------------------------------- run directories


def decide(run_dir: Path, steps: int) -> str:
    """skip a finished run, resume an interrupted one, start fresh otherwise."""
    summary_path, metrics = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if summary_path.exists():
        summary = read_json(summary_path, SweepError, "delete it to resume the run")
        if summary.get("complete") is True and summary.get("steps_done") == steps:
            return "skip"
    if not metrics.exists():
        return "fresh"
    if not checkpoints.checkpoint_dirs(run_dir):
        raise SweepError(f"{run_dir} has metrics.jsonl but no checkpoint to resume from; delete it or rename it")
    return "resume"


def settings_started_with(run_dir: Path) -> dict:
    """threads, grade_workers and device of a run's config.json: train resumes only with the same
    config, so a run resumed under another --jobs or on another GPU keeps the ones it started with."""
    path = run_dir / "config.json"
    config = read_json(path, SweepError, f"delete or rename {run_dir}")
    if missing := [key for key in ("threads", "grade_workers", "device") if key not in config]:
        raise SweepError(f"{path}: lacks {', '.join(missing)}; delete or rename {run_dir}")
    return {key: config[key] for key in ("threads", "grade_workers", "device")}


def plan_actions(runs: list[PlannedRun], steps: dict[str, int], sweep_dir: Path, devices: list[str]) -> None:
    """Decide every run's action up front, naming every run directory that cannot be resumed at once."""
    problems = []
    for run in runs:
        run_dir = sweep_dir / run.name
        try:
            run.action = decide(run_dir, steps[run.name])
            if run.action == "skip":
                run.status = "done"
            if run.action == "resume":
                started = settings_started_with(run_dir)
                run.overrides.update(resume="true", threads=str(started["threads"]),
                                     grade_workers=str(started["grade_workers"]))
                if devices:
                    run.device = started["device"]
                    if run.device not in devices:
                        raise SweepError(f"{run_dir} started on {run.device}, which --devices does not list")
        except SweepError as e:
            problems.append(str(e))
    if problems:
        raise SweepError("; ".join(problems))


# ----------------------------------------------------------------------------- sweep.json


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes under `directory`) when it is tracked in a git checkout, else (None, None)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    # An installed package inside some other repository (a venv in a project) is not tracked there.
    if not git("ls-files", "--", "."):
        return None, None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", ".")
    if commit is None or status is None:
        return None, None
    return commit.strip(), bool(status.strip())


def sweep_record(preset: str, arms: list[tuple[str, str]], seeds: list[int], lomo_modes: list[str] | None,
                 overrides: dict[str, str], jobs: int, devices: list[str]) -> dict:
    """What sweep.json says about the study and the code that ran it; save_record adds the runs."""
    commit, dirty = git_state(Path(__file__).parent)
    return {"preset": preset, "arms": [arm_name(*arm) for arm in arms], "seeds": seeds, "lomo_modes": lomo_modes,
            "overrides": overrides, "jobs": jobs, "devices": devices or None, "version": __version__,
            "git_commit": commit, "git_dirty": dirty,
            "started": datetime.now().astimezone().isoformat(timespec="seconds")}


def check_same_study(path: Path, record: dict, force: bool) -> None:
    if not path.exists() or force:
        return
    before = read_json(path, SweepError, "delete it, or pass --force to replace it")
    differ = [f"{key}: {before.get(key)!r} there, {record[key]!r} now" for key in STUDY_KEYS
              if before.get(key) != record[key]]
    if differ:
        raise SweepError(f"{path} records another sweep ({'; '.join(differ)}); choose another --name, or pass "
                         f"--force to run this one into the same directory")


def save_record(path: Path, record: dict, runs: list[PlannedRun]) -> None:
    record["runs"] = [{"name": r.name, "action": r.action, "status": r.status, "exit_code": r.exit_code}
                      for r in runs]
    write_atomically(path, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- running


def launch(preset: str, run: PlannedRun, device: str | None, log_path: Path) -> subprocess.Popen:
    overrides = run.overrides if device is None else {**run.overrides, "device": device}
    argv, env = child_invocation(preset, overrides)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:  # appended: a resumed run keeps the log of its first attempt
        log.write(f"=== {datetime.now().isoformat(sep=' ', timespec='seconds')}  {shlex.join(argv)}\n")
        log.flush()
        # Its own process group: a Ctrl-C in the terminal reaches only the sweep, which forwards
        # exactly one SIGINT (train stops at the next step boundary on the first, aborts on a second).
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                process_group=0)


def run_all(preset: str, runs: list[PlannedRun], slots: list[str | None], log_dir: Path, on_finish) -> bool:
    """Run the pending runs, one per slot at a time; on_finish(run, seconds) as each ends.
    Returns whether Ctrl-C stopped the sweep: no new runs, running ones told to stop."""
    pending = [r for r in runs if r.action != "skip"]
    running: dict[int, tuple[PlannedRun, subprocess.Popen, float]] = {}  # slot index -> run
    interrupts, forwarded = [], 0

    def on_sigint(signum, frame):
        interrupts.append(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        while running or (pending and not interrupts):
            if len(interrupts) > forwarded:
                forwarded = len(interrupts)
                again = "" if forwarded > 1 else " (Ctrl-C again to abort them now)"
                print(f"\nCtrl-C: no new runs; {len(running)} running stop after their current step{again}",
                      file=sys.stderr)
                for _, proc, _ in running.values():
                    proc.send_signal(signal.SIGINT)
            for slot, device in enumerate(slots):
                if interrupts or slot in running:
                    continue
                run = next((r for r in pending if r.device in (None, device)), None)
                if run is not None:
                    pending.remove(run)
                    running[slot] = (run, launch(preset, run, device, log_dir / f"{run.name}.log"),
                                     time.monotonic())
            for slot, (run, proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                run.exit_code = proc.returncode
                run.status = "done" if proc.returncode == 0 else "interrupted" if interrupts else "failed"
                on_finish(run, time.monotonic() - started)
            time.sleep(POLL_SECONDS)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return bool(interrupts)


def finished_line(run: PlannedRun, run_dir: Path, log_path: Path, seconds: float) -> str:
    if run.status == "failed":
        return f"FAILED (exit {run.exit_code}) after {seconds:.0f} s, log: {log_path}"
    if run.status == "interrupted":
        return f"interrupted (exit {run.exit_code}) after {seconds:.0f} s; run the sweep again to resume it"
    try:
        last5 = json.loads((run_dir / "summary.json").read_text())["last5"]
    except (OSError, json.JSONDecodeError, KeyError):
        return f"done in {seconds:.0f} s (no readable summary.json)"
    hack, solve = (("n/a" if last5.get(k) is None else f"{last5[k]:.2f}") for k in ("hack_s", "gt_s"))
    return f"done in {seconds:.0f} s  hack {hack} solve {solve}"


def execute(preset: str, runs: list[PlannedRun], slots: list[str | None], sweep_dir: Path, record: dict) -> int:
    record_path, log_dir = sweep_dir / "sweep.json", sweep_dir / "logs"
    counts = {a: sum(r.action == a for r in runs) for a in ("fresh", "resume", "skip")}
    print(f"sweep {sweep_dir}: {len(runs)} runs ({counts['fresh']} to start, {counts['resume']} to resume, "
          f"{counts['skip']} already complete), {len(slots)} at a time; logs in {log_dir}")
    save_record(record_path, record, runs)
    todo, finished = len(runs) - counts["skip"], []

    def on_finish(run: PlannedRun, seconds: float) -> None:
        finished.append(run)
        line = finished_line(run, sweep_dir / run.name, log_dir / f"{run.name}.log", seconds)
        print(f"[{len(finished)}/{todo}] {run.name}  {line}", flush=True)
        save_record(record_path, record, runs)

    start = time.monotonic()
    interrupted = run_all(preset, runs, slots, log_dir, on_finish)
    failed = [r for r in runs if r.status == "failed"]
    left = [r for r in runs if r.status in ("pending", "interrupted")]
    print(f"sweep {sweep_dir}: {sum(r.status == 'done' for r in runs)}/{len(runs)} complete, {len(failed)} failed, "
          f"{len(left)} not finished, in {time.monotonic() - start:.0f} s")
    for run in failed:
        print(f"  failed: {run.name} (exit {run.exit_code}), log: {log_dir / f'{run.name}.log'}", file=sys.stderr)
    if interrupted and left:
        print("  run the same command again to resume the unfinished runs", file=sys.stderr)
    print(f"tables: python -m projected_grpo.results {sweep_dir}")
    return 1 if failed else 130 if interrupted and left else 0


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.sweep", allow_abbrev=False,
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"any other --field=value goes to every run\n\n{preset_help()}\n\n"
                                            f"{field_help()}")
    parser.add_argument("preset", nargs="?", help=f"{', '.join(PRESETS)} (or --preset NAME)")
    parser.add_argument("--preset", dest="preset_option", metavar="PRESET", help=argparse.SUPPRESS)
    parser.add_argument("--arms", default="none,erase,route",
                        help="intervention[@gate][~monitor][:control],... (default: %(default)s)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated (default: %(default)s)")
    parser.add_argument("--jobs", type=int, help="runs at a time on CPU, the cores split between them (default 1)")
    parser.add_argument("--devices", default="", help="GPUs to spread runs over, one run each: cuda:0,cuda:1")
    parser.add_argument("--name", help="the sweep's directory under out/sweeps (default: the preset, or "
                                        "<preset>-lomo with --lomo)")
    parser.add_argument("--lomo", action="store_true",
                        help="leave each of the config's modes out of the basis in turn (modes x arms x seeds)")
    parser.add_argument("--force", action="store_true", help="run into a directory whose sweep.json differs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if bool(args.preset) == bool(args.preset_option):
        parser.error("give one preset: `sweep PRESET ...` or `sweep --preset PRESET ...`")
    args.preset = args.preset or args.preset_option
    devices = [d for d in args.devices.split(",") if d]
    try:
        overrides = parse_overrides(rest)
        check_overrides(overrides, lomo=args.lomo, devices=bool(devices))
        base = make_config(args.preset, overrides)
        # A LOMO study is another study of the same preset: its own directory by default.
        name = args.name or (f"{args.preset}-lomo" if args.lomo else args.preset)
        if "/" in name or name in (".", ".."):
            raise SweepError(f"--name: {name!r} must be a plain directory name")
        arms, seeds = parse_arms(args.arms), parse_seeds(args.seeds)
        slots = device_slots(base.device, args.jobs, devices)
        for device in devices:
            make_config(args.preset, {**overrides, "device": device})
        lomo_modes = list(base.mode_list) if args.lomo else None
        if lomo_modes is not None and len(lomo_modes) < 2:
            raise SweepError(f"--lomo: needs at least two modes to leave one out, got --modes={base.modes}")
        sweep_dir = SWEEPS_ROOT / name
        runs = expand_grid(args.preset, arms, seeds, lomo_modes, overrides, sweep_dir)
        split = thread_split(available_cores(), min(len(slots), len(runs)), overrides)
        for run in runs:
            run.overrides.update(split)
        steps = validate_runs(args.preset, runs)
        record = sweep_record(args.preset, arms, seeds, lomo_modes, overrides, len(slots), devices)
        check_same_study(sweep_dir / "sweep.json", record, args.force)
        plan_actions(runs, steps, sweep_dir, devices)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return execute(args.preset, runs, slots, sweep_dir, record)


if __name__ == "__main__":
    sys.exit(main())
