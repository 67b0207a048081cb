"""The method inside TRL's GRPOTrainer: the SVD adapter on a transformers model, and a callback that
erases, routes or only measures the hack-ward part of each knob gradient and of each update.

    projection = prepare(model, V=V, intervention="erase", gate="no_gate", adam_leak="update")
    trainer = ProjectedGRPOTrainer(model=model, projection=projection, reward_funcs=reward, args=args, ...)
    trainer.train()
    projection.merged_model()  # a plain transformers model, the quarantine ablated: save_pretrained it

`prepare` wraps every target Linear (the base frozen, as in the package) and returns a
`ProjectionCallback` with the arm's meaning (none: measure only; erase; route, with its quarantine
knob), its gate and `adam_leak`, and V from one source: `V` (per layer, k x r rows), `basis_path`
(a basis file the package saved: its cache under out/bases), `pairs` (the package's contrast pairs,
extracted at the start with `tokenizer`, cached as the package caches them), or a live V
(`refresh_every` > 0 with `detector`: V rebuilt from the trainer's own rollouts, flagged by the
detector, every refresh_every steps). docs/trl.md says what differs from the package's own loop.

The callback needs transformers alone; `ProjectedGRPOTrainer` (TRL's GRPOTrainer, the callback
attached and its figures logged through TRL's own metrics) imports TRL, the `peer` extra.

Module order: above export (its merge) and basis; nothing in the package imports it.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from . import adapter, distributed, hack_basis, projection
from .basis import Basis, extract, usable
from .config import Config, ConfigError, validate
from .export import merge_and_unwrap

ARMS = ("none", "erase", "route")  # the arms that act on the gradient and the update: a callback's reach
# the fields a TRL run reads; the rest of Config (the loop, the problems, the grader, ...) is TRL's or the user's
FIELDS = ("intervention", "control", "gate", "gate_beta", "overshoot", "preserve_magnitude", "adam_leak",
          "refresh_every", "live_window", "basis_k", "basis_tau", "basis_k_use", "basis_min_margin",
          "drop_bottom_frac", "loss_norm", "max_new", "seed", "device")


class ProjectionCallback(TrainerCallback):
    """The arm's gradient and update hooks at TRL's optimizer step, with V's life (basis.Basis)."""

    def __init__(self, cfg: Config, wrappers: dict[str, adapter.AdapterLayer], model, tokenizer=None,
                 detector=None):
        self.cfg, self.wrappers, self.model, self.tokenizer, self.detector = cfg, wrappers, model, tokenizer, detector
        self.basis = Basis(cfg, distributed.SINGLE, [])
        self.figures: dict[str, list[float]] = defaultdict(list)  # where they are logged (the trainer's metrics)
        self.recorded: list[tuple] = []  # (prompt, completion, flag) of this step's rollouts, for a live V
        self.refreshes: list[tuple[int, float | None]] = []  # (step, overlap with the V it replaced)
        self._before: dict[str, torch.Tensor] = {}

    # --- a live V's records
    def recorded_reward(self, reward_fn):
        """`reward_fn` as TRL calls it, the detector's flag of each completion recorded on the way (the reward is
        reward_fn's alone: the flags reach V, nothing else)."""
        if self.detector is None:
            raise ConfigError("recorded_reward: a live V needs prepare(..., detector=...) to flag the rollouts")

        def reward(prompts, completions, **kwargs):
            flags = self.detector(prompts=prompts, completions=completions, **kwargs)
            if len(flags) != len(completions):
                raise ValueError(f"detector: {len(flags)} flags for {len(completions)} completions")
            self.recorded.extend(zip(prompts, completions, (bool(f) for f in flags)))
            return reward_fn(prompts=prompts, completions=completions, **kwargs)

        reward.__name__ = getattr(reward_fn, "__name__", "reward")
        return reward

    def _differences(self) -> dict[str, torch.Tensor] | None:
        """Per group (the rollouts of one prompt) holding a flagged and an unflagged completion, the mean
        log-likelihood knob gradient of the flagged minus that of the unflagged, as the package's live V takes
        them: one scoring pass (forward and backward) over those groups' completions."""
        groups: dict[str, list[tuple]] = defaultdict(list)
        for prompt, completion, flag in self.recorded:
            groups[json.dumps(prompt, sort_keys=True)].append((prompt, completion, flag))
        mixed = [rows for rows in groups.values() if len({flag for *_, flag in rows}) == 2]
        if not mixed:
            return None
        rows = [row for group in mixed for row in group]
        if not all(isinstance(prompt, list) for prompt, *_ in rows):
            raise ConfigError("a live V scores conversational prompts (lists of messages), as the package does")
        grads = hack_basis.completion_grads(
            self.model, self.tokenizer, self.wrappers, [prompt for prompt, *_ in rows],
            [c[-1]["content"] if isinstance(c, list) else c for _, c, _ in rows], self.cfg.max_new, self.cfg.loss_norm)
        out, start = defaultdict(list), 0
        for group in mixed:
            flags = torch.tensor([flag for *_, flag in group])
            for name, g in grads.items():
                part = g[start:start + len(group)]
                out[name].append(part[flags].mean(0) - part[~flags].mean(0))
            start += len(group)
        return {name: torch.stack(rows) for name, rows in out.items()}

    # --- the trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        # V's schedule reads the run's length; the live differences are normalised as the loss is
        self.cfg.steps, self.cfg.max_new = state.max_steps, getattr(args, "max_completion_length", self.cfg.max_new)
        if self.cfg.refresh_every and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ConfigError("a live V under several processes: each rank would build its own from its own rollouts; "
                              "run on one process, or give every rank the same V (V=, basis_path=)")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        cfg, arm = self.cfg, self.cfg.intervention
        if not any(layer.delta_s.grad is not None for layer in self.wrappers.values()):
            raise RuntimeError("projected_grpo: no knob has a gradient at the optimizer step; DeepSpeed ZeRO and FSDP "
                               "keep gradients where the callback cannot reach them (not supported)")
        stats = projection.project_all(self.wrappers, self.basis.V, erase=arm != "none", route=arm == "route",
                                       gate=cfg.gate, overshoot=cfg.overshoot,
                                       preserve_magnitude=cfg.preserve_magnitude, quarantine=self.basis.quarantine,
                                       grad_mean=self.basis.grad_mean, gate_beta=cfg.gate_beta)
        if arm != "none" and cfg.adam_leak == "moments":
            projection.project_adam_moments(kwargs["optimizer"], self.wrappers, self.basis.V)
        for key in ("cin", "cout", "cin_null", "gated_frac"):
            self.figures[key].append(stats[key])
        self._before = projection.snapshot(self.wrappers)

    def on_optimizer_step(self, args, state, control, **kwargs):
        cfg = self.cfg
        if cfg.intervention != "none" and cfg.adam_leak == "update":
            projection.project_update(self._before, self.wrappers, self.basis.V, cfg.gate, cfg.overshoot,
                                      self.basis.grad_mean)
        self.figures["update_hackward"].append(projection.update_hackward_fraction(self._before, self.wrappers,
                                                                                   self.basis.V))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.basis.reads(step):  # after TRL's zero_grad: the scoring pass leaves no gradient behind
            self.basis.observe(step, self._differences())
        self.recorded = []
        if self.basis.due(step):
            overlap = self.basis.refresh(step, self.model, self.tokenizer, self.wrappers)
            self.refreshes.append((step, overlap))
            if overlap is not None:
                self.figures["basis_overlap"].append(overlap)

    # --- out of training
    def merged_model(self, keep_quarantine: bool = False):
        """The model with the knobs merged into its weights and the adapter removed (the quarantine ablated
        unless kept): a plain transformers model for save_pretrained, vLLM or an evaluation harness."""
        merge_and_unwrap(self.model, self.wrappers, keep_quarantine)
        return self.model


