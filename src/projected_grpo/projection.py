"""Project the hack-ward component out of the knob gradients (docs/method.md, "Projection").

Per layer, with live gradient g (length r) and hack basis V (k x r, orthonormal rows):

    c        = V g
    c_gate   = relu(c)  (one_sided) | c  (no_gate) | 2c  (reverse) | c * [trend > 0]  (smoothed)
    removed  = overshoot * c_gate @ V
    g_proj   = g - removed
    cin      = ||relu(V g)|| / ||g||,   cout = ||relu(V g_proj)|| / ||g_proj||

Sign convention: V lives in gradient space. A component c_i > 0 means the optimizer's step
(theta -= lr * g) moves the model toward hacking, so that is the motion the one-sided gate removes.

cin and cout are tensors: 0-dim for one gradient of shape (r,), shape (n,) for a batch (n, r)
of per-rollout gradients. The per-step aggregates of `project_all` are Python floats.

Layers are duck-typed: anything with `delta_s`, `delta_s_hack` (1-D nn.Parameters of length r)
and `r` works.
"""

import math

import torch

from .config import GATES

PRESERVE_MAGNITUDE_RTOL = 1e-4


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A zero gradient has no hack-ward part: 0/0 is reported as 0, never NaN. Every caller has
    # num <= den, so the clamp cannot inflate a ratio.
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _coords(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """c = V g, broadcasting: g (..., r) with V (k, r) or, stacked per layer, V (..., k, r)."""
    return torch.einsum("...kr,...r->...k", V, g)


def _cin(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    # relu before the norm: hack-ward and anti-hack-ward components must not cancel.
    return _ratio(torch.relu(_coords(g, V)).norm(dim=-1), g.norm(dim=-1))


def project(g: torch.Tensor, V: torch.Tensor, gate: str = "one_sided", overshoot: float = 1.0,
            preserve_magnitude: bool = False, trend: torch.Tensor | None = None):
    """Return `(g_proj, removed, cin, cout)` for one layer's gradient g, shape (r,) or (n, r).

    V is (k, r), or (n, k, r) for n layers of one shape stacked (g then (n, r)).
    Computed in V's dtype (fp32), whatever the gradient's dtype. `trend` (shaped like V g): V ḡ, the
    coordinates of the raw gradient's running mean before this step, which the smoothed gate decides from. Its
    decision does not depend on this step's noise, so noise that is independent from step to step
    is removed as often with either sign: no drift (one_sided removes only its positive half: a
    steady bias). Noise correlated across steps correlates with the trend, and a smaller bias
    comes back.
    """
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; allowed: {', '.join(GATES)}")
    if gate == "smoothed" and trend is None:
        raise ValueError("the smoothed gate needs the coordinates' running mean (trend)")
    g = g.to(V.dtype)
    c_gate = _gated(_coords(g, V), gate, trend)
    removed = overshoot * torch.einsum("...k,...kr->...r", c_gate, V)
    g_proj = g - removed
    if preserve_magnitude:
        # A g_proj that was removed entirely is left at zero: what remains of it is rounding noise,
        # and stretching that to ||g|| would invent a direction.
        norm, norm_proj = g.norm(dim=-1, keepdim=True), g_proj.norm(dim=-1, keepdim=True)
        removed_entirely = norm_proj <= PRESERVE_MAGNITUDE_RTOL * norm
        g_proj = torch.where(removed_entirely, torch.zeros_like(g_proj), g_proj * norm / norm_proj)
    return g_proj, removed, _cin(g, V), _cin(g_proj, V)


def _gated(c: torch.Tensor, gate: str, trend: torch.Tensor | None) -> torch.Tensor:
    """The coordinates the gate lets act: c_gate of the module docstring."""
    return {"one_sided": torch.relu, "no_gate": lambda c: c, "reverse": lambda c: 2 * c,
            "smoothed": lambda c: c * (trend > 0)}[gate](c)


def null_cin(k: int, r: int) -> float:
    """cin of a random direction: each of the k rows sees a component with E[c_i^2] = 1/r, half of
    which survives the relu, so E[cin^2] = k / (2r). This is the RMS; E[cin] is slightly below it."""
    return math.sqrt(k / (2 * r))


@torch.no_grad()
def project_all(wrappers: dict, basis: dict[str, torch.Tensor], erase: bool = False, route: bool = False,
                gate: str = "one_sided", overshoot: float = 1.0, preserve_magnitude: bool = False,
                quarantine: dict[str, torch.Tensor] | None = None, grad_mean: dict[str, torch.Tensor] | None = None,
                gate_beta: float = 0.9) -> dict:
    """Project every layer's `delta_s.grad` and return the step's aggregates.

    Neither flag: measure only, gradients untouched. erase: delta_s.grad = g_proj. route (implies
    erase): additionally delta_s_hack.grad = removed, replacing whatever backward put there (the knobs
    enter the layer as a sum, so backward gives delta_s_hack the same g). The quarantine learns only
    what route puts there: its gradient is cleared in every other case (no route, layers without a
    basis). Layers with no gradient or no basis are otherwise skipped.

    `grad_mean` (smoothed gate): per layer, ḡ, the running mean of the raw knob gradient (beta
    `gate_beta`), kept in knob space so that it means the same whatever V is: the gate's trend is
    V ḡ for the current V (and Q ḡ for the capacity control's quarantine rows), read before this
    step and ḡ updated after it, for every layer with a gradient, in the basis or not. A layer not
    in it starts at 0 (nothing is removed on its first step). Nothing about it depends on V, so
    a refresh, a control's redraw or a resume leaves it as it is; the caller keeps it with the
    checkpoint.

    `quarantine` (the capacity control, route only): rows of the same per-layer shape as `basis`
    along which the quarantine is fed instead, the gated component of g along them; delta_s is still
    erased along `basis`. A second, deleted knob of the same size, but fed without the hack basis.

    Returns means over the layers acted on: `cin`, `cout` (of the gradient the optimizer will see,
    so cout == cin when only measured), `fired` (fraction of layers where the gate removed something;
    0 when only measured), `gated_frac` (fraction of all rows whose gated coordinate acted; 0 when
    only measured), `cin_null` (the null baseline over the same layers) and the count `layers`.
    """
    erase = erase or route
    if gate == "smoothed" and grad_mean is None:
        raise ValueError("the smoothed gate needs a grad_mean dict to keep its running mean in")
    for name, layer in wrappers.items():
        if not route or name not in basis:
            layer.delta_s_hack.grad = None
    # ḡ before this step, and this step's raw gradients (the projection below rewrites them in place).
    before = dict(grad_mean) if gate == "smoothed" else {}
    raw = {n: layer.delta_s.grad.detach().float().clone() for n, layer in wrappers.items()
           if gate == "smoothed" and layer.delta_s.grad is not None}
    cins, couts, fired, nulls = [], [], [], []
    acting = rows_total = 0

    def gated(g, rows, names, preserve):
        """project() along `rows`; under the smoothed gate its trend is rows ḡ, ḡ as it was before this step."""
        running = None
        if gate == "smoothed":
            running = _coords(torch.stack([before.get(n, g.new_zeros(g.shape[-1])).to(rows) for n in names]), rows)
        out = project(g, rows, gate, overshoot, preserve, running)
        c = _coords(g.to(rows.dtype), rows)
        return (*out, int(_gated(c, gate, running).ne(0).sum()))

    # Layers of one shape are projected together: a few batched ops, not a dozen per layer.
    for names, V in _stacked(basis, [n for n in basis if n in wrappers and wrappers[n].delta_s.grad is not None]):
        grads = [wrappers[n].delta_s.grad for n in names]
        g = torch.stack(grads)
        V = V.to(grads[0].device)
        g_proj, removed, cin, cout, gated_rows = gated(g, V, names, preserve_magnitude)
        acting += gated_rows * erase
        rows_total += V.shape[0] * V.shape[1]
        to_quarantine = removed
        if route and quarantine is not None:
            to_quarantine = gated(g, torch.stack([quarantine[n] for n in names]).to(V.device), names, False)[1]
        for i, name in enumerate(names):
            if erase:
                grads[i].copy_(g_proj[i])
            if route:
                wrappers[name].delta_s_hack.grad = to_quarantine[i].to(wrappers[name].delta_s_hack.dtype)
        cins += cin.tolist()
        couts += (cout if erase else cin).tolist()
        fired += (removed.ne(0).any(-1) & erase).float().tolist()
        nulls += [null_cin(V.shape[1], V.shape[2])] * len(names)
    for name, g in raw.items():
        grad_mean[name] = gate_beta * before.get(name, torch.zeros_like(g)).to(g) + (1 - gate_beta) * g

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    return {"cin": mean(cins), "cout": mean(couts), "fired": mean(fired), "cin_null": mean(nulls),
            "gated_frac": acting / rows_total if rows_total else 0.0, "layers": len(cins)}


@torch.no_grad()
def keep_trusted(wrappers: dict, T: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> None:
    """The trusted-direction baseline: delta_s.grad <- Tᵀ (w * (T g)) per layer, the opposite of
    erase: only the part of g inside the clean completions' subspace survives, each direction
    scaled by its weight. A layer with no trusted subspace keeps nothing."""
    for name, layer in wrappers.items():
        g = layer.delta_s.grad
        if g is None:
            continue
        if name not in T:
            g.zero_()
            continue
        rows = T[name].to(g.device, torch.float32)
        g.copy_(((rows @ g.float()) * w[name].to(g.device)) @ rows)


def _stacked(basis: dict[str, torch.Tensor], names: list[str]) -> list[tuple[list[str], torch.Tensor]]:
    """Group layer names by their basis shape; each group's V stacked to (n_layers, k, r)."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(tuple(basis[name].shape), []).append(name)
    return [(group, torch.stack([basis[n] for n in group])) for group in groups.values()]


def hackward_fraction(grads: dict[str, torch.Tensor], basis: dict[str, torch.Tensor]) -> torch.Tensor:
    """cin of the whole knob vector: the layers in the basis concatenated, so
    ||relu(V g)|| over all of them divided by ||g|| over the same layers.

    Per-layer grads of shape (r,) give a 0-dim tensor; shape (n, r) (one row per rollout) gives
    each rollout's hack score, shape (n,). No layer in the basis gives 0.
    """
    # On the gradients' device: per-rollout sums (n,) would not mix with CUDA tensors from the CPU.
    first = next(iter(grads.values()), None)
    hack_sq = total_sq = torch.zeros(()) if first is None else first.new_zeros(first.shape[:-1], dtype=torch.float32)
    for names, V in _stacked(basis, [n for n in grads if n in basis]):
        g = torch.stack([grads[n] for n in names])  # (layers, [n,] r)
        V = V.to(g.device)
        g = g.to(V.dtype)
        c = _coords(g, V if g.dim() == 2 else V[:, None])
        hack_sq = hack_sq + torch.relu(c).square().sum((0, -1))
        total_sq = total_sq + g.square().sum((0, -1))
    return _ratio(hack_sq.sqrt(), total_sq.sqrt())


# Adam caveat. Projecting g does not keep the *update* out of span(V): exp_avg is a running sum of
# past gradients, so hack-ward gradients seen before (or under the none arm) keep pushing after g
# is clean. The helpers below clear that memory and measure what the step actually did.

@torch.no_grad()
def project_adam_moments(optimizer: torch.optim.Optimizer, wrappers: dict, basis: dict[str, torch.Tensor]):
    """Remove span(V) from each delta_s's Adam first moment: exp_avg -= V^T (V exp_avg).

    Call before `optimizer.step()`; the step then moves along V only by what this step's gated
    gradient allows. The whole span is cleared, whichever way the memory points, since the memory
    of an anti-hack-ward step is as stale as that of a hack-ward one. exp_avg_sq is left alone: it is
    an elementwise scale, not a direction. That scale is also why this is not exact: a diagonal
    preconditioner can rotate an exp_avg orthogonal to V back into span(V) a little; `project_update`
    is the exact (and optimizer-agnostic) fix. Before the first step there is no state: a no-op.
    """
    for name, V in basis.items():
        layer = wrappers.get(name)
        if layer is None:
            continue
        exp_avg = optimizer.state.get(layer.delta_s, {}).get("exp_avg")
        if exp_avg is None:
            continue
        V = V.to(exp_avg.device, exp_avg.dtype)
        exp_avg.sub_((V @ exp_avg) @ V)


def snapshot(wrappers: dict) -> dict[str, torch.Tensor]:
    """Detached copies of every delta_s, taken before `optimizer.step()`."""
    return {name: layer.delta_s.detach().clone() for name, layer in wrappers.items()}


def _descent(before: dict[str, torch.Tensor], wrappers: dict) -> dict[str, torch.Tensor]:
    # The step in gradient convention (before - after), so it reads like g: V-positive = hack-ward.
    return {name: before[name] - layer.delta_s.detach() for name, layer in wrappers.items() if name in before}


def update_hackward_fraction(before: dict[str, torch.Tensor], wrappers: dict,
                             basis: dict[str, torch.Tensor]) -> float:
    """cin of the parameter change the optimizer actually made (relu, whole vector, layers in the basis).

    The change after - before moves against the gradient, so it is scored as before - after: a plain
    SGD step on g scores exactly cin(g).
    """
    return float(hackward_fraction(_descent(before, wrappers), basis))


@torch.no_grad()
def project_update(before: dict[str, torch.Tensor], wrappers: dict, basis: dict[str, torch.Tensor],
                   gate: str = "one_sided", overshoot: float = 1.0, grad_mean: dict[str, torch.Tensor] | None = None):
    """Call after `optimizer.step()`: gate the step itself, delta_s = before - project(before - after).

    Exact whatever the optimizer did (moments, preconditioner, weight decay), at the price of a step
    whose size Adam did not choose. Under the smoothed gate the decision is the raw gradient's, not
    the step's: a row acts on the step while its trend V ḡ is hack-ward, ḡ being project_all's
    running mean of the raw gradient, this step's included; a layer without one acts nowhere.
    """
    if gate == "smoothed" and grad_mean is None:
        raise ValueError("the smoothed gate needs the raw gradient's running mean (grad_mean)")
    steps = _descent(before, wrappers)
    for name, V in basis.items():
        if name not in steps:
            continue
        delta_s = wrappers[name].delta_s
        V = V.to(delta_s.device)
        running = None
        if gate == "smoothed":
            running = V @ grad_mean[name].to(V) if name in grad_mean else V.new_zeros(V.shape[0])
        step_proj = project(steps[name], V, gate, overshoot, trend=running)[0]
        delta_s.copy_(before[name] - step_proj.to(delta_s.dtype))
