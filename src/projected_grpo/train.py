"""The training loop: python -m projected_grpo.train {smoke|fast|full|organism} [--field=value ...]
(or `replay RUN_DIR [--field=value ...]`, a run of RUN_DIR's config.json again; --help lists every field).

The loop resumes or starts a run, takes its steps (step.py) on the pieces assembly.py puts
together, re-extracts V every `refresh_every` steps, evaluates held-out prompts every
`eval_every` steps (evaluate.py) and checkpoints (checkpoints.py). Each run writes
out/runs/<run_name>/: config.json, metrics.jsonl, scores.jsonl, completions.jsonl,
checkpoints/, eval.json, summary.json and summary.txt. docs/design.md draws the whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoints, distributed, interventions, reporting, sandbox
from .assembly import Run, assemble, split_problems
from .config import (
    PRESETS,
    Config,
    ConfigError,
    InputError,
    make_config,
    parse_overrides,
    replay_config,
)
from .distributed import World
from .evaluate import evaluate, metrics_row, save_evaluation
from .files import append_jsonl, read_json, truncate_jsonl, write_atomically
from .organism import check_unseen, resolve_model
from .step import StepResult, train_step
from .step import metrics_row as step_row
from .summary import run_auroc, summarize
from .usage import field_help, preset_help

log = logging.getLogger("projected_grpo")

LOW_FORMAT = 0.5  # a code-block rate falling below this: the policy is collapsing


class TrainingDiverged(RuntimeError):
    """A NaN or inf in the loss or gradients; the last good state was checkpointed."""


# ----------------------------------------------------------------------------- the run directory


def _log_step(run_dir: Path, step: int, row: dict, rollouts, log_completions: int) -> list[dict]:
    """Append the step's metrics row, every student rollout's hack score and label (the run's AUROC
    is computed from these) and the first `log_completions` student completions; returns those."""
    students = [r for r in rollouts if not r.teacher]
    append_jsonl(run_dir / "metrics.jsonl", [row])
    append_jsonl(run_dir / "scores.jsonl", [
        {"step": step, "mode": r.problem.mode, "hack_score": r.hack_score, "exploited": r.exploited,
         **({"probe_score": r.probe_score} if r.probe_score is not None else {})} for r in students])
    completions = [
        {"step": step, "problem_id": r.problem.id, "mode": r.problem.mode, "reward": r.reward, "passed": r.passed,
         "gt_correct": r.gt_correct, "exploited": r.exploited, "advantage": r.advantage,
         "hack_score": r.hack_score, "completion": r.text} for r in students[:log_completions]]
    append_jsonl(run_dir / "completions.jsonl", completions)
    return completions


@contextlib.contextmanager
def _sole_writer(run_dir: Path):
    """One process per run directory: a second (a sweep re-run while the first still trains) is
    an error, never a second writer. The lock lives beside the run, so it needs no run directory."""
    lock = run_dir.parent / f".{run_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{run_dir} is being written by another process (it holds {lock}); wait for it "
                                  f"or stop it") from None
        yield


def run(cfg: Config, preset: str = "smoke") -> dict:
    """Train one run end to end; returns summary.json's content (under torchrun: rank 0's; the
    other ranks return {}).

    Everything a user's input can break (intervention, problems, pool, basis cache, a resumed
    config) is checked before the run directory is made, so a bad input leaves nothing half made.
    """
    interventions.check(cfg)
    reporting.check(cfg)
    if cfg.require_netns and not sandbox.isolation()["netns"]:
        raise ConfigError("--require_netns: this machine's kernel refuses graded code a private network namespace "
                          "(user namespaces disabled, or a seccomp profile that forbids unshare; docs/sandbox.md); "
                          "train where it allows one, or pass --require_netns=false to grade without that layer")
    world = distributed.init(cfg)
    try:
        with _sole_writer(Path(cfg.out_dir) / cfg.run_name) if world.main else contextlib.nullcontext():
            return _run(cfg, preset, world)
    finally:
        distributed.close(world)


def _start(cfg: Config, preset: str, world: World) -> tuple[Run, Path, list[dict]]:
    """The run assembled, fresh or from its latest checkpoint, with config.json written and (on a
    resume) the logs cut back to the checkpoint; returns it, its directory and the rows so far."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    checkpoint = checkpoints.latest(run_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; delete {run_dir} and "
                                f"start without --resume")
    if not cfg.resume and (run_dir / "metrics.jsonl").exists():
        has = "a checkpoint; pass --resume=true to continue it" if checkpoints.latest(run_dir) else \
            f"no checkpoint to resume from; delete {run_dir}"
        raise FileExistsError(f"{run_dir} already holds a run with {has}, or choose another --run_name")
    train, held_out = split_problems(cfg)
    with distributed.main_first(world):  # rank 0 builds the organism, if it must; the others find it
        model_path = resolve_model(cfg.model)  # the organism's build directory; any other name as given
    check_unseen(model_path, [p.id for p in held_out])
    # model_path is recorded so a resume or an evaluation can never pick up another build of the organism.
    config = {"preset": preset, **dataclasses.asdict(cfg), "model_path": model_path,
              "split": {"train": [p.id for p in train], "held_out": [p.id for p in held_out]}}
    if checkpoint is not None:
        checkpoints.check_resume_config(run_dir, config)
    config["sandbox"] = sandbox.isolation()  # this machine's, not a setting: a resume may find another
    cfg = dataclasses.replace(cfg, device=distributed.device_for(cfg, world))  # recorded as asked, run per rank
    run, state = assemble(cfg, world, model_path, train, held_out, checkpoint)
    rows = state["rows"] if state else []
    if state:
        distributed.barrier(world)  # every rank has read the checkpoint before rank 0 rewrites the logs
        if world.main:
            write_atomically(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            for name in ("completions.jsonl", "scores.jsonl"):
                truncate_jsonl(run_dir / name, state["step"])
            log.info("resumed %s from %s", cfg.run_name, checkpoint)
    if world.main:
        write_atomically(run_dir / "config.json", json.dumps(config, indent=2))
    return run, run_dir, rows


def _step(run: Run, step: int) -> tuple[dict, StepResult]:
    """One step, then the refresh and evaluation due after it; returns its metrics row."""
    cfg = run.cfg
    result = train_step(run, step)
    overlap = evaluation = None
    if run.basis.due(step):
        overlap = run.basis.refresh(step, run.model, run.tok, run.wrappers)
        if run.probe is not None:  # the probe on the live V's schedule
            run.probe.refit()
    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and run.world.main:
        evaluation = evaluate(run.model, run.tok, run.wrappers, run.held_out, cfg, step, cfg.eval_samples,
                              run.workers)
    return step_row(result, overlap, evaluation), result


def _state(run: Run) -> dict:
    return checkpoints.training_state(run.wrappers, run.optimizer, run.scheduler, run.basis.state(),
                                      run.probe.state() if run.probe is not None else None)


def _loop(run: Run, run_dir: Path, rows: list[dict], stop: list, report: reporting.Report | None) -> None:
    """The steps after the last one in `rows`, appended to it, logged and reported (rank 0); a Ctrl-C
    (`stop` filled) ends the loop after the step it came in."""
    cfg, world = run.cfg, run.world
    first = len(rows) + 1
    with tqdm(range(first, cfg.steps + 1), initial=first - 1, total=cfg.steps, desc=cfg.run_name,
              disable=not world.main) as bar:
        for step in bar:
            # A failure anywhere in the step (rollouts, optimizer, refresh, evaluation) checkpoints
            # this state, so a resumed run replays the whole step as it began.
            before = _state(run)
            try:
                row, result = _step(run, step)
            except BaseException as e:  # a second Ctrl-C too: an abort never leaves rows without a checkpoint
                path = checkpoints.save(run_dir, step - 1, before, rows) if world.main else run_dir
                if isinstance(e, FloatingPointError):
                    raise TrainingDiverged(f"step {step}: {e}; the last good state (after step {step - 1}) is "
                                           f"saved in {path}") from None
                what = "aborted" if isinstance(e, KeyboardInterrupt) else "failed"
                print(f"step {step} {what}; the state after step {step - 1} is saved in {path}", file=sys.stderr)
                raise
            if row["format_s"] < LOW_FORMAT and rows and rows[-1]["format_s"] >= LOW_FORMAT and world.main:
                warnings.warn(f"step {step}: only {row['format_s']:.2f} of student completions hold a code "
                              f"block (repeat_s {row['repeat_s']:.2f}): the policy may be collapsing", stacklevel=1)
            rows.append(row)
            # Ctrl-C reaches the ranks at different moments: they agree on it here, so all stop after this step.
            stopping = bool(distributed.all_sum(world, [torch.tensor(float(bool(stop)))])[0] > 0)
            if world.main:
                report.step(row, _log_step(run_dir, step, row, result.rollouts, cfg.log_completions))
                bar.set_postfix(hack=f"{row['hack_s']:.2f}", cin=f"{row['cin_s']:.2f}", loss=f"{row['loss']:.3g}")
                if step % cfg.checkpoint_every == 0 or stopping:
                    path = checkpoints.save(run_dir, step, _state(run), rows)
            if stopping:
                if world.main:
                    print(f"interrupted after step {step}: checkpoint in {path}; continue with --resume=true",
                          file=sys.stderr)
                raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_ctrl_c():
    """Ctrl-C asks the loop to stop at the next step boundary (the list yielded is filled), so the
    checkpoint is always a consistent state; a second Ctrl-C interrupts at once."""
    stop = []

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\nCtrl-C: stopping after this step (again to abort now)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(cfg: Config, preset: str, world: World) -> dict:
    run, run_dir, rows = _start(cfg, preset, world)
    # Only rank 0 reports, from the step after the checkpoint the run resumed from.
    with reporting.Report(run.cfg, run_dir, len(rows) + 1) if world.main else contextlib.nullcontext() as report:
        with _stop_on_ctrl_c() as stop:
            _loop(run, run_dir, rows, stop, report)
        if not world.main:
            return {}
        cfg = run.cfg
        checkpoints.save(run_dir, cfg.steps, _state(run), rows)
        result = evaluate(run.model, run.tok, run.wrappers, run.held_out, cfg, cfg.steps, cfg.eval_samples,
                          run.workers)
        save_evaluation(run_dir, result, cfg.steps, cfg.eval_samples, run.held_out)
        evaluation = metrics_row(result)
        summary, table = summarize(cfg, rows, evaluation, complete=len(rows) == cfg.steps,
                                   scores=run_auroc(run_dir, cfg), notes=run.basis.notes)
        write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        write_atomically(run_dir / "summary.txt", table + "\n")
        report.end(cfg.steps, evaluation, summary)
    print(table)
    return summary


USAGE = f"""usage: python -m projected_grpo.train {{{'|'.join(PRESETS)}}} [--field=value ...]
       python -m projected_grpo.train replay RUN_DIR [--field=value ...]
  replay: a new run of exactly RUN_DIR's config.json (named <its run_name>-replay), the overrides after it"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{preset_help()}\n\n{field_help()}")
        return 0
    if not argv or argv[0].startswith("-") or argv == ["replay"] or argv[:2] in (["replay", "-h"],
                                                                                 ["replay", "--help"]):
        print(f"{USAGE}\n(--help lists every field)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv[0] == "replay":
            path = Path(argv[1]) / "config.json" if Path(argv[1]).is_dir() else Path(argv[1])
            preset, cfg = replay_config(read_json(path, ConfigError), str(path), parse_overrides(argv[2:]))
        else:
            preset, cfg = argv[0], make_config(argv[0], parse_overrides(argv[1:]))
        run(cfg, preset=preset)
    except (InputError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
