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
extracted at the start with `tokenizer`), or a live V (`refresh_every` > 0 with `detector`: V
rebuilt from the trainer's own rollouts, flagged by the detector, every refresh_every steps).
docs/trl.md says what differs from the package's own loop.

It imports TRL (the `peer` extra) for `ProjectedGRPOTrainer`: TRL's GRPOTrainer with the callback
attached, its figures logged through TRL's own metrics.

Module order: above export (its merge) and basis; nothing in the package imports it.
"""

from __future__ import annotations

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
        self.figures: dict[str, list[float]] = defaultdict(list)  # drained into TRL's metrics at each log
        self.generation: list[tuple] = []  # (prompt, completion, flag) of the latest training generation
        self.unread = False  # that generation's groups have not yet reached V
        self.recording = False  # recorded_reward has been called: a live V has records to read
        self.group = 0  # completions per prompt (TRL's num_generations): the groups V's differences are taken in
        self.refreshes: list[tuple[int, float | None]] = []  # (step, overlap with the V it replaced)
        self.merged = False
        self._before: dict[str, torch.Tensor] = {}

    # --- a live V's records
    def recorded_reward(self, reward_fn):
        """`reward_fn` as TRL calls it, the detector's flag of each training completion recorded on the way (the
        reward is reward_fn's alone: the flags reach V, nothing else). Each generation replaces the last."""
        if self.detector is None:
            raise ConfigError("recorded_reward: a live V needs prepare(..., detector=...) to flag the rollouts")
        seen_at = []

        def reward(prompts, completions, **kwargs):
            if self.model.training:  # an evaluation's rollouts never reach V
                flags = list(self.detector(prompts=prompts, completions=completions, **kwargs))
                if len(flags) != len(completions):
                    raise ValueError(f"detector: {len(flags)} flags for {len(completions)} completions")
                step = getattr(kwargs.get("trainer_state"), "global_step", None)
                if not seen_at or seen_at[-1] != step:  # a new generation
                    self.generation, seen_at[:] = [], [step]
                self.generation += list(zip(prompts, completions, (bool(f) for f in flags)))
                self.unread = self.recording = True
            return reward_fn(prompts=prompts, completions=completions, **kwargs)

        reward.__name__ = getattr(reward_fn, "__name__", "reward")
        return reward

    def _differences(self) -> dict[str, torch.Tensor] | None:
        """Per group (the num_generations completions of one prompt, contiguous as TRL lays them out) holding a
        flagged and an unflagged completion, the mean log-likelihood knob gradient of the flagged minus that of
        the unflagged, as the package's live V takes them: one scoring pass (forward and backward) over those
        groups' completions."""
        rows, size = self.generation, self.group
        if len(rows) % size:
            raise ConfigError(f"a live V: {len(rows)} completions do not split into groups of {size}")
        groups = [rows[i:i + size] for i in range(0, len(rows), size)]
        if any(any(prompt != group[0][0] for prompt, *_ in group) for group in groups):
            raise ConfigError("a live V: a group of num_generations completions holds more than one prompt")
        mixed = [group for group in groups if len({flag for *_, flag in group}) == 2]
        if not mixed:
            return None
        scored = [row for group in mixed for row in group]
        if not all(isinstance(prompt, list) for prompt, *_ in scored):
            raise ConfigError("a live V scores conversational prompts (lists of messages), as the package does")
        grads = hack_basis.completion_grads(
            self.model, self.tokenizer, self.wrappers, [prompt for prompt, *_ in scored],
            [c[-1]["content"] if isinstance(c, list) else c for _, c, _ in scored], self.cfg.max_new,
            self.cfg.loss_norm)
        out = defaultdict(list)
        for g, group in enumerate(mixed):
            flags = torch.tensor([flag for *_, flag in group])
            for name, grad in grads.items():
                part = grad[g * size:(g + 1) * size]
                out[name].append(part[flags].mean(0) - part[~flags].mean(0))
        return {name: torch.stack(rows) for name, rows in out.items()}

    # --- the trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        # V's schedule reads the run's length; the live differences are normalised as the loss is
        self.cfg.steps, self.group = state.max_steps, getattr(args, "num_generations", 0) or 0
        self.cfg.max_new = getattr(args, "max_completion_length", None) or self.cfg.max_new
        if self.cfg.pairs == "live" and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
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
            if not self.recording:
                raise ConfigError("a live V has no rollouts to read: pass the reward through "
                                  "projection.recorded_reward(reward) so each completion and its flag are recorded")
            self.basis.observe(step, self._differences() if self.unread else None)
            self.unread = False  # a generation several steps train on reaches V once
        if self.basis.due(step):
            overlap = self.basis.refresh(step, self.model, self.tokenizer, self.wrappers)
            self.refreshes.append((step, overlap))
            if overlap is not None:
                self.figures["basis_overlap"].append(overlap)

    # --- out of training
    def merged_model(self, keep_quarantine: bool = False):
        """The trained model itself, the knobs merged into its weights and the adapter removed (the quarantine
        ablated unless kept): a plain transformers model for save_pretrained, vLLM or an evaluation harness.
        Once: it changes the model in place, so call it after training."""
        if self.merged:
            raise RuntimeError("merged_model: the knobs are already merged into this model")
        merge_and_unwrap(self.model, self.wrappers, keep_quarantine)
        self.merged = True
        return self.model


def _check_rows(V: dict[str, torch.Tensor], linears: dict, source: str) -> None:
    """V names adapted layers only, at least one, each with orthonormal rows of its rank's length (k x r)."""
    if not V:
        raise ConfigError(f"prepare: {source} holds no rows: nothing would be projected")
    for name, rows in V.items():
        if name not in linears:
            raise ConfigError(f"prepare: {source} names {name!r}, not a layer the adapter wraps in this model (it "
                              f"wraps {', '.join(list(linears)[:3])}, ...)")
        r = min(linears[name].weight.shape)
        if rows.dim() != 2 or rows.shape[1] != r:
            raise ConfigError(f"prepare: {source}[{name!r}] has shape {tuple(rows.shape)}; it needs k x {r} rows")
        gram = rows.float() @ rows.float().T
        if not torch.allclose(gram, torch.eye(len(rows), device=gram.device), atol=1e-4):
            raise ConfigError(f"prepare: {source}[{name!r}]'s rows are not orthonormal")


def _config(settings: dict, live: bool) -> Config:
    """Config from prepare's settings, its errors named as prepare's arguments."""
    if unknown := sorted(set(settings) - set(FIELDS)):
        raise ConfigError(f"prepare: {', '.join(unknown)} not settings a TRL run reads; those are: {', '.join(FIELDS)}")
    cfg = Config(**{**settings, "pairs": "live" if live else "templates"})
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"prepare: {str(e).removeprefix('--')}") from None
    if cfg.intervention not in ARMS:
        raise ConfigError(f"prepare: intervention={cfg.intervention} does not act on the gradient (screen, penalty "
                          f"and advmod act on rewards or advantages, which a TRL user writes into the reward "
                          f"function); the callback runs {', '.join(ARMS)}")
    if cfg.control not in ("none", "random"):
        raise ConfigError(f"prepare: control={cfg.control}: the callback takes none or random (a random basis of "
                          "V's shape)")
    return cfg


