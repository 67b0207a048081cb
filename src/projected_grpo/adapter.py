"""The SVD adapter: every trainable knob lives in the singular-value basis of a frozen Linear.

For a frozen weight W = U diag(S) Vh (thin SVD, fp32, cached on disk by a hash of W):

    y = W x + U diag(delta_s + delta_s_hack) Vh x

`delta_s` is the main knob and `delta_s_hack` the quarantine; both start at zero, so
the wrapped model is bit-identical to the base model until they move. Two facts keep
it cheap (docs/method.md, "The SVD adapter"):

- generation needs no gradient, so `merged()` folds the knobs into a merged weight
  once and decodes at base-model speed; W itself is never modified;
- dL/d delta_s = sum over tokens of (Vh x) * (Uᵀ dL/dy), so a custom autograd
  function can keep it per sequence (`per_sample_grads()`), giving per-rollout
  gradients from one backward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import write_atomically

# Attention and MLP projections of Qwen-family models, plus the GatedDeltaNet
# projections of the hybrid (Qwen3-Next style) architectures where present.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "in_proj_qkvz", "in_proj_ba", "out_proj")
_SVD_CACHE_FORMAT = 2  # bump when what the cache stores changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROJECTED_GRPO_CACHE", "out/cache"))


def _knob_grad(layer: AdapterLayer, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/ds = sum over tokens of (Vh x) * (Uᵀ dy), kept per sequence (in fp32) when capturing."""
    per_token = a.float() * b.float()
    per_sequence = per_token.reshape(per_token.shape[0], -1, per_token.shape[-1]).sum(1)
    if layer.capture_grad_sample:
        layer._grad_samples.append(per_sequence)
    return per_sequence.sum(0).to(dtype)


class _SVDDelta(torch.autograd.Function):
    """delta = ((x Vhᵀ) * s) Uᵀ, added to W x by the caller: the path when no merged weight is held."""

    @staticmethod
    def forward(ctx, x, s, U, Vh, layer):
        a = x @ Vh.T  # (..., r): x in the singular basis
        ctx.save_for_backward(a, s, U, Vh)
        ctx.layer = layer
        return (a * s.to(a.dtype)) @ U.T

    @staticmethod
    def backward(ctx, dy):
        a, s, U, Vh = ctx.saved_tensors
        b = dy @ U  # (..., r): the output gradient in the singular basis
        grad_x = (b * s.to(b.dtype)) @ Vh if ctx.needs_input_grad[0] else None
        return grad_x, _knob_grad(ctx.layer, a, b, s.dtype), None, None, None


class _MergedKnobLinear(torch.autograd.Function):
    """y = W' x with W' = W + U diag(s) Vh held by `merged()`: four matmuls per layer for
    forward + backward (W' x, Vh x; W'ᵀ dy, Uᵀ dy) instead of six, the floor for a knob gradient."""

    @staticmethod
    def forward(ctx, x, s, weight, bias, U, Vh, layer):
        ctx.save_for_backward(x @ Vh.T, weight, U)
        ctx.layer, ctx.s_dtype = layer, s.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        a, weight, U = ctx.saved_tensors
        grad_x = dy @ weight if ctx.needs_input_grad[0] else None
        return grad_x, _knob_grad(ctx.layer, a, dy @ U, ctx.s_dtype), None, None, None, None, None


