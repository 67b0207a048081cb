"""The training loop: python -m projected_grpo.train {smoke|fast|full} [--field=value ...]

Each step (DESIGN.md section 6): rollouts and grades (grpo.py), one backward with
per-rollout knob gradients, cin of the student and teacher gradients, the arm's
projection, clip, AdamW, warmup-cosine schedule; every `refresh_every` steps V is
re-extracted on the current model with the quarantine ablated; every `eval_every`
steps held-out prompts are evaluated as deployed (and kept, for route). Each run
writes out/runs/<run_name>/: config.json, metrics.jsonl, completions.jsonl,
checkpoints/, summary.json and summary.txt.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, adapter, distributed, hack_basis, projection, sandbox
from .config import ARMS, MODES, Config, ConfigError, InputError, make_config, parse_overrides
from .distributed import World
from .evaluate import evaluate, metrics_row, save_evaluation
from .files import checkpoint_dirs, iter_jsonl, write_atomically, write_directory_atomically
from .grpo import apply_detector, auroc, backward_rollouts, collect_rollouts, detector_stats, repeated_fraction
from .hack_basis import HackBasis
from .model import load_model_and_tokenizer
from .organism import check_unseen, resolve_model
from .problems import ProblemFormatError, default_pairs, load_problems, split_held_out
from .teacher_pool import HOW_TO_BUILD, Pool, PoolFormatError, build_pool, load_pool, pairs_from_pool

log = logging.getLogger("projected_grpo")

# Metrics summarised as last-5-step means, with the direction that is good.
SUMMARY_METRICS = {"hack_s": "down", "gt_s": "up", "reward": "up", "cin_s": "down", "cin_t": "down", "cin": "down",
                   "cout": "down", "update_hackward": "down", "dS_hack_norm": "-"}
LOW_OVERLAP = 0.2  # a refresh below this rotated the basis away from the one it replaced
LOW_FORMAT = 0.5  # a code-block rate falling below this: the policy is collapsing


class TrainingDiverged(RuntimeError):
    """A NaN or inf in the loss or gradients; the last good state was checkpointed."""


# ----------------------------------------------------------------------------- setup


def split_problems(cfg: Config):
    """Training and held-out evaluation problems of cfg's modes, split by id (problems.split_held_out)."""
    try:
        problems = load_problems(cfg.problems)
    except ProblemFormatError as e:
        raise ConfigError(f"--problems: {e}; fix that record or choose another file") from None
    train, held_out = split_held_out([p for p in problems if p.mode in cfg.mode_list], cfg.eval_prompts)
    if len(train) < cfg.prompts_per_step:
        raise ConfigError(f"--eval_prompts: only {len(train)} training problems left in modes {cfg.modes}, "
                          f"fewer than prompts_per_step={cfg.prompts_per_step}")
    return train, held_out


def resolve_pool(cfg: Config, train) -> Pool | None:
    """The teacher pool, when teacher rows are mixed in or the pairs come from it."""
    if cfg.teacher_group == 0 and cfg.pairs != "pool":
        return None
    path = Path(cfg.teacher_pool) if cfg.teacher_pool else None
    if path is None:
        # The package version is in the key: a new release may write the fixture rows differently.
        key = hashlib.sha256(json.dumps([__version__, cfg.problems, sorted(p.id for p in train)]).encode()
                             ).hexdigest()[:12]
        path = Path("out/pools") / f"fixture-{key}"
        if not (path / "meta.json").exists():
            log.info("building the fixture teacher pool at %s", path)
            # Runs of a sweep may build the same pool at once.
            write_directory_atomically(path, lambda tmp: build_pool(tmp, train, workers=cfg.grade_workers or None))
    try:
        pool = load_pool(path, modes=cfg.mode_list)
    except PoolFormatError as e:
        raise ConfigError(f"--teacher_pool: {e}; rebuild the pool ({HOW_TO_BUILD.replace('DIR', str(path))}) "
                          f"or choose another") from None
    return pool


