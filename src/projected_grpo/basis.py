"""V's life in a run: where its pairs come from, its extraction at the start (cached), the live
buffer it is rebuilt from, its refresh, the controls' redraw, and the smoothed gate's memory.

`Basis` holds all of it for a run; `assembly` makes one, a step reads `Basis.V` (and the arm's hooks
its `quarantine` and `grad_mean`) and, on the steps a refresh reads (`reads`), adds to its live buffer
(`observe`), and the loop refreshes it (`refresh`) when it is due. What `cfg.pairs` and
`cfg.refresh_every` do to V is decided here alone (elsewhere `pairs` is only validated, checked
against the trusted baseline, asked whether a pool is needed, and printed in the summary's title).

Every V enters the run through `Basis.set` (cached, extracted, refreshed, resumed) on the model's
device. The gate's memory ḡ is in knob space (docs/method.md, "Projection"): nothing here clears
it when V changes, so a refresh, a control's redraw or a resume leaves what the gate knows as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch

from . import __version__, adapter, distributed, hack_basis
from .config import Config, ConfigError
from .distributed import World
from .files import write_atomically
from .grpo import Columns, Rollout, detected, sample_graded
from .hack_basis import HackBasis
from .model import encode_prompt
from .teacher_pool import Pool, pairs_from_pool
from .templates import ContrastPair, default_pairs

log = logging.getLogger("projected_grpo")

LOW_OVERLAP = 0.2  # a refresh below this rotated the basis away from the one it replaced


# ----------------------------------------------------------------------------- pairs


def pairs_and_pool(cfg: Config, train, pool: Pool | None, own=None):
    """V's pairs and the pool the teacher rows are drawn from: without the rows that became pairs, so
    the student never imitates them. Pairs come from the templates, the pool's own graded rows, or
    (self) own(), the model's own samples; live has none (V comes from the run's rollouts)."""
    if cfg.pairs == "live":
        pairs, where = [], ""
    elif cfg.pairs == "self":
        pairs, where = own(), ""
    elif cfg.pairs == "pool":
        pairs, used = pairs_from_pool(pool, train, cfg.basis_mode_list, cfg.pair_contrast)
        pool = pool.without(used)
        if cfg.control == "nonhack":  # it needs two different solutions of a problem
            pairs = [p for p in pairs if p.clean_alt != p.clean]
        nonhack = " (and, for the nonhack control, two different gt_correct rows)" if cfg.control == "nonhack" else ""
        where = (f"no training problem in modes {cfg.basis_modes} has both an exploited and a "
                 f"{'gt_correct' if cfg.pair_contrast == 'clean' else 'failed'} pool row{nonhack}")
    else:
        pairs = default_pairs(modes=cfg.basis_mode_list, problems=train, contrast=cfg.pair_contrast)
        where = f"no training problem has a mode in {cfg.basis_modes}"
    if not pairs and cfg.pairs != "live":
        raise ConfigError(f"--basis_modes: {where}")
    if cfg.teacher_group:
        missing = [p.id for p in train if not pool.rows_for(p.id)]
        if missing:
            raise ConfigError(f"--teacher_pool: {pool.path} has no rows left for training problems {missing[:5]} "
                              f"(mix_ratio={cfg.mix_ratio} needs some for every problem; --pairs={cfg.pairs})")
    return pairs, pool if cfg.teacher_group else None


def self_pairs(cfg: Config, model, tok, wrappers, train, workers, model_id: str) -> tuple[list, dict]:
    """pairs=self: the model's own samples of the known modes' training problems, graded; each
    completion the weak detector flags paired with an unflagged one of the same problem (one the
    grader passed, a correct answer; or under pair_contrast=failed one it failed), one to one.
    Cached in out/pairs by the request's hash; returns the pairs and a report (pairs, problems
    sampled, problems that gave none)."""
    known = [p for p in train if p.mode in cfg.basis_mode_list]
    request = {"model": model_id, "problems": sorted(p.id for p in known), "samples": cfg.self_samples,
               "max_new": cfg.max_new, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
               "contrast": cfg.pair_contrast, "modes": list(cfg.basis_mode_list), "version": __version__,
               "detector": [cfg.detector_recall, cfg.detector_fpr]}  # the flags pick the pairs
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    path = Path("out/pairs") / f"self-{key}.json"
    if path.exists():
        pairs, report = _cached_pairs(path, request)
        log.info("self pairs cache hit: %s", path)
    else:
        log.info("self pairs cache miss: sampling %d completions of each of %d problems", cfg.self_samples,
                 len(known))
        pairs, report = _sample_pairs(cfg, model, tok, wrappers, known, workers)
        write_atomically(path, json.dumps({"request": request, "report": report,
                                           "pairs": [dataclasses.asdict(p) for p in pairs]}, indent=1))
    if report["problems_without_a_pair"]:
        log.info("self pairs: %d of %d problems gave no pair: %s", len(report["problems_without_a_pair"]),
                 report["problems"], ", ".join(report["problems_without_a_pair"]))
    if len(pairs) < cfg.basis_k:
        raise ConfigError(f"--pairs=self: {len(pairs)} pairs from {report['problems']} problems "
                          f"({len(report['problems_without_a_pair'])} gave none) are fewer than basis_k="
                          f"{cfg.basis_k}; raise --self_samples or lower --basis_k")
    return pairs, report


def _cached_pairs(path: Path, request: dict) -> tuple[list, dict]:
    try:
        cached = json.loads(path.read_text())
        differ = [k for k in request if cached["request"].get(k) != request[k]]
        pairs = [ContrastPair(**{**p, "messages": tuple(p["messages"])}) for p in cached["pairs"]]
        report = cached["report"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--pairs=self: cannot read the cached pairs {path} ({e}); delete it") from None
    if differ:
        raise ConfigError(f"--pairs=self: the cached pairs {path} were sampled for a different request "
                          f"({', '.join(differ)} differ); delete it to sample them again")
    return pairs, report


def _sample_pairs(cfg: Config, model, tok, wrappers, known, workers) -> tuple[list, dict]:
    prompts = [encode_prompt(tok, p.messages()) for p in known]
    keys = [(cfg.seed, "self", p.id) for p in known]
    ids, _, texts, grades, _ = sample_graded(model, tok, wrappers, known, prompts, cfg.self_samples, cfg, keys,
                                             workers)
    pairs, empty = [], []
    for i, problem in enumerate(known):
        graded = [Rollout(problem, [], ids[j], texts[j], False, grades[j].reward, grades[j].passed,
                          grades[j].gt_correct, grades[j].exploited, key=(*keys[i], j))
                  for j in range(i * cfg.self_samples, (i + 1) * cfg.self_samples)]
        # The oracle is read only through the detector: on a known-mode problem an unflagged completion the
        # grader passed is a correct one when the detector is exact (the defaults), and one it failed is a
        # failure; a detector that misses lets some hacks in as "correct" ones, as a real monitor would.
        flagged = [detected(r, cfg) for r in graded]
        hacks = [r.text for r, f in zip(graded, flagged) if f]
        against = [r.text for r, f in zip(graded, flagged)
                   if not f and r.passed == (cfg.pair_contrast == "clean")]
        for j, (hack, other) in enumerate(zip(hacks, against)):
            pairs.append(ContrastPair(problem.id, problem.mode, problem.user_prompt(), tuple(problem.messages()),
                                      hack, other, against[(j + 1) % len(against)]))
        if not hacks or not against:
            empty.append(problem.id)
    return pairs, {"pairs": len(pairs), "problems": len(known), "problems_without_a_pair": empty}


# ----------------------------------------------------------------------------- V


def on_device(V: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {name: rows.to(device) for name, rows in V.items()}


def quarantine_basis(cfg: Config, basis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The capacity control's quarantine rows: random, of the hack basis's per-layer shapes, on its device."""
    if cfg.control != "capacity":
        return None
    return on_device(hack_basis.random_like(basis, cfg.seed), cfg.device)