class AdapterLayer(nn.Module):
    """A frozen Linear plus its two singular-value knobs."""

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
        super().__init__()
        self.base = base
        self.r = S.shape[0]
        # U and Vh in the weight's dtype: at bf16 they cost the same as W, in fp32 twice.
        self.register_buffer("U", U.to(base.weight.dtype), persistent=False)
        self.register_buffer("Vh", Vh.to(base.weight.dtype), persistent=False)
        self.register_buffer("S", S.float(), persistent=False)
        device = base.weight.device
        self.delta_s = nn.Parameter(torch.zeros(self.r, device=device))  # fp32: small updates must not round away
        self.delta_s_hack = nn.Parameter(torch.zeros(self.r, device=device))
        self.capture_grad_sample = False
        self._grad_samples: list[torch.Tensor] = []
        self._merged_weight: torch.Tensor | None = None

    @property
    def grad_sample(self) -> torch.Tensor | None:
        """Per-sequence knob gradients (n_sequences x r) captured under `per_sample_grads`."""
        return torch.cat(self._grad_samples) if self._grad_samples else None

    def knobs(self) -> torch.Tensor:
        return self.delta_s + self.delta_s_hack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_weight is not None:
            if torch.is_grad_enabled():
                return _MergedKnobLinear.apply(x, self.knobs(), self._merged_weight, self.base.bias, self.U,
                                               self.Vh, self)
            # Decoding: nothing but the merged matmul, so a step costs what the base model's does.
            return nn.functional.linear(x, self._merged_weight, self.base.bias)
        s = self.knobs()
        y = self.base(x)
        if not s.requires_grad and not torch.any(s):
            return y  # zero knobs and nothing to differentiate: exactly the base layer
        return y + _SVDDelta.apply(x, s, self.U, self.Vh, self)

    def merged_weight_held(self) -> torch.Tensor:
        """The merged weight `merged()` holds: what decoding multiplies by."""
        if self._merged_weight is None:
            raise RuntimeError("an adapter layer samples only under adapter.merged(), which folds its knobs into W'")
        return self._merged_weight

    def merged_weight(self) -> torch.Tensor:
        """W + U diag(s) Vh, computed in fp32 and cast once to W's dtype."""
        with torch.no_grad():
            delta = (self.U.float() * self.knobs().float()) @ self.Vh.float()
            return (self.base.weight.float() + delta).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"


# ----------------------------------------------------------------------------- SVD cache