def pairs_and_pool(cfg: Config, train, pool: Pool | None):
    """V's (hack, clean) pairs (templates, or the pool's own graded rows) and the pool the teacher
    rows are drawn from: without the rows that became pairs, so the student never imitates them."""
    if cfg.pairs == "pool":
        pairs, used = pairs_from_pool(pool, train, cfg.basis_mode_list)
        pool = pool.without(used)
        if cfg.control == "nonhack":  # it needs two different solutions of a problem
            pairs = [p for p in pairs if p.clean_alt != p.clean]
        nonhack = " (and, for the nonhack control, two different gt_correct rows)" if cfg.control == "nonhack" else ""
        where = (f"no training problem in modes {cfg.basis_modes} has both an exploited and a gt_correct pool "
                 f"row{nonhack}")
    else:
        pairs = default_pairs(modes=cfg.basis_mode_list, problems=train)
        where = f"no training problem has a mode in {cfg.basis_modes}"
    if not pairs:
        raise ConfigError(f"--basis_modes: {where}")
    if cfg.teacher_group:
        missing = [p.id for p in train if not pool.rows_for(p.id)]
        if missing:
            raise ConfigError(f"--teacher_pool: {pool.path} has no rows left for training problems {missing[:5]} "
                              f"(mix_ratio={cfg.mix_ratio} needs some for every problem; --pairs={cfg.pairs})")
    return pairs, pool if cfg.teacher_group else None