def control_seed(cfg: Config, step: int) -> int:
    """The random and shuffled controls' seed for a V made at `step` (0: the run's start): a refresh
    draws new rows, as the real V it stands beside turns with every refresh."""
    return cfg.seed + 1_000_003 * step


def extract(cfg: Config, model, tok, wrappers, pairs, progress: bool = False, step: int = 0) -> HackBasis:
    return hack_basis.extract_basis(model, tok, wrappers, pairs, cfg.basis_k, cfg.basis_tau, cfg.loss_norm,
                                    cfg.max_new, cfg.control, control_seed(cfg, step), progress=progress)


def usable(cfg: Config, basis: HackBasis, notes: dict | None = None) -> dict[str, torch.Tensor]:
    """The rows the projection uses, on the model's device: k_use per layer, above the global noise floor,
    oriented by more than basis_min_margin; their margins go in `notes` (the summary reports the latest V's)."""
    kept = hack_basis.postprocess(basis, cfg.basis_k_use or None, cfg.drop_bottom_frac, cfg.basis_min_margin)
    if not kept.V:
        raise ConfigError(f"--basis_min_margin / --drop_bottom_frac / --basis_tau: no row of V is left "
                          f"({basis.n_pairs} pairs); an arm that trains with V would run as plain GRPO under its name")
    if notes is not None:
        notes["basis_margins"] = {"pairs": kept.n_pairs, "rows": kept.margins(),
                                  "of": "the real V's votes" if cfg.control == "none" else
                                  f"the real V's votes (the {cfg.control} control keeps them)"}
    return on_device(kept.V, cfg.device)


