"""A run's pieces, put together before its first step: the problems' split, the teacher pool, the
trusted baseline's subspace, the model and its optimizer, and V (basis.py, which owns V's life from
its pairs on). `assemble` returns them as one `Run`, which a step (step.py) reads and the loop
(train.py) carries from step to step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from . import __version__, adapter, checkpoints, distributed, hack_basis, interventions, sandbox
from .basis import Basis, on_device, pairs_and_pool, self_pairs
from .config import Config, ConfigError
from .distributed import World
from .files import iter_jsonl, write_directory_atomically
from .model import load_model_and_tokenizer
from .monitor import Probe
from .problems import ProblemFormatError, load_problems, split_held_out
from .scoring import PromptCache
from .teacher_pool import HOW_TO_BUILD, Pool, PoolFormatError, build_pool, load_pool

log = logging.getLogger("projected_grpo")


@dataclasses.dataclass
class Run:
    """What a step reads and the loop carries: the model and its knobs, the problems, V and everything
    an intervention's hooks act with."""
    cfg: Config  # as the run was asked for, but for the device this rank runs on
    arm: interventions.Intervention
    world: World
    model: torch.nn.Module
    tok: object
    wrappers: dict  # layer name -> adapter.AdapterLayer: delta_s and delta_s_hack per layer
    train: list  # training problems
    held_out: list  # evaluation problems, never trained on and never in a pair
    pool: Pool | None  # teacher rows, without the ones that became pairs
    trusted: tuple[dict, dict] | None  # (T, w) of the trusted baseline
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    workers: int | None  # parallel graders
    basis: Basis  # V, its live buffer, the gate's memory and the notes on V's making
    probe: Probe | None = None  # --monitor=probe: the probe screen, penalty and advmod read
    reference: PromptCache = dataclasses.field(default_factory=PromptCache)  # the reference's prompts' keys and
    # values, which never change: kept across steps so a prompt drawn again is not run again


# ----------------------------------------------------------------------------- problems, pool, pairs


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


# ----------------------------------------------------------------------------- the trusted baseline


def trusted_subspace(cfg: Config, arm, model, tok, wrappers, pairs, problems,
                     world: World = distributed.SINGLE) -> tuple[dict, dict] | None:
    """T and w of the trusted baseline, from the pairs' clean side or --trusted_from, on the model's device
    (made on rank 0, sent to every rank). Extracted on the model as it is when called: the base model,
    before any checkpoint is loaded."""
    if not arm.trusted_subspace:
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
    T, w = distributed.from_main(world, lambda: [on_device(x, "cpu") for x in hack_basis.trusted_basis(
        model, tok, wrappers, messages, texts, cfg.basis_k, cfg.max_new, cfg.loss_norm, progress=True)])
    return on_device(T, cfg.device), on_device(w, cfg.device)


# ----------------------------------------------------------------------------- the run


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


def assemble(cfg: Config, world: World, model_path: str, train, held_out,
             checkpoint: Path | None = None) -> tuple[Run, dict | None]:
    """The run's pieces on this rank, its knobs and optimizer restored from `checkpoint` if one is
    given; returns the Run and the checkpoint's state (its step and rows), or None for a fresh run.
    `cfg.device` is this rank's device."""
    arm = interventions.check(cfg)
    sandbox.use_grader(cfg.grader)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with distributed.main_first(world):  # rank 0 fills the download, tokenizer, SVD and pool caches; the others read
        model, tok = load_model_and_tokenizer(model_path, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
        wrappers = adapter.wrap(model)
        pool = resolve_pool(cfg, train)
    model_id = hack_basis.model_identity(cfg.model, wrappers)
    workers = distributed.grade_workers(cfg, world)
    notes = {}

    def own():
        with distributed.main_first(world):  # rank 0 samples and caches them; the others read the cache
            pairs, notes["self_pairs"] = self_pairs(cfg, model, tok, wrappers, train, workers, model_id)
        return pairs

    pairs, pool = pairs_and_pool(cfg, train, pool, own)
    trusted = trusted_subspace(cfg, arm, model, tok, wrappers, pairs, train, world)
    params = [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    run = Run(cfg, arm, world, model, tok, wrappers, train, held_out, pool, trusted, optimizer, scheduler, workers,
              Basis(cfg, world, pairs, notes=notes), Probe(cfg, world) if cfg.monitor == "probe" else None)
    if checkpoint is not None:
        state = checkpoints.load(checkpoint, wrappers, optimizer, scheduler)
        run.basis.restore(state)
        if run.probe is not None and state["probe"] is not None:
            run.probe.restore(state["probe"])
        return run, state
    run.basis.start(model, tok, wrappers, model_id)
    return run, None
