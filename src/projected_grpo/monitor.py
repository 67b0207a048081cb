"""The probe monitor (`--monitor=probe`): a linear probe on the student's hidden states, trained online
from the weak detector's flags, which screen, penalty and advmod then read in the detector's place.

A rollout's features are its completion's hidden states at one layer, averaged over its tokens
(`model.PromptFirst(features_at=...)`, under the current knobs, no gradient). The probe is a
logistic regression on them, standardised, refitted every refresh_every steps (the live V's
schedule) from the known-mode student rollouts of the last live_window steps and their detector
flags; a held-out mode's rollouts never enter its fit. Before its first fit it scores nothing, and
the arms reading it flag nothing. docs/method.md, "The probe monitor".
"""

from __future__ import annotations

import dataclasses

import torch

from . import adapter, distributed
from .config import Config
from .distributed import World
from .grpo import Rollout, auroc, detected
from .scoring import PromptFirst

L2 = 1e-2  # the fit's ridge on the standardised weights: a few hundred rollouts against a hidden size of 64+


def probe_layer(model) -> int:
    """The middle layer: concept directions (Wu & Tang's shortcut direction, representation engineering's)
    are read from the middle of the network, where the last layers have not yet turned them into the next
    token's logits."""
    return model.config.num_hidden_layers // 2


def completion_features(model, tokenizer, wrappers, rollouts: list[Rollout], cfg: Config) -> torch.Tensor:
    """Each rollout's completion's hidden states at `probe_layer`, averaged over its tokens (rows x
    hidden, fp32, on the CPU), a micro-batch at a time, each prompt run once; the step asks for its
    students only (teacher rows are never scored)."""
    size, layer, out = cfg.micro_batch or len(rollouts), probe_layer(model), []
    with torch.no_grad(), adapter.merged(wrappers):
        for start in range(0, len(rollouts), size):
            part = rollouts[start:start + size]
            scored = PromptFirst(model, [r.prompt_ids for r in part], [r.completion_ids for r in part],
                                 tokenizer.pad_token_id, features_at=layer)
            out.append(scored.features.cpu())
    return torch.cat(out)


def fit(features: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """A logistic regression (ridge L2) of labels on standardised features: its weights, bias and the
    standardisation; None without both classes."""
    if labels.all() or not labels.any():
        return None
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    z = (features - mean) / std
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels.float()) + L2 * w.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return {"w": w.detach(), "b": b.detach(), "mean": mean, "std": std}


def probe_aurocs(records, known_modes: tuple[str, ...]) -> dict:
    """The probe's AUROC against `exploited` on the known modes' rollouts and on the held-out modes' (does it
    transfer?), from (mode, probe score, exploited) of scored student rollouts; logging only, the one place
    the probe's outcome meets the labels."""
    out = {}
    for name, known in (("known", True), ("heldout", False)):
        rows = [(score, exploited) for mode, score, exploited in records if (mode in known_modes) == known]
        out[f"probe_auroc_{name}"] = auroc([s for s, _ in rows], [e for _, e in rows])
    return out


@dataclasses.dataclass
class Probe:
    """The run's probe: its buffer of (features, flag) of known-mode students and its latest fit."""
    cfg: Config
    world: World
    weights: dict | None = None  # fit()'s output; None: not fitted yet (or the window held one class only)
    buffer: list[tuple[int, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)  # (step,
    # features, detector flags) of the last live_window steps, every rank's

    def score(self, features: torch.Tensor) -> list[float | None]:
        """P(hack) for each row of features; None for all before a fit."""
        if self.weights is None:
            return [None] * len(features)
        w = self.weights
        return torch.sigmoid(((features - w["mean"]) / w["std"]) @ w["w"] + w["b"]).tolist()

    def observe(self, step: int, students: list[Rollout], features: torch.Tensor) -> None:
        """This step's known-mode students (`features`: theirs, row for row) and their detector flags into the
        buffer (every rank's); a held-out mode's rollouts are left out before anything of them is read."""
        known = [i for i, r in enumerate(students) if r.problem.mode in self.cfg.basis_mode_list]
        flags = torch.tensor([detected(students[i], self.cfg) for i in known], dtype=torch.bool)
        shares = distributed.all_gather(self.world, (features[known], flags))
        rows = torch.cat([f for f, _ in shares]), torch.cat([g for _, g in shares])
        self.buffer = [b for b in self.buffer if b[0] > step - self.cfg.live_window] + [(step, *rows)]

    def refit(self) -> None:
        """Fit on the buffer; with one class only in it, the previous fit stays."""
        if not self.buffer:
            return
        fitted = fit(torch.cat([f for _, f, _ in self.buffer]), torch.cat([g for _, _, g in self.buffer]))
        self.weights = fitted or self.weights

    def state(self) -> dict:
        return {"weights": self.weights, "buffer": list(self.buffer)}

    def restore(self, state: dict) -> None:
        self.weights, self.buffer = state["weights"], state["buffer"]
