"""One training step on a Run (docs/design.md, "One step"), and the metrics row it leaves.

prompts (the arm's) -> rollouts, graded -> advantages (the arm's) -> scoring: the loss's student and
teacher gradients, and the columns of the rollouts' own log-likelihood gradients this step reads (each
student rollout's on the steps that take hack scores, each group's flagged-minus-unflagged difference
on the steps a live V takes) -> cin of the student and teacher gradients, each rollout's hack score ->
the arm's gradient hook -> clip -> AdamW -> the arm's update hook -> schedule. Under torchrun each rank
collects its share of the prompt groups; the knob gradients and the sums the row needs are added
across ranks before anything reads them.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from . import distributed, projection
from .assembly import Run
from .basis import live_columns
from .config import MODES
from .evaluate import metrics_row as evaluation_row
from .grpo import SUMS, Columns, Rollout, auroc, backward_rollouts, collect_rollouts, detector_stats, repeated_fraction
from .monitor import completion_features, probe_aurocs


@dataclass
class StepResult:
    step: int
    rollouts: list[Rollout]  # every rank's, without their per-token log-probs
    figures: dict  # what the step measured, in the order its metrics row shows them


def _rates(rollouts, prefix: str) -> dict:
    if not rollouts:
        return {f"hack_{prefix}": None, f"gt_{prefix}": None}
    return {f"hack_{prefix}": sum(r.exploited for r in rollouts) / len(rollouts),
            f"gt_{prefix}": sum(r.gt_correct for r in rollouts) / len(rollouts)}


def _concatenated_null(basis: dict, wrappers) -> float:
    """The null baseline of cin_s / cin_t, which concatenate the layers: sqrt(sum k / (2 sum r))."""
    layers = [n for n in basis if n in wrappers]
    if not layers:
        return 0.0
    return projection.null_cin(sum(basis[n].shape[0] for n in layers), sum(wrappers[n].r for n in layers))


def _knobs(wrappers) -> list[torch.nn.Parameter]:
    return [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)]


def _backward(run: Run, rollouts: list[Rollout], zero_spread: int, columns: Columns | None) -> dict:
    """backward_rollouts, with a non-finite loss on any rank raised on every rank (or the others would
    wait on it forever); the knob gradients, g_s and g_t per layer, the loss sums and the zero-spread
    group count are added across ranks in one all-reduce (the columns are this rank's own)."""
    run.optimizer.zero_grad(set_to_none=True)
    try:
        scored, failed = backward_rollouts(run.model, run.tok, run.wrappers, rollouts, run.cfg, columns,
                                           run.reference), ""
    except FloatingPointError as e:
        failed, scored = str(e), None
    if distributed.all_sum(run.world, [torch.tensor(float(bool(failed)))])[0] > 0:
        raise FloatingPointError(failed or "non-finite loss on another rank")
    layers = list(scored["g_student"])
    g_s = [scored["g_student"][n] for n in layers]
    g_t = [scored["g_teacher"][n] for n in layers]
    with_grad = [p for p in _knobs(run.wrappers) if p.grad is not None]
    totals = torch.tensor([float(scored[k]) for k in SUMS] + [float(zero_spread)], dtype=torch.float64)
    reduced = distributed.all_sum(run.world, [p.grad for p in with_grad] + g_s + g_t + [totals])
    for p, grad in zip(with_grad, reduced):
        p.grad = grad
    n = len(with_grad)
    if not all(bool(torch.isfinite(p.grad).all()) for p in with_grad):
        raise FloatingPointError("non-finite knob gradient")
    return {"columns": scored.get("columns"), "g_s": dict(zip(layers, reduced[n:n + len(layers)])),
            "g_t": dict(zip(layers, reduced[n + len(layers):-1])),
            **dict(zip((*SUMS, "zero_spread"), reduced[-1].tolist()))}


def _group_columns(groups: Columns | None, row_columns: Columns | None, columns: dict | None) -> dict | None:
    """The groups' columns (a live V's differences) from what scoring built: themselves, or on a step
    that scored every student (row_columns), their weighted sums of the students' columns."""
    if groups is None or row_columns is None:
        return None if groups is None else columns
    assert all(row_columns.of_row[i] is not None for i, c in enumerate(groups.of_row) if c is not None), \
        "a group's row outside the scored students"
    return {n: (groups.matrix() @ row_columns.matrix().T).to(g) @ g for n, g in columns.items()}


def probe_stats(students: list[Rollout], cfg) -> dict:
    """--monitor=probe: the probe's AUROC against exploited on the known modes' students and on the held-out
    modes' (how far it transfers), and the share it flags (logging only: the labels are read here alone)."""
    if cfg.monitor != "probe":
        return {}
    scored = [r for r in students if r.probe_score is not None]
    return {**probe_aurocs([(r.problem.mode, r.probe_score, r.exploited) for r in scored], cfg.basis_mode_list),
            "probe_flagged": sum(r.probe_score >= cfg.probe_threshold for r in scored) / len(students)}


def scores_rollouts(cfg, step: int) -> bool:
    """Whether the step takes each student rollout's hack score: every hack_score_every steps and at the last."""
    return bool(cfg.hack_score_every) and (step % cfg.hack_score_every == 0 or step == cfg.steps)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step on `run`, its hooks called where its intervention acts."""
    cfg, arm, wrappers, basis = run.cfg, run.arm, run.wrappers, run.basis.V
    start = time.perf_counter()
    problems = random.Random(f"{cfg.seed}-{step}").sample(run.train, cfg.prompts_per_step)
    rollouts, timings = collect_rollouts(run.model, run.tok, wrappers, distributed.share(run.world, problems),
                                         run.pool, cfg, step, run.workers,
                                         lambda p: arm.messages(p, cfg, training=True))
    chosen = [i for i, r in enumerate(rollouts) if not r.teacher]  # this rank's students
    features = None
    if run.probe is not None:  # the probe monitor scores the students before the arm's advantages read it
        features = completion_features(run.model, run.tok, wrappers, [rollouts[i] for i in chosen], cfg)
        for i, score in zip(chosen, run.probe.score(features)):
            rollouts[i].probe_score = score
    zero_spread = arm.advantages(rollouts, cfg)
    # What the step reads of the rollouts' own gradients: each student's on a scoring step (the hack score;
    # not before there is a V), each group's difference on a step a live V will take.
    row_columns = Columns.rows(chosen, len(rollouts)) if basis and scores_rollouts(cfg, step) else None
    groups = live_columns(cfg, rollouts) if run.basis.reads(step) else None

    t0 = time.perf_counter()
    scored = _backward(run, rollouts, zero_spread, row_columns if row_columns is not None else groups)
    timings["t_score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cin_s = float(projection.hackward_fraction(scored["g_s"], basis))
    cin_t = float(projection.hackward_fraction(scored["g_t"], basis)) if cfg.teacher_group else None
    # Each student rollout's hack score: how hack-ward its own log-likelihood gradient points, whatever its
    # advantage's sign and without the KL term (logged, not trained on).
    if row_columns is not None:
        for i, score in zip(chosen, projection.hackward_fraction(scored["columns"], basis).tolist()):
            rollouts[i].hack_score = score
    stats = arm.gradient(run)
    if run.basis.reads(step):
        run.basis.observe(step, _group_columns(groups, row_columns, scored["columns"]))
    if run.probe is not None:
        run.probe.observe(step, [rollouts[i] for i in chosen], features)
    timings["t_project"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(_knobs(wrappers), cfg.grad_clip))
    before = projection.snapshot(wrappers)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.optimizer.step()
    arm.update(run, before)
    run.scheduler.step()
    timings["t_optimizer"] = time.perf_counter() - t0

    rollouts = [r for share in distributed.all_gather(run.world, [dataclasses.replace(r, sample_logp=None)
                                                                   for r in rollouts]) for r in share]
    students = [r for r in rollouts if not r.teacher]
    with_score = [r for r in students if r.hack_score is not None]
    figures = {
        "reward": sum(r.reward for r in students) / len(students),
        "format_s": sum(r.format_ok for r in students) / len(students),
        "repeat_s": sum(repeated_fraction(r.completion_ids) for r in students) / len(students),
        "completion_tokens": sum(len(r.completion_ids) for r in students) / len(students),
        **_rates(students, "s"), **_rates([r for r in rollouts if r.teacher], "t"),
        "loss": scored["loss"], "kl": scored["kl"] / max(scored["tokens"], 1), "grad_norm": grad_norm,
        "cin_s": cin_s, "cin_t": cin_t, "cin_null_s": _concatenated_null(basis, wrappers),
        "cin": stats["cin"], "cout": stats["cout"], "cin_null": stats["cin_null"],
        "fired": stats["fired"], "gated_frac": stats["gated_frac"],
        "update_hackward": projection.update_hackward_fraction(before, wrappers, basis),
        "hack_auroc": auroc([r.hack_score for r in with_score], [r.exploited for r in with_score]),
        **detector_stats(rollouts, cfg), **probe_stats(students, cfg),
        "frac_zero_spread": scored["zero_spread"] / cfg.prompts_per_step,
        **{k: scored[k] / max(scored["sampled_tokens"], 1) for k in ("sample_kl", "sample_dlogp", "is_truncated")},
        "dS_norm": float(torch.cat([w.delta_s.detach().flatten() for w in wrappers.values()]).norm()),
        "dS_hack_norm": float(torch.cat([w.delta_s_hack.detach().flatten() for w in wrappers.values()]).norm()),
        "lr": lr, **timings}
    for mode in MODES:
        of_mode = [r for r in students if r.problem.mode == mode]
        if of_mode:
            figures[f"hack_s/{mode}"] = sum(r.exploited for r in of_mode) / len(of_mode)
            figures[f"gt_s/{mode}"] = sum(r.gt_correct for r in of_mode) / len(of_mode)
    figures["step_seconds"] = time.perf_counter() - start
    return StepResult(step, rollouts, figures)


def metrics_row(result: StepResult, basis_overlap: float | None = None, evaluation: dict | None = None) -> dict:
    """The step's one metrics row: what it measured, the overlap of a refresh after it, and the
    held-out evaluation after it (evaluate.metrics_row), when either happened."""
    row = {"step": result.step, **result.figures}
    if basis_overlap is not None:
        row["basis_overlap"] = basis_overlap
    if evaluation is not None:
        row.update(evaluation_row(evaluation))
    return row