def prepare(model, *, V: dict[str, torch.Tensor] | None = None, basis_path: str | None = None, pairs=None,
            detector=None, tokenizer=None, **settings) -> ProjectionCallback:
    """Wrap `model`'s target Linears in the SVD adapter (every other parameter frozen) and return the callback
    that projects its knob gradients. `settings` are the package's Config fields a TRL run reads (FIELDS:
    intervention, gate, adam_leak, refresh_every, ...; `python -m projected_grpo.train --help` gives each one's
    reason). Exactly one source of V: `V`, `basis_path`, `pairs` (with `tokenizer`), or a live V (refresh_every
    > 0 with `detector`, a function called as a TRL reward function is that returns one flag per completion, and
    `tokenizer`). Any other combination, and a V that does not fit the model, is one ConfigError naming it,
    raised before the model is wrapped (an extraction from pairs can fail only after)."""
    if any(isinstance(module, adapter.AdapterLayer) for module in model.modules()):
        raise ConfigError("prepare: this model already holds the adapter (prepared before?); load it afresh")
    live = bool(settings.get("refresh_every")) and detector is not None
    cfg = _config(settings, live)
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
    notes: dict = {}
    linears = adapter.targeted(model)
    fixed = None
    if V is not None:
        fixed = {name: rows.float() for name, rows in V.items()}
    elif basis_path:
        try:
            fixed = usable(cfg, hack_basis.load_basis(basis_path), notes)
        except hack_basis.BasisFileError as e:
            raise ConfigError(f"prepare: basis_path: {e}") from None
    if fixed is not None:
        _check_rows(fixed, linears, "V" if V is not None else basis_path)
    wrappers = adapter.wrap(model)
    if cfg.intervention == "route":
        # backward gives the quarantine the same gradient as delta_s; TRL clips before the callback writes the
        # quarantine's own, so it must not count in the clip's norm
        for layer in wrappers.values():
            layer.delta_s_hack.register_hook(torch.zeros_like)
    else:  # only route trains the quarantine: TRL's optimizer must not see it
        for layer in wrappers.values():
            layer.delta_s_hack.requires_grad_(False)
    callback = ProjectionCallback(cfg, wrappers, model, tokenizer, detector)
    callback.basis.notes.update(notes)
    if pairs:
        fixed = usable(cfg, extract(cfg, model, tokenizer, wrappers, list(pairs)), callback.basis.notes)
    elif fixed is not None and cfg.control == "random":  # extract draws the pairs' control itself
        fixed = hack_basis.random_like(fixed, cfg.seed)
    if fixed is not None:
        callback.basis.set(fixed)
    return callback


class ProjectedGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with a ProjectionCallback attached, its figures (cin, cout, cin_null, gated_frac,
    update_hackward, and basis_overlap at a refresh) logged through TRL's metrics under the package's names."""

    def __init__(self, *args, projection: ProjectionCallback, **kwargs):
        config = kwargs.get("args")
        if getattr(config, "use_vllm", False):
            raise ConfigError("ProjectedGRPOTrainer: use_vllm=True would sync the adapter's frozen bases and knobs "
                              "to vLLM as separate weights, not their merged sum; generate with TRL's own "
                              "(use_vllm=False)")
        kwargs["callbacks"] = [c for c in kwargs.get("callbacks") or [] if c is not projection] + [projection]
        super().__init__(*args, **kwargs)
        self.projection = projection

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            for key, values in self.projection.figures.items():
                self._metrics["train"][key].extend(values)
            self.projection.figures.clear()
        super().log(logs, start_time)
