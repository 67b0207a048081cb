"""The hack basis V: per layer, the knob-gradient directions that push toward hacking.

For each (prompt, hack, clean) pair we take the knob gradient of the completion loss
for the hack and for the clean completion (one batched backward with per-sequence
gradients). With GRPO advantages +1 for the hack and -1 for the clean completion the
GRPO loss gradient on the pair is their difference, so per layer

    D = G_hack - G_clean          (n_pairs x r)
    D = P diag(S) Q               (SVD)
    V = top-k rows of Q, each oriented so most pairs have D_i . v > 0

Every completion is scored to its end, never cut at max_new: a cut would silently drop the
end of a labelled text. The basis metadata records the texts' lengths, and a text that
cannot be scored whole is an error naming its pair.

A live gradient g with V g > 0 is hack-ward (projection.py). Controls of the same
shape tell hack removal apart from generic regularisation: `random` (random
orthonormal rows), `shuffled` (each real row's coordinates permuted, then
re-orthonormalised: the real rows' values with their alignment destroyed),
`nonhack` (differences between two clean completions of one prompt).

D is moved to the CPU before its SVD: it is small (pairs x r), the float64 SVD is
exact and device-independent there, and the run puts the usable V on the model's
device in one place (basis.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from . import __version__, adapter
from .config import CONTROLS, LOSS_NORMS, MODES, InputError
from .model import encode_completion, encode_prompt, load_model_and_tokenizer
from .scoring import pad_batch, token_logprobs
from .templates import ContrastPair, default_pairs

log = logging.getLogger(__name__)

REEXTRACT_HINT = "hack_basis CLI: --reextract; train: --reextract_basis=true"


class BasisCacheMismatch(InputError):
    """A cached basis was extracted for a different request."""


class BasisFileError(InputError):
    """A basis file that cannot be read (truncated, not safetensors, not a basis)."""


class TextTooLong(InputError):
    """A completion that cannot be scored to its end: with its prompt it exceeds the model's context."""


@dataclasses.dataclass
class HackBasis:
    V: dict[str, torch.Tensor]  # layer -> (k_l, r) orthonormal rows, oriented hack-ward
    S: dict[str, torch.Tensor]  # layer -> (k_l,) singular values of D for the kept rows
    spectrum: dict[str, torch.Tensor]  # layer -> every singular value of D (diagnostic)
    votes: dict[str, torch.Tensor]  # layer -> (k_l,) pairs with D_i . v > 0 (after orientation)
    n_pairs: int
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def rows(self) -> dict[str, int]:
        return {name: v.shape[0] for name, v in self.V.items()}

    def margins(self) -> dict[str, list[tuple[int, int]]]:
        """Per layer, each row's orientation vote: (pairs for hack-ward, pairs against)."""
        return {name: [(int(v), self.n_pairs - int(v)) for v in votes.tolist()] for name, votes in self.votes.items()}

    def summary(self) -> str:
        lines = [f"{len(self.V)} layers, {sum(self.rows().values())} rows from {self.n_pairs} pairs; votes per row "
                 f"for:against (|for - against| in sds of a fair coin's)"]
        margins = self.margins()
        for name, v in self.V.items():
            spec = self.spectrum[name]
            ratio = ", ".join(f"{x:.2f}" for x in (spec / spec[0].clamp_min(1e-30))[:6].tolist())
            sds = margin_sds(self.votes[name], self.n_pairs).tolist()
            votes = " ".join(f"{a}:{b} ({z:.1f})" for (a, b), z in zip(margins[name], sds))
            lines.append(f"  {name}: k={v.shape[0]} S/S0=[{ratio}] votes {votes}")
        return "\n".join(lines)