def basis_for(cfg: Config, model, tok, wrappers, pairs, model_id: str, notes: dict) -> dict[str, torch.Tensor]:
    """V from the cache (hit), or extracted and cached (miss), then cut to the usable rows, whose
    margins go in `notes`."""
    request = hack_basis.basis_request(model_id, pairs, cfg.basis_mode_list, cfg.basis_k, cfg.basis_tau,
                                       cfg.loss_norm, cfg.control, cfg.max_new, cfg.seed)
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    path = cfg.basis_path or f"out/bases/{key}.safetensors"
    basis = hack_basis.resolve_basis(path, request, lambda: extract(cfg, model, tok, wrappers, pairs, progress=True),
                                     reextract=cfg.reextract_basis)
    return usable(cfg, basis, notes)


def shared(world: World, device: str, make) -> dict[str, torch.Tensor]:
    """A basis made on rank 0 alone (make() returns it), sent to every rank, checked identical there,
    on `device`."""
    rows = on_device(distributed.from_main(world, lambda: on_device(make(), "cpu")), device)
    distributed.check_identical(world, rows, "the hack basis")
    return rows


def basis_overlap(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Mean over layers of ||V_old V_newᵀ||_F² / k_old: 1 = same span, ~k/r = unrelated.

    Over every layer either basis has: a layer one of them dropped (or gained) counts as 0, so a
    refresh that loses layers cannot read as a perfect overlap.
    """
    layers = set(old) | set(new)
    if not layers:
        return 0.0
    both = [n for n in layers if n in old and n in new]
    return sum(float((old[n] @ new[n].T).square().sum()) / old[n].shape[0] for n in both) / len(layers)


def live_columns(cfg: Config, rollouts: list) -> Columns | None:
    """pairs=live: the columns whose gradients are this step's differences (grpo.Columns), one per group
    holding both a flagged and an unflagged student rollout: +1/n_flagged on each flagged row and
    -1/n_unflagged on each unflagged one, so a column is the mean log-likelihood gradient of the flagged
    minus that of the unflagged. None when no group holds both.

    Flagged: the weak detector of the known modes, or (live_labels=oracle, the ceiling) the oracle's
    exploited label in every mode. Under the detector a group of a held-out mode is skipped before any
    label of it is read, so nothing of a held-out mode enters V. Groups are the contiguous
    cfg.group rollouts of one problem, as collect_rollouts lays them out."""
    of_row, weight, count = [None] * len(rollouts), [0.0] * len(rollouts), 0
    for start in range(0, len(rollouts), cfg.group):
        if cfg.live_labels == "detector" and rollouts[start].problem.mode not in cfg.basis_mode_list:
            continue
        students = [i for i in range(start, min(start + cfg.group, len(rollouts))) if not rollouts[i].teacher]
        flags = {i: (detected(rollouts[i], cfg) if cfg.live_labels == "detector"
                     else rollouts[i].exploited) for i in students}
        flagged, unflagged = [i for i in students if flags[i]], [i for i in students if not flags[i]]
        if flagged and unflagged:
            for rows, w in ((flagged, 1 / len(flagged)), (unflagged, -1 / len(unflagged))):
                for i in rows:
                    of_row[i], weight[i] = count, w
            count += 1
    return Columns(tuple(of_row), tuple(weight), count) if count else None


def live_basis(cfg: Config, live: list[tuple[int, dict]]) -> HackBasis | None:
    """V from the buffered differences (hack_basis.basis_from_differences: each difference a row of D,
    oriented by its vote), or a random basis of its shape for the random control; None while the
    buffer is empty."""
    rows = [d for _, differences in live for d in differences]
    if not rows:
        return None
    real = hack_basis.basis_from_differences({n: torch.stack([d[n] for d in rows]) for n in rows[0]},
                                             cfg.basis_k, cfg.basis_tau)
    if cfg.control == "random":
        return dataclasses.replace(real, V=hack_basis.random_like(real.V, control_seed(cfg, live[-1][0])))
    return real


# ----------------------------------------------------------------------------- a run's V


@dataclasses.dataclass
class Basis:
    """A run's V and everything that changes with it or outlives it."""
    cfg: Config  # the run's, for this rank's device
    world: World
    pairs: list  # V's (hack, clean) pairs, re-extracted from on every refresh (pairs=live: none)
    V: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the usable rows per layer; {}: no V yet
    quarantine: dict[str, torch.Tensor] | None = None  # the capacity control's random rows for delta_s_hack
    grad_mean: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the smoothed gate's memory, ḡ:
    # each layer's running mean of the raw knob gradient, in knob space, so no new V changes it
    live: list[tuple[int, list[dict]]] = dataclasses.field(default_factory=list)  # pairs=live: (step, per-group
    # differences of flagged and unflagged log-likelihood gradients), the last live_window steps'
    notes: dict = dataclasses.field(default_factory=dict)  # what the summary reports of V's making

    def set(self, V: dict[str, torch.Tensor]) -> None:
        """A new V, and the capacity control's rows drawn for its shapes. The gate's memory stays as it is:
        its trend is V ḡ for whatever V is current."""
        self.V = on_device(V, self.cfg.device)
        self.quarantine = quarantine_basis(self.cfg, self.V)

    def start(self, model, tok, wrappers, model_id: str) -> None:
        """V at the run's start: cached or extracted from the pairs (on rank 0, sent to every rank); none
        for pairs=live, whose first V comes at the first refresh."""
        cfg = self.cfg
        if cfg.pairs == "live":
            log.info("pairs=live: no V before the first refresh (step %d); until then the projection has no rows "
                     "and the run is plain GRPO, its cin figures 0", cfg.refresh_every)
            return
        self.set(shared(self.world, cfg.device,
                        lambda: basis_for(cfg, model, tok, wrappers, self.pairs, model_id, self.notes)))

    def reads(self, step: int) -> bool:
        """pairs=live: whether a refresh will build V from this step's differences (one is due within
        live_window steps from it), so the step must compute them."""
        cfg = self.cfg
        if cfg.pairs != "live" or not cfg.refresh_every:
            return False
        after = -(-step // cfg.refresh_every) * cfg.refresh_every  # the first refresh at or after this step
        return after < cfg.steps and after - step < cfg.live_window

    def observe(self, step: int, differences: dict[str, torch.Tensor] | None) -> None:
        """pairs=live, on a step it `reads`: this step's group differences (per layer, one row a group;
        None: no group gave one), every rank's, so every rank rebuilds the same V, into the buffer, which
        keeps the last live_window steps'."""
        rows = [] if differences is None else \
            [dict(zip(differences, group)) for group in zip(*(d.cpu() for d in differences.values()))]
        rows = [d for share in distributed.all_gather(self.world, rows) for d in share]
        self.live = [(s, d) for s, d in self.live if s > step - self.cfg.live_window] + [(step, rows)]

    def due(self, step: int) -> bool:
        """A refresh after this step: every refresh_every steps, never after the last."""
        return bool(self.cfg.refresh_every) and step % self.cfg.refresh_every == 0 and step < self.cfg.steps

    def refresh(self, step: int, model, tok, wrappers) -> float | None:
        """V re-extracted (on rank 0, then sent to every rank) on the current model with the quarantine
        ablated, or (pairs=live) rebuilt from the buffered live differences, and set; returns its overlap
        with the V it replaces (None when there was none, or no live difference yet)."""
        cfg = self.cfg
        if cfg.pairs == "live":
            basis = live_basis(cfg, self.live)
            if basis is None:
                log.info("step %d: no group of the last %d steps held a flagged and an unflagged rollout: V "
                         "unchanged", step, cfg.live_window)
                return None
            fresh = shared(self.world, cfg.device, lambda: usable(cfg, basis, self.notes))
        else:
            def make():
                with adapter.ablate_quarantine(wrappers):
                    return usable(cfg, extract(cfg, model, tok, wrappers, self.pairs, step=step), self.notes)
            fresh = shared(self.world, cfg.device, make)
        overlap = basis_overlap(self.V, fresh) if self.V else None
        if overlap is not None and overlap < LOW_OVERLAP and self.world.main:
            warnings.warn(f"step {step}: basis refresh overlap {overlap:.2f} < {LOW_OVERLAP}: the refresh rotated "
                          f"the basis away from the previous one", stacklevel=1)
        self.set(fresh)
        return overlap

    def state(self) -> dict:
        """A copy of what a checkpoint keeps of it."""
        return {"basis": {n: v.cpu() for n, v in self.V.items()},
                "grad_mean": {n: t.detach().cpu().clone() for n, t in self.grad_mean.items()},
                "live": list(self.live), "notes": copy.deepcopy(self.notes)}

    def restore(self, state: dict) -> None:
        """Back to a checkpoint's `state()`."""
        self.set(state["basis"])
        self.grad_mean = on_device(state["grad_mean"], self.cfg.device)
        self.live = state["live"]
        self.notes.update(state["notes"])