def weight_hash(weight: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(weight.shape)}|{weight.dtype}|{_SVD_CACHE_FORMAT}".encode())
    w = weight.detach().contiguous().cpu()
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def thin_svd(weight: torch.Tensor, cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of W: computed in fp32, thin (never full_matrices=True), cached by W's hash.
    U and Vh come back in W's dtype (what the layer uses; halves the cache for bf16), S in fp32."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "svd" / f"{weight_hash(weight)}.safetensors"
        if path.exists():
            try:
                t = load_file(path)
                U, S, Vh = t["U"], t["S"], t["Vh"]
                r = min(weight.shape)
                if U.shape == (weight.shape[0], r) and S.shape == (r,) and Vh.shape == (r, weight.shape[1]):
                    return U, S, Vh
                raise ValueError(f"shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}")
            except (SafetensorError, KeyError, ValueError, OSError) as e:
                warnings.warn(f"SVD cache file {path} is corrupt ({e}); recomputing it", stacklevel=2)
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    U, Vh = U.to(weight.dtype), Vh.to(weight.dtype)
    if path is not None:
        save_tensors({"U": U, "S": S, "Vh": Vh}, path)
    return U, S, Vh


# ----------------------------------------------------------------------------- wrapping


def targeted(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The Linears `wrap` would wrap, by module name, in model order."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def wrap(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS,
         cache_dir: Path | str | None = "default") -> dict[str, AdapterLayer]:
    """Replace every targeted nn.Linear with an AdapterLayer; freeze everything else.

    Returns {module name: AdapterLayer} in model order. `cache_dir=None` disables
    the SVD cache ("default": $PROJECTED_GRPO_CACHE or out/cache).
    """
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    found = list(targeted(model, targets).items())
    if not found:
        raise ValueError(f"no nn.Linear named any of {targets} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = {}
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        U, S, Vh = thin_svd(linear.weight, cache)
        layer = AdapterLayer(linear, U.to(linear.weight.device), S.to(linear.weight.device),
                             Vh.to(linear.weight.device))
        setattr(parent, child, layer)
        wrappers[name] = layer
    return wrappers


# ----------------------------------------------------------------------------- contexts


@contextlib.contextmanager
def per_sample_grads(wrappers: dict[str, AdapterLayer]):
    """Within the block, each backward also stores per-sequence knob gradients.

    After `loss.backward()`, `layer.grad_sample` is (n_sequences, r) for every
    layer: sequences in batch order, one block per forward call the backward went through. Their
    sum over sequences equals delta_s.grad's contribution from those calls.
    """
    for layer in wrappers.values():
        layer._grad_samples = []
        layer.capture_grad_sample = True
    try:
        yield wrappers
    finally:
        for layer in wrappers.values():
            layer.capture_grad_sample = False


def clear_grad_samples(wrappers: dict[str, AdapterLayer]) -> None:
    for layer in wrappers.values():
        layer._grad_samples = []


@contextlib.contextmanager
def merged(wrappers: dict[str, AdapterLayer]):
    """Fold the knobs into merged weights W' = W + U diag(s) Vh for the block.

    Generation then runs at base-model speed, and a scoring pass with gradients
    costs four matmuls per layer instead of six (`_MergedKnobLinear`). The knobs
    must not change inside the block. W itself is never written: each layer uses a
    separate merged tensor until the block ends (even by an exception), so W is
    restored exactly by construction. Layers whose knobs are zero use W itself.
    """
    try:
        for layer in wrappers.values():
            knobs_set = torch.any(layer.knobs().detach())
            layer._merged_weight = layer.merged_weight() if knobs_set else layer.base.weight.detach()
        yield wrappers
    finally:
        for layer in wrappers.values():
            layer._merged_weight = None


def scoring(wrappers: dict[str, AdapterLayer]):
    """The context for a scoring pass with gradients: merged weights in fp32 (four matmuls
    per layer instead of six). In bf16/fp16 the unmerged path: W sits on the bf16 grid, so
    bf16(W + U diag(s) Vh) rounds a small knob change away (on a 2560 x 2560 bf16 weight a
    1e-3 knob change loses ~80% of itself), and the gradient must see the knobs exactly."""
    fp32 = all(layer.base.weight.dtype == torch.float32 for layer in wrappers.values())
    return merged(wrappers) if fp32 else contextlib.nullcontext(wrappers)


@contextlib.contextmanager
def _knobs_set_to_zero(wrappers: dict[str, AdapterLayer], names: tuple[str, ...]):
    saved = {(n, k): getattr(layer, k).detach().clone() for n, layer in wrappers.items() for k in names}
    # A merged weight holds the old knobs: set it aside so the layers compute from the zeroed ones.
    merged_weights = {n: layer._merged_weight for n, layer in wrappers.items()}
    try:
        with torch.no_grad():
            for layer in wrappers.values():
                layer._merged_weight = None
                for k in names:
                    getattr(layer, k).zero_()
        yield wrappers
    finally:
        with torch.no_grad():
            for (n, k), value in saved.items():
                getattr(wrappers[n], k).copy_(value)
            for n, weight in merged_weights.items():
                wrappers[n]._merged_weight = weight


def zeroed(wrappers: dict[str, AdapterLayer]):
    """Both knobs at zero inside the block: the free reference model (the base model)."""
    return _knobs_set_to_zero(wrappers, ("delta_s", "delta_s_hack"))


def ablate_quarantine(wrappers: dict[str, AdapterLayer]):
    """delta_s_hack at zero inside the block: the model as deployed."""
    return _knobs_set_to_zero(wrappers, ("delta_s_hack",))


# ----------------------------------------------------------------------------- knob state


def knob_state(wrappers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": getattr(layer, k).detach().cpu().clone()
            for name, layer in wrappers.items() for k in ("delta_s", "delta_s_hack")}


def load_knobs(wrappers: dict[str, AdapterLayer], path: str | Path) -> None:
    """Load a saved knob_state (save_tensors); any missing, extra or misshapen key is an error."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read knob file {path}: {e}") from None
    expected = knob_state(wrappers)
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"knob file {path} does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"knob file {path}: {key} has shape {tuple(value.shape)}, "
                             f"the model needs {tuple(expected[key].shape)}")
    with torch.no_grad():
        for name, layer in wrappers.items():
            for k in ("delta_s", "delta_s_hack"):
                getattr(layer, k).copy_(state[f"{name}.{k}"])