def margin_sds(votes: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """|for - against| of each row's vote in standard deviations of a fair coin's: the sign test's
    normal approximation (under chance, for - against has mean 0 and sd sqrt(n_pairs))."""
    return (2 * votes.double() - n_pairs).abs() / math.sqrt(n_pairs)


# ----------------------------------------------------------------------------- gradients


def completion_grads(model, tokenizer, wrappers, messages: list, completions: list[str], max_new: int,
                     loss_norm: str = "fixed", batch_size: int = 8, progress: bool = False,
                     names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-completion knob gradients of the completion loss: layer -> (n, r), fp32.

    Each completion is scored to its end (EOS included), however long: max_new only
    normalises. loss_i = -sum_t log p(token_t) / max_new ("fixed", the live GRPO
    normalisation, so long completions are not down-weighted; a text of n > max_new tokens
    then weighs n / max_new of a full-length rollout) or / n_tokens_i ("mean"). One
    backward per micro-batch; per-sequence gradients come from the adapter's autograd path.
    A completion that does not fit the model's context with its prompt is a TextTooLong
    naming it (names[i], else its index).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    device = next(model.parameters()).device

    def label(i: int) -> str:
        return names[i] if names else f"completion {i}"

    prompts = [encode_prompt(tokenizer, m) for m in messages]
    outs = [encode_completion(tokenizer, c, None) for c in completions]
    context = model.config.get_text_config().max_position_embeddings
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if len(prompt) + len(out) > context:
            raise TextTooLong(f"{label(i)}: prompt and completion are {len(prompt)} + {len(out)} tokens, over the "
                              f"model's context of {context}; a text is scored to its end, never cut: shorten it, "
                              f"leave it out or use a model with a longer context")
    # Similar lengths share a micro-batch, so little of each batch is padding.
    order = sorted(range(len(outs)), key=lambda i: len(prompts[i]) + len(outs[i]))
    adapter.clear_grad_samples(wrappers)
    with adapter.scoring(wrappers), adapter.per_sample_grads(wrappers):
        for start in tqdm(range(0, len(order), batch_size), desc="pair gradients", disable=not progress,
                          leave=False):
            batch = order[start:start + batch_size]
            ids, attn, comp = pad_batch([prompts[i] for i in batch], [outs[i] for i in batch],
                                        tokenizer.pad_token_id, device)
            logp = token_logprobs(model, ids, attn, comp)
            denom = comp.sum(1).float() if loss_norm == "mean" else torch.full((len(batch),), float(max_new))
            losses = -logp.sum(1) / denom.to(device)
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            if bad:
                j = min(bad, key=lambda j: batch[j])
                i = batch[j]
                raise FloatingPointError(f"non-finite completion loss ({losses[j].item()}) for {label(i)}")
            losses.sum().backward()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    grads = {name: layer.grad_sample[inverse.to(layer.grad_sample.device)] for name, layer in wrappers.items()}
    adapter.clear_grad_samples(wrappers)
    for layer in wrappers.values():
        layer.delta_s.grad = None
        layer.delta_s_hack.grad = None
    return grads


def _pair_differences(model, tokenizer, wrappers, pairs, first, second, max_new, loss_norm, batch_size,
                      progress) -> dict[str, torch.Tensor]:
    """D per layer (n_pairs x r): G(first completion) - G(second completion) of each pair."""
    texts = [t for pair in zip(first, second) for t in pair]  # interleaved: pair i -> rows 2i, 2i+1
    messages = [p.messages for p in pairs for _ in range(2)]
    grads = completion_grads(model, tokenizer, wrappers, messages, texts, max_new, loss_norm, batch_size,
                             progress, names=[f"pair {i} ({p.problem_id}, {p.mode})" for i, p in enumerate(pairs)
                                              for _ in range(2)])
    return {name: (g[0::2] - g[1::2]).cpu() for name, g in grads.items()}


def _length_meta(tokenizer, sides: dict[str, list[str]], max_new: int) -> dict[str, str]:
    """Basis metadata: per side (hack, clean, ...) the scored lengths of its texts in tokens, EOS included:
    min / mean / max, and how many exceed max_new (no live rollout could be that long)."""
    meta = {}
    for side, texts in sides.items():
        n = [len(encode_completion(tokenizer, text, None)) for text in texts]
        meta[f"tokens_{side}"] = json.dumps({"min": min(n), "mean": round(sum(n) / len(n), 1), "max": max(n),
                                             "over_max_new": sum(x > max_new for x in n)})
    return meta


def basis_from_differences(D: dict[str, torch.Tensor], k: int, tau: float) -> HackBasis:
    """V from difference vectors (layer -> n x r, each row a hack-ward minus a clean gradient):
    per layer the top-k right singular vectors of D, less those with S_i / S_0 < tau, each
    oriented the way most rows of D point (`votes` counts them)."""
    V, S, spectrum, votes = {}, {}, {}, {}
    n_pairs = next(iter(D.values())).shape[0]
    for name, d in D.items():
        d = d.double()
        _, s, q = torch.linalg.svd(d, full_matrices=False)
        keep = min(k, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0)
        if tau > 0:
            keep = min(keep, int((s / s[0] >= tau).sum()))  # weak axes: S_i / S_0 < tau
        spectrum[name] = s.float()
        if not keep:
            continue
        rows = q[:keep].clone()
        hackward = ((d @ rows.T) > 0).sum(0)
        rows[hackward * 2 < n_pairs] *= -1  # orient each row the way most pairs point
        V[name] = rows.float().contiguous()
        S[name] = s[:keep].float()
        votes[name] = ((d @ rows.T) > 0).sum(0)
    return HackBasis(V=V, S=S, spectrum=spectrum, votes=votes, n_pairs=n_pairs)


def _like(control: HackBasis, real: HackBasis) -> HackBasis:
    """Cut a control to the real basis's per-layer rows and give it the real S values and votes,
    so that postprocess() keeps exactly the same rows of both."""
    V = {}
    for name, rows in real.rows().items():
        have = control.V.get(name, torch.zeros(0, 1)).shape[0]
        if have < rows:
            raise ValueError(f"control basis has {have} rows in {name}, the real basis {rows}")
        V[name] = control.V[name][:rows]
    return dataclasses.replace(real, V=V, spectrum=control.spectrum)


def extract_basis(model, tokenizer, wrappers, pairs: list[ContrastPair], k: int, tau: float = 0.0,
                  loss_norm: str = "fixed", max_new: int = 256, control: str = "none", seed: int = 0,
                  batch_size: int = 8, progress: bool = False) -> HackBasis:
    """V from labelled pairs at the model's current knob values (see the module docstring).

    A control has the real basis's per-layer row counts, singular values and votes, so the
    same postprocess() keeps the same rows of each. The metadata holds the texts' lengths
    (`_length_meta`).
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if not pairs:
        raise ValueError("extract_basis needs at least one pair")
    if k < 1 or not 0 <= tau <= 1:
        raise ValueError(f"need k >= 1 and 0 <= tau <= 1, got k={k}, tau={tau}")
    args = (max_new, loss_norm, batch_size, progress)
    sides = {"hack": [p.hack for p in pairs], "clean": [p.clean for p in pairs]}
    D = _pair_differences(model, tokenizer, wrappers, pairs, sides["hack"], sides["clean"], *args)
    real = basis_from_differences(D, k, tau)
    if control in ("none", "capacity"):
        basis = real  # capacity: the main knob is erased along the real V, the quarantine fed along random_like(V)
    elif control == "nonhack":
        sides["clean_alt"] = [p.clean_alt for p in pairs]
        D_clean = _pair_differences(model, tokenizer, wrappers, pairs, sides["clean"], sides["clean_alt"], *args)
        basis = _like(basis_from_differences(D_clean, k, 0.0), real)
    else:
        basis = dataclasses.replace(real, V=random_like(real.V, seed) if control == "random"
                                    else _shuffled_like(real.V, seed))
    return dataclasses.replace(basis, meta=_length_meta(tokenizer, sides, max_new))


def _orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(raw.double().T)  # the projection assumes orthonormal rows
    return q.T.float().contiguous()


def random_like(V: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random orthonormal rows (seeded, on the CPU) of V's per-layer shapes: the random control,
    and the quarantine's basis under the capacity control."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _orthonormal_rows(torch.randn(*rows.shape, generator=generator, dtype=torch.float64))
            for name, rows in V.items()}


def _shuffled_like(V: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each row's own coordinates, each row permuted on its own, re-orthonormalised: the same values
    (and so the same sparsity and spread), none of the alignment with the pairs. Not a sign flip of
    D's rows: that leaves D's right singular vectors, and so span(V), unchanged."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, rows in V.items():
        columns = torch.stack([torch.randperm(rows.shape[1], generator=generator) for _ in range(rows.shape[0])])
        out[name] = _orthonormal_rows(rows.cpu().double().gather(1, columns))
    return out


def trusted_basis(model, tokenizer, wrappers, messages: list, completions: list[str], k: int, max_new: int,
                  loss_norm: str = "fixed", batch_size: int = 8,
                  progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trusted subspace of the trusted-direction baseline, in knob space: per layer, T = the
    top-k right singular vectors of the clean completions' knob gradients (n x r) and their
    weights w = S_i / S_0, so the strongest clean direction passes whole (projection.keep_trusted)."""
    grads = completion_grads(model, tokenizer, wrappers, messages, completions, max_new, loss_norm, batch_size,
                             progress)
    T, w = {}, {}
    for name, G in grads.items():
        _, s, q = torch.linalg.svd(G.cpu().double(), full_matrices=False)
        keep = min(k, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0)
        if keep:
            T[name], w[name] = q[:keep].float().contiguous(), (s[:keep] / s[0]).float()
    return T, w


def postprocess(basis: HackBasis, k_use: int | None = None, drop_bottom_frac: float = 0.0,
                min_margin: float = 0.0) -> HackBasis:
    """Of the first k_use rows per layer, keep those that pass both filters, each judged on
    those rows alone (so neither changes what the other keeps):
    - the global noise floor: pool their singular values across layers and drop rows below
      the drop_bottom_frac quantile;
    - the sign test: drop rows whose orientation vote is within chance,
      margin_sds(votes) < min_margin (0 keeps every row).
    Layers left with no row are dropped (projection skips them)."""
    if not 0 <= drop_bottom_frac < 1:
        raise ValueError(f"drop_bottom_frac must be in [0, 1), got {drop_bottom_frac}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    cut = {n: (k_use if k_use is not None else v.shape[0]) for n, v in basis.V.items()}
    floor = -1.0
    if drop_bottom_frac > 0:
        pooled = torch.cat([basis.S[n][:cut[n]] for n in basis.V])
        floor = torch.quantile(pooled.double(), drop_bottom_frac).item()
    out = HackBasis(V={}, S={}, spectrum=basis.spectrum, votes={}, n_pairs=basis.n_pairs, meta=dict(basis.meta))
    for name, v in basis.V.items():
        keep = (basis.S[name][:cut[name]] >= floor) & (margin_sds(basis.votes[name][:cut[name]],
                                                                  basis.n_pairs) >= min_margin)
        if keep.any():
            out.V[name] = v[:cut[name]][keep].contiguous()
            out.S[name] = basis.S[name][:cut[name]][keep]
            out.votes[name] = basis.votes[name][:cut[name]][keep]
    return out


# ----------------------------------------------------------------------------- cache


def pair_set_hash(pairs: list[ContrastPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.problem_id, p.mode, list(p.messages), p.hack, p.clean, p.clean_alt]).encode())
    return h.hexdigest()[:16]


def save_basis(basis: HackBasis, path: str | Path) -> None:
    tensors = {}
    for name in basis.V:
        tensors[f"V/{name}"] = basis.V[name]
        tensors[f"S/{name}"] = basis.S[name]
        tensors[f"votes/{name}"] = basis.votes[name]
    for name, spec in basis.spectrum.items():
        tensors[f"spectrum/{name}"] = spec
    meta = {**basis.meta, "n_pairs": str(basis.n_pairs)}
    adapter.save_tensors(tensors, path, metadata=meta)


def load_basis(path: str | Path) -> HackBasis:
    fix = f"delete it or re-extract it ({REEXTRACT_HINT})"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BasisFileError(f"cannot read basis file {path} ({e}); {fix}") from None
    if "n_pairs" not in meta:
        raise BasisFileError(f"basis file {path} has no metadata; {fix}")
    parts = {"V": {}, "S": {}, "votes": {}, "spectrum": {}}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in parts:
            raise BasisFileError(f"basis file {path}: unexpected tensor {key!r}; {fix}")
        parts[kind][name] = value
    n_pairs = int(meta.pop("n_pairs"))
    return HackBasis(V=parts["V"], S=parts["S"], spectrum=parts["spectrum"], votes=parts["votes"],
                     n_pairs=n_pairs, meta=meta)


def basis_request(model_id: str, pairs: list[ContrastPair], modes, k: int, tau: float, loss_norm: str,
                  control: str, max_new: int, seed: int) -> dict[str, str]:
    """The metadata a cached basis must match to be reused. `texts: whole` says the pair texts are
    scored to their end: a file extracted from texts cut at max_new (it has no such field)
    mismatches instead of being reused."""
    return {"model": model_id, "pairs": pair_set_hash(pairs), "modes": ",".join(modes), "k": str(k),
            "tau": repr(float(tau)), "loss_norm": loss_norm, "control": control, "max_new": str(max_new),
            "seed": str(seed) if control in ("random", "shuffled") else "-", "texts": "whole",
            "version": __version__}


def resolve_basis(path: str | Path, request: dict[str, str], extract, reextract: bool = False) -> HackBasis:
    """Load the cached basis at `path` if it matches `request` (a hit), else extract it.

    `extract()` returns a fresh HackBasis (a miss: it is saved atomically with the
    request as metadata, beside what extraction measured, such as the texts' lengths).
    A file made for a different request is an error that names the differing request
    fields (only those are compared); `reextract=True` replaces it.
    """
    path = Path(path)
    if path.exists() and not reextract:
        basis = load_basis(path)
        differ = {k: (basis.meta.get(k), v) for k, v in request.items() if basis.meta.get(k) != v}
        if differ:
            fields = "; ".join(f"{k}: cached {old!r} vs requested {new!r}" for k, (old, new) in differ.items())
            raise BasisCacheMismatch(f"basis cache {path} was extracted for a different request ({fields}). "
                                     f"Delete the file, point the basis path elsewhere, or re-extract it "
                                     f"({REEXTRACT_HINT}).")
        log.info("hack basis cache hit: %s", path)
        return basis
    log.info("hack basis cache %s: %s", "refresh" if path.exists() else "miss", path)
    basis = extract()
    basis.meta = {**basis.meta, **request}
    save_basis(basis, path)
    return basis


# ----------------------------------------------------------------------------- CLI


def model_identity(name: str, wrappers) -> str:
    """The model's name plus a hash of its first adapted weight (catches a changed seed or checkpoint)."""
    first = next(iter(wrappers.values()))
    return f"{name}#{adapter.weight_hash(first.base.weight)[:12]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Extract a hack basis V from (hack, clean) pairs.")
    parser.add_argument("--model", default="tiny-random", help="HF id, local path, or tiny-random")
    parser.add_argument("--out", required=True, help="safetensors file to write")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes the pairs come from")
    parser.add_argument("--control", default="none", choices=CONTROLS)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.0)
    parser.add_argument("--loss-norm", default="fixed", choices=LOSS_NORMS)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reextract", action="store_true", help="replace a cached file made for another request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = tuple(m for m in args.modes.split(",") if m)
    pairs = default_pairs(modes=modes)
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    wrappers = adapter.wrap(model)
    request = basis_request(model_identity(args.model, wrappers), pairs, modes, args.k, args.tau, args.loss_norm,
                            args.control, args.max_new, args.seed)
    try:
        basis = resolve_basis(args.out, request, lambda: extract_basis(
            model, tok, wrappers, pairs, args.k, args.tau, args.loss_norm, args.max_new, args.control, args.seed,
            args.batch_size, progress=True), reextract=args.reextract)
    except InputError as e:
        parser.exit(2, f"error: {e}\n")
    print(basis.summary())


if __name__ == "__main__":
    main()