def _check_rows(V: dict[str, torch.Tensor], linears: dict) -> None:
    """V names adapted layers only, each with orthonormal rows of its rank's length (k x r)."""
    for name, rows in V.items():
        if name not in linears:
            raise ConfigError(f"prepare: V names {name!r}, not a layer the adapter wraps (it wraps "
                              f"{', '.join(list(linears)[:3])}, ...)")
        r = min(linears[name].weight.shape)
        if rows.dim() != 2 or rows.shape[1] != r:
            raise ConfigError(f"prepare: V[{name!r}] has shape {tuple(rows.shape)}; it needs k x {r} rows")
        gram = rows.float() @ rows.float().T
        if not torch.allclose(gram, torch.eye(len(rows)), atol=1e-4):
            raise ConfigError(f"prepare: V[{name!r}]'s rows are not orthonormal")


def prepare(model, *, V: dict[str, torch.Tensor] | None = None, basis_path: str | None = None, pairs=None,
            detector=None, tokenizer=None, **settings) -> ProjectionCallback:
    """Wrap `model`'s target Linears in the SVD adapter (every other parameter frozen) and return the callback
    that projects its knob gradients. `settings` are the package's Config fields a TRL run reads (FIELDS:
    intervention, gate, adam_leak, refresh_every, ...; `python -m projected_grpo.train --help` gives each one's
    reason). Exactly one source of V: `V`, `basis_path`, `pairs` (with `tokenizer`), or a live V (refresh_every
    > 0 with `detector`, a function called as a TRL reward function is that returns one flag per completion, and
    `tokenizer`). Any other combination is one ConfigError naming it."""
    if unknown := sorted(set(settings) - set(FIELDS)):
        raise ConfigError(f"prepare: {', '.join(unknown)} not settings a TRL run reads; those are: {', '.join(FIELDS)}")
    cfg = Config(**{"intervention": "erase", "gate": "one_sided", **settings,
                    "pairs": "live" if settings.get("refresh_every") and detector is not None else "templates"})
    validate(cfg)
    if cfg.intervention not in ARMS:
        raise ConfigError(f"prepare: intervention={cfg.intervention} does not act on the gradient (screen, penalty "
                          f"and advmod act on rewards or advantages, which a TRL user writes into the reward "
                          f"function); the callback runs {', '.join(ARMS)}")
    if cfg.control not in ("none", "random"):
        raise ConfigError(f"prepare: control={cfg.control}: the callback takes none or random (a random basis of "
                          "V's shape)")
    live = cfg.pairs == "live"
    sources = [name for name, given in (("V", V is not None), ("basis_path", basis_path), ("pairs", pairs),
                                        ("a live V (refresh_every with detector)", live)) if given]
    if len(sources) != 1:
        raise ConfigError(f"prepare: give exactly one source of V, got {' and '.join(sources) or 'none'} "
                          "(V=, basis_path=, pairs= with tokenizer=, or refresh_every= with detector= and tokenizer=)")
    if (live or pairs) and tokenizer is None:
        raise ConfigError(f"prepare: {sources[0]} needs tokenizer= to score completions")
    if cfg.refresh_every and not live:
        raise ConfigError("prepare: refresh_every rebuilds a live V from flagged rollouts; give detector= too, or "
                          "leave it 0 for a fixed V")
    if V is not None:
        _check_rows(V, adapter.targeted(model))
    wrappers = adapter.wrap(model)
    if cfg.intervention != "route":  # only route trains the quarantine: TRL's optimizer must not see it
        for layer in wrappers.values():
            layer.delta_s_hack.requires_grad_(False)
    callback = ProjectionCallback(cfg, wrappers, model, tokenizer, detector)
    if V is not None:
        fixed = {name: rows.float() for name, rows in V.items()}
    elif basis_path:
        fixed = usable(cfg, hack_basis.load_basis(basis_path), callback.basis.notes)
    elif pairs:
        fixed = usable(cfg, extract(cfg, model, tokenizer, wrappers, list(pairs)), callback.basis.notes)
    else:
        return callback  # a live V: none before the first refresh
    if cfg.control == "random" and not pairs:  # extract_basis draws the pairs' control itself
        fixed = hack_basis.random_like(fixed, cfg.seed)
    callback.basis.set(fixed)
    return callback


class ProjectedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with a ProjectionCallback attached, its figures (cin, cout, cin_null, gated_frac,
    update_hackward, and basis_overlap at a refresh) logged through TRL's metrics under the package's names."""

    def __init__(self, *args, projection: ProjectionCallback, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), projection]
        super().__init__(*args, **kwargs)
        self.projection = projection

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            for key, values in self.projection.figures.items():
                self._metrics["train"][key].extend(values)
            self.projection.figures.clear()
        super().log(logs, start_time)