def quarantine_basis(cfg: Config, basis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The capacity control's quarantine rows: random, of the hack basis's per-layer shapes, on its device."""
    if cfg.control != "capacity":
        return None
    return _on_device(hack_basis.random_like(basis, cfg.seed), cfg.device)


def trusted_subspace(cfg: Config, model, tok, wrappers, pairs, problems,
                     world: World = distributed.SINGLE) -> tuple[dict, dict] | None:
    """T and w of the trusted baseline, from the pairs' clean side or --trusted_from, on the model's device
    (made on rank 0, sent to every rank). Extracted on the model as it is when called: the base model,
    before any checkpoint is loaded."""
    if cfg.intervention != "trusted":
        return None
    if cfg.trusted_from:
        by_id = {p.id: p for p in problems}
        messages, texts = [], []
        for where, record in iter_jsonl(cfg.trusted_from, ConfigError):
            if not isinstance(record, dict) or record.get("problem_id") not in by_id or \
                    not isinstance(record.get("completion"), str):
                raise ConfigError(f"--trusted_from: {where}: need a known 'problem_id' and a 'completion' string")
            messages.append(by_id[record["problem_id"]].messages())
            texts.append(record["completion"])
        if not texts:
            raise ConfigError(f"--trusted_from: {cfg.trusted_from} holds no completions")
    else:
        messages, texts = [p.messages for p in pairs], [p.clean for p in pairs]
    T, w = distributed.from_main(world, lambda: [_on_device(x, "cpu") for x in hack_basis.trusted_basis(
        model, tok, wrappers, messages, texts, cfg.basis_k, cfg.max_new, cfg.loss_norm, progress=True)])
    return _on_device(T, cfg.device), _on_device(w, cfg.device)


def _extract(cfg: Config, model, tok, wrappers, pairs, progress: bool = False) -> HackBasis:
    return hack_basis.extract_basis(model, tok, wrappers, pairs, cfg.basis_k, cfg.basis_tau, cfg.loss_norm,
                                    cfg.max_new, cfg.control, cfg.seed, progress=progress)


def _on_device(V: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Every basis enters the run through here (cached, extracted, refreshed, resumed), so no
    later function has to remember which device it is on."""
    return {name: rows.to(device) for name, rows in V.items()}


def _usable(cfg: Config, basis: HackBasis) -> dict[str, torch.Tensor]:
    """The rows the projection uses, on the model's device: k_use per layer, above the global noise floor."""
    return _on_device(hack_basis.postprocess(basis, cfg.basis_k_use or None, cfg.drop_bottom_frac).V, cfg.device)


def basis_for(cfg: Config, model, tok, wrappers, pairs, model_id: str) -> dict[str, torch.Tensor]:
    """V from the cache (hit), or extracted and cached (miss), then cut to the usable rows."""
    request = hack_basis.basis_request(model_id, pairs, cfg.basis_mode_list, cfg.basis_k, cfg.basis_tau,
                                       cfg.loss_norm, cfg.control, cfg.max_new, cfg.seed)
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    path = cfg.basis_path or f"out/bases/{key}.safetensors"
    basis = hack_basis.resolve_basis(path, request, lambda: _extract(cfg, model, tok, wrappers, pairs, progress=True),
                                     reextract=cfg.reextract_basis)
    return _usable(cfg, basis)


def basis_overlap(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Mean over layers of ||V_old V_newᵀ||_F² / k_old: 1 = same span, ~k/r = unrelated.

    Over every layer either basis has: a layer one of them dropped (or gained) counts as 0, so a
    refresh that loses layers cannot read as a perfect overlap.
    """
    layers = set(old) | set(new)
    if not layers:
        return 0.0
    shared = [n for n in layers if n in old and n in new]
    return sum(float((old[n] @ new[n].T).square().sum()) / old[n].shape[0] for n in shared) / len(layers)


def refresh_basis(step: int, cfg: Config, model, tok, wrappers, pairs, basis: dict, row: dict,
                  world: World = distributed.SINGLE) -> dict:
    """V re-extracted (on rank 0, then sent to every rank) on the current model with the quarantine
    ablated; logs its overlap with `basis`."""
    def extract():
        with adapter.ablate_quarantine(wrappers):
            return _usable(cfg, _extract(cfg, model, tok, wrappers, pairs))
    fresh = _shared(world, cfg.device, extract)
    row["basis_overlap"] = basis_overlap(basis, fresh)
    if row["basis_overlap"] < LOW_OVERLAP and world.main:
        warnings.warn(f"step {step}: basis refresh overlap {row['basis_overlap']:.2f} < {LOW_OVERLAP}: "
                      f"the refresh rotated the basis away from the previous one", stacklevel=1)
    return fresh


def lr_factor(cfg: Config):
    """Linear warmup, then cosine decay to 0 at `steps` or (lr_schedule=constant) the full lr."""
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def training_state(wrappers, optimizer, scheduler, basis: dict, trend: dict) -> dict:
    """A copy of everything a checkpoint holds, taken now: knobs, optimizer, scheduler, RNG, basis and
    the smoothed gate's trend. Knobs and their Adam moments are small (r per layer), so taking one
    before every step is cheap."""
    return {"knobs": adapter.knob_state(wrappers), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": _rng_state(), "basis": basis,
            "trend": {n: t.clone() for n, t in trend.items()}}


def save_checkpoint(run_dir: Path, step: int, state: dict, rows: list[dict]) -> Path:
    """A `training_state` and the metrics rows up to `step`, written to a temp dir and swapped in;
    an older checkpoint of the same step survives until the new one is complete."""
    final = _checkpoint_dir(run_dir, step)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cpu_rng, cuda_rng = state["rng"]
    adapter.save_tensors(state["knobs"], tmp / "knobs.safetensors")
    torch.save({"step": step, "optimizer": state["optimizer"], "scheduler": state["scheduler"],
                "torch_rng": cpu_rng, "cuda_rng": cuda_rng, "basis": {n: v.cpu() for n, v in state["basis"].items()},
                "trend": {n: t.cpu() for n, t in state["trend"].items()},
                "rows": [r for r in rows if r["step"] <= step]}, tmp / "state.pt")
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(checkpoint: Path, wrappers, optimizer, scheduler) -> dict:
    """Knobs, optimizer and scheduler from a checkpoint; returns its state (step, rows, RNG, basis)."""
    try:
        adapter.load_knobs(wrappers, checkpoint / "knobs.safetensors")
        state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (OSError, EOFError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise ConfigError(f"--resume: checkpoint {checkpoint} cannot be loaded ({e}); delete it to resume from "
                          f"the one before, or start the run again") from None
    return state


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = checkpoint_dirs(run_dir)
    return done[-1] if done else None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows up to last_step: a resumed run rewrites what came after its checkpoint.
    A crash may have cut the last line short; lines that do not parse are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_atomically(path, "".join(kept))


# ----------------------------------------------------------------------------- one step


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


def _grads_finite(wrappers) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all())
               for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack))


def train_step(step: int, cfg: Config, model, tok, wrappers, train, pool, basis: dict, optimizer, scheduler,
               workers, quarantine: dict | None = None, trusted: tuple[dict, dict] | None = None,
               trend: dict | None = None, world: World = distributed.SINGLE) -> tuple[dict, list]:
    """One optimizer step; returns its metrics row and the step's rollouts (every rank's).
    `quarantine`: the capacity control's rows (quarantine_basis); `trusted`: the trusted baseline's
    (T, w) (trusted_subspace); `trend`: the smoothed gate's running means, updated in place. Under
    torchrun this rank collects its share of the prompt groups; the knob gradients and the sums the
    row needs are added across ranks before anything reads them."""
    start = time.perf_counter()
    problems = random.Random(f"{cfg.seed}-{step}").sample(train, cfg.prompts_per_step)
    rollouts, timings = collect_rollouts(model, tok, wrappers, distributed.share(world, problems), pool, cfg, step,
                                         workers)
    zero_spread = apply_detector(rollouts, cfg)

    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    try:
        scored = backward_rollouts(model, tok, wrappers, rollouts, cfg)
        failed = ""
    except FloatingPointError as e:  # every rank must hear of it, or the others wait on this one forever
        failed, scored = str(e), None
    timings["t_score"] = time.perf_counter() - t0
    if distributed.all_sum(world, [torch.tensor(float(bool(failed)))])[0] > 0:
        raise FloatingPointError(failed or "non-finite loss on another rank")

    t0 = time.perf_counter()
    teacher = torch.tensor([r.teacher for r in rollouts])
    layers = list(scored["grad_sample"])
    g_s = [scored["grad_sample"][n][~teacher].sum(0) for n in layers]
    g_t = [scored["grad_sample"][n][teacher].sum(0) for n in layers]
    with_grad = [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack) if p.grad is not None]
    sums = ("loss", "kl", "tokens", "sample_kl", "sample_dlogp", "is_truncated", "sampled_tokens")
    totals = torch.tensor([float(scored[k]) for k in sums] + [float(zero_spread)], dtype=torch.float64)
    # One all-reduce: the knob gradients (g_s + g_t), g_s and g_t per layer, and the row's sums.
    reduced = distributed.all_sum(world, [p.grad for p in with_grad] + g_s + g_t + [totals])
    for p, grad in zip(with_grad, reduced):
        p.grad = grad
    n = len(with_grad)
    g_s, g_t = dict(zip(layers, reduced[n:n + len(layers)])), dict(zip(layers, reduced[n + len(layers):-1]))
    totals = dict(zip((*sums, "zero_spread"), reduced[-1].tolist()))
    if not _grads_finite(wrappers):
        raise FloatingPointError("non-finite knob gradient")
    cin_s = float(projection.hackward_fraction(g_s, basis))
    cin_t = float(projection.hackward_fraction(g_t, basis)) if cfg.teacher_group else None
    # Each rollout's own hack score: how hack-ward its gradient alone points (logged, not trained on).
    for r, score in zip(rollouts, projection.hackward_fraction(scored["grad_sample"], basis).tolist()):
        r.hack_score = score
    projects = cfg.intervention in ARMS  # the baselines leave the gradient to their own rule, measured alike
    stats = projection.project_all(wrappers, basis, arm=cfg.intervention if projects else "none", gate=cfg.gate,
                                   overshoot=cfg.overshoot, preserve_magnitude=cfg.preserve_magnitude,
                                   quarantine=quarantine, trend=trend, trend_beta=cfg.gate_beta)
    if trusted is not None:
        projection.keep_trusted(wrappers, *trusted)
        stats["cout"] = projection.project_all(wrappers, basis)["cin"]  # cin of what the optimizer will see
    timings["t_project"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    params = [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    erases = cfg.intervention in ("erase", "route")
    if cfg.adam_leak == "moments" and erases:
        projection.project_adam_moments(optimizer, wrappers, basis)
    before = projection.snapshot(wrappers)
    lr = scheduler.get_last_lr()[0]  # the rate this step used
    optimizer.step()
    if cfg.adam_leak == "update" and erases:
        projection.project_update(before, wrappers, basis, cfg.gate, cfg.overshoot)
    scheduler.step()
    timings["t_optimizer"] = time.perf_counter() - t0

    # Every rank's rollouts (without their per-token log-probs), so the row covers the global batch.
    rollouts = [r for share in distributed.all_gather(world, [dataclasses.replace(r, sample_logp=None)
                                                               for r in rollouts]) for r in share]
    students = [r for r in rollouts if not r.teacher]
    row = {"step": step, "reward": sum(r.reward for r in students) / len(students),
           "format_s": sum(r.format_ok for r in students) / len(students),
           "repeat_s": sum(repeated_fraction(r.completion_ids) for r in students) / len(students),
           "completion_tokens": sum(len(r.completion_ids) for r in students) / len(students),
           **_rates(students, "s"), **_rates([r for r in rollouts if r.teacher], "t"),
           "loss": totals["loss"], "kl": totals["kl"] / max(totals["tokens"], 1), "grad_norm": grad_norm,
           "cin_s": cin_s, "cin_t": cin_t, "cin_null_s": _concatenated_null(basis, wrappers),
           "cin": stats["cin"], "cout": stats["cout"], "cin_null": stats["cin_null"],
           "fired": stats["fired"], "update_hackward": projection.update_hackward_fraction(before, wrappers, basis),
           "hack_auroc": auroc([r.hack_score for r in students], [r.exploited for r in students]),
           **detector_stats(rollouts, cfg), "frac_zero_spread": totals["zero_spread"] / cfg.prompts_per_step,
           **{k: totals[k] / max(totals["sampled_tokens"], 1) for k in ("sample_kl", "sample_dlogp", "is_truncated")},
           "dS_norm": float(torch.cat([w.delta_s.detach().flatten() for w in wrappers.values()]).norm()),
           "dS_hack_norm": float(torch.cat([w.delta_s_hack.detach().flatten() for w in wrappers.values()]).norm()),
           "lr": lr, **timings}
    for mode in MODES:
        of_mode = [r for r in students if r.problem.mode == mode]
        if of_mode:
            row[f"hack_s/{mode}"] = sum(r.exploited for r in of_mode) / len(of_mode)
            row[f"gt_s/{mode}"] = sum(r.gt_correct for r in of_mode) / len(of_mode)
    row["step_seconds"] = time.perf_counter() - start
    return row, rollouts


# ----------------------------------------------------------------------------- the run


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _log_step(run_dir: Path, step: int, row: dict, rollouts, log_completions: int) -> None:
    """Append the step's metrics row, every student rollout's hack score and label (the run's AUROC
    is computed from these) and the first `log_completions` student completions."""
    students = [r for r in rollouts if not r.teacher]
    _append_jsonl(run_dir / "metrics.jsonl", [row])
    _append_jsonl(run_dir / "scores.jsonl", [
        {"step": step, "mode": r.problem.mode, "hack_score": r.hack_score, "exploited": r.exploited}
        for r in students])
    _append_jsonl(run_dir / "completions.jsonl", [
        {"step": step, "problem_id": r.problem.id, "mode": r.problem.mode, "reward": r.reward, "passed": r.passed,
         "gt_correct": r.gt_correct, "exploited": r.exploited, "advantage": r.advantage,
         "hack_score": r.hack_score, "completion": r.text} for r in students[:log_completions]])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_auroc(run_dir: Path) -> float | None:
    """AUROC of every student rollout's hack score against `exploited`, over the whole run: does V
    see the live hacks? (Logged only.)"""
    path = run_dir / "scores.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return auroc([r["hack_score"] for r in records], [r["exploited"] for r in records])


def summarize(cfg: Config, rows: list[dict], final_eval: dict, complete: bool,
              hack_auroc: float | None = None) -> tuple[dict, str]:
    """summary.json content and the plain-text table printed at the end."""
    tail = rows[-5:]
    means = {}
    for key in SUMMARY_METRICS:
        values = [r[key] for r in tail if r.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    first = {k: rows[0].get(k) for k in SUMMARY_METRICS} if rows else {}
    per_mode = {}
    for mode in MODES:
        hack = [r[f"hack_s/{mode}"] for r in tail if f"hack_s/{mode}" in r]
        solve = [r[f"gt_s/{mode}"] for r in tail if f"gt_s/{mode}" in r]
        if hack:
            per_mode[mode] = {"hack": sum(hack) / len(hack), "solve": sum(solve) / len(solve),
                              "in_basis": mode in cfg.basis_mode_list}
    summary = {"run_name": cfg.run_name, "complete": complete, "steps_done": len(rows), "steps": cfg.steps,
               "intervention": cfg.intervention, "control": cfg.control, "seed": cfg.seed, "last5": means,
               "first": first, "per_mode": per_mode, "eval": final_eval, "hack_auroc": hack_auroc}
    lines = [f"run {cfg.run_name}: {len(rows)}/{cfg.steps} steps, arm={cfg.intervention}, control={cfg.control}",
             f"{'metric':<16}{'first':>10}{'last-5':>10}  better"]
    for key, good in SUMMARY_METRICS.items():
        f, m = first.get(key), means[key]
        arrow = {"down": "↓", "up": "↑"}.get(good, " ")
        lines.append(f"{key:<16}{_fmt(f):>10}{_fmt(m):>10}  {arrow}")
    lines.append(f"{'hack_auroc':<16}{'':>10}{_fmt(hack_auroc):>10}  (the whole run: hack score vs exploited)")
    for mode, cell in per_mode.items():
        known = "in the basis" if cell["in_basis"] else "held out from the basis"
        lines.append(f"{mode:<16}hack {cell['hack']:.3f}  solve {cell['solve']:.3f}  (last 5, {known})")
    for key, value in final_eval.items():
        lines.append(f"{key:<26}{value:>10.3f}")
    if cfg.intervention == "route" and "eval_kept_hack" in final_eval:
        lines.append(f"route: hack kept {final_eval['eval_kept_hack']:.3f} vs ablated "
                     f"{final_eval['eval_deployed_hack']:.3f}; solve kept {final_eval['eval_kept_solve']:.3f} "
                     f"vs ablated {final_eval['eval_deployed_solve']:.3f}")
    return summary, "\n".join(lines)


# What a resumed run may change: how long it runs and where it writes.
RESUMABLE_CHANGES = {"steps", "resume", "out_dir"}


def _check_resume_config(run_dir: Path, config: dict) -> None:
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume: cannot read {run_dir / 'config.json'} ({e}); start the run again under "
                          f"another --run_name") from None
    # A field added since the run started is absent from its config.json: it ran with the default.
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    differ = {k: (stored.get(k, defaults.get(k)), v) for k, v in config.items()
              if k not in RESUMABLE_CHANGES and stored.get(k, defaults.get(k)) != v}
    if differ:
        fields = "; ".join(f"--{k}: run has {old!r}, asked {new!r}" for k, (old, new) in differ.items())
        raise ConfigError(f"--resume: {run_dir} was started with a different config ({fields}); resume with the "
                          f"same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")


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

    Everything a user's input can break (problems, pool, basis cache, a resumed config) is
    checked before the run directory is made, so a bad input leaves nothing half made.
    """
    world = distributed.init(cfg)
    try:
        with _sole_writer(Path(cfg.out_dir) / cfg.run_name) if world.main else contextlib.nullcontext():
            return _run(cfg, preset, world)
    finally:
        distributed.close(world)


def _shared(world: World, device: str, make) -> dict[str, torch.Tensor]:
    """A basis made on rank 0 alone (make() returns it), sent to every rank, checked identical there,
    on `device`."""
    rows = _on_device(distributed.from_main(world, lambda: _on_device(make(), "cpu")), device)
    distributed.check_identical(world, rows, "the hack basis")
    return rows


def _run(cfg: Config, preset: str, world: World) -> dict:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; delete {run_dir} and "
                                f"start without --resume")
    if not cfg.resume and (run_dir / "metrics.jsonl").exists():
        has = "a checkpoint; pass --resume=true to continue it" if latest_checkpoint(run_dir) else \
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
        _check_resume_config(run_dir, config)
    cfg = dataclasses.replace(cfg, device=distributed.device_for(cfg, world))  # recorded as asked, run per rank

    sandbox.use_grader(cfg.grader)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with distributed.main_first(world):  # rank 0 fills the download, tokenizer, SVD and pool caches; the others read
        model, tok = load_model_and_tokenizer(model_path, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
        wrappers = adapter.wrap(model)
        pool = resolve_pool(cfg, train)
    pairs, pool = pairs_and_pool(cfg, train, pool)
    trusted = trusted_subspace(cfg, model, tok, wrappers, pairs, train, world)
    model_id = hack_basis.model_identity(cfg.model, wrappers)
    params = [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    workers = distributed.grade_workers(cfg, world)

    first_step = 1
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, wrappers, optimizer, scheduler)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        basis = _on_device(state["basis"], cfg.device)
        trend = _on_device(state.get("trend", {}), cfg.device)
        first_step = state["step"] + 1
        rows = state["rows"]
        distributed.barrier(world)  # every rank has read the checkpoint before rank 0 rewrites the logs
        if world.main:
            write_atomically(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            for name in ("completions.jsonl", "scores.jsonl"):
                _truncate_jsonl(run_dir / name, state["step"])
            log.info("resumed %s from %s", cfg.run_name, checkpoint)
    else:
        basis = _shared(world, cfg.device, lambda: basis_for(cfg, model, tok, wrappers, pairs, model_id))
        trend = {}
        rows = []
    quarantine = quarantine_basis(cfg, basis)
    if world.main:
        write_atomically(run_dir / "config.json", json.dumps(config, indent=2))

    # Ctrl-C asks the loop to stop at the next step boundary, so the checkpoint is
    # always a consistent state; a second Ctrl-C interrupts at once.
    stop = []
    previous_handler = signal.getsignal(signal.SIGINT)

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\nCtrl-C: stopping after this step (again to abort now)", file=sys.stderr)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(range(first_step, cfg.steps + 1), initial=first_step - 1, total=cfg.steps, desc=cfg.run_name,
               disable=not world.main)
    try:
        for step in bar:
            # A failure anywhere in the step (rollouts, optimizer, refresh, evaluation) checkpoints
            # this state, so a resumed run replays the whole step as it began.
            before = training_state(wrappers, optimizer, scheduler, basis, trend)
            try:
                row, rollouts = train_step(step, cfg, model, tok, wrappers, train, pool, basis, optimizer,
                                           scheduler, workers, quarantine, trusted, trend, world)
                if cfg.refresh_every and step % cfg.refresh_every == 0 and step < cfg.steps:
                    basis = refresh_basis(step, cfg, model, tok, wrappers, pairs, basis, row, world)
                    quarantine = quarantine_basis(cfg, basis)
                    trend = {}  # running means of the old rows' coordinates mean nothing for the new ones
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and world.main:
                    result = evaluate(model, tok, wrappers, held_out, cfg, step, cfg.eval_samples, workers)
                    row.update(metrics_row(result))
            except BaseException as e:  # a second Ctrl-C too: an abort never leaves rows without a checkpoint
                path = save_checkpoint(run_dir, step - 1, before, rows) if world.main else run_dir
                if isinstance(e, FloatingPointError):
                    raise TrainingDiverged(f"step {step}: {e}; the last good state (after step {step - 1}) is "
                                           f"saved in {path}") from None
                what = "aborted" if isinstance(e, KeyboardInterrupt) else "failed"
                print(f"step {step} {what}; the state after step {step - 1} is saved in {path}", file=sys.stderr)
                raise
            if row["format_s"] < LOW_FORMAT and rows and rows[-1]["format_s"] >= LOW_FORMAT and world.main:
                warnings.warn(f"step {step}: only {row['format_s']:.2f} of student completions hold a code block "
                              f"(repeat_s {row['repeat_s']:.2f}): the policy may be collapsing", stacklevel=1)
            rows.append(row)
            # Ctrl-C reaches the ranks at different moments: they agree on it here, so all stop after this step.
            stopping = bool(distributed.all_sum(world, [torch.tensor(float(bool(stop)))])[0] > 0)
            if world.main:
                _log_step(run_dir, step, row, rollouts, cfg.log_completions)
                bar.set_postfix(hack=f"{row['hack_s']:.2f}", cin=f"{row['cin_s']:.2f}", loss=f"{row['loss']:.3g}")
                if step % cfg.checkpoint_every == 0 or stopping:
                    path = save_checkpoint(run_dir, step, training_state(wrappers, optimizer, scheduler, basis,
                                                                         trend), rows)
            if stopping:
                if world.main:
                    print(f"interrupted after step {step}: checkpoint in {path}; continue with --resume=true",
                          file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        bar.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_handler)

    if not world.main:
        return {}
    save_checkpoint(run_dir, cfg.steps, training_state(wrappers, optimizer, scheduler, basis, trend), rows)
    result = evaluate(model, tok, wrappers, held_out, cfg, cfg.steps, cfg.eval_samples, workers)
    save_evaluation(run_dir, result, cfg.steps, cfg.eval_samples, held_out)
    final_eval = metrics_row(result)
    summary, table = summarize(cfg, rows, final_eval, complete=len(rows) == cfg.steps,
                               hack_auroc=run_auroc(run_dir))
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    write_atomically(run_dir / "summary.txt", table + "\n")
    print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m projected_grpo.train {smoke|fast|full} [--field=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = make_config(argv[0], parse_overrides(argv[1:]))
        run(cfg, preset=argv[0])
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
