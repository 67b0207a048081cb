"""The smoothed gate's memory lives in knob space: a V that is replaced (a refresh, a control's redraw,
a resume) or turned within its span leaves what the gate knows, and what it lets through, as it was.

Each test drives the run's own hooks (the erase arm's gradient and update, Basis.set) on
synthetic knob gradients, with AdamW and --adam_leak=update as the organism study runs them.
"""

import pytest
import torch

from projected_grpo import assembly, basis, distributed, interventions, projection
from projected_grpo.config import make_config

R, K = 24, 4


class Knobs:
    def __init__(self):
        self.r = R
        self.delta_s = torch.nn.Parameter(torch.zeros(R))
        self.delta_s_hack = torch.nn.Parameter(torch.zeros(R))


def orthonormal(k, r, seed):
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def make_run(gate: str) -> assembly.Run:
    cfg = make_config("smoke", {"gate": gate, "adam_leak": "update", "warmup": "0", "lr_schedule": "constant",
                                "lr": "0.01"})
    wrappers = {"a": Knobs()}
    params = [wrappers["a"].delta_s, wrappers["a"].delta_s_hack]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return assembly.Run(cfg, interventions.get("erase"), distributed.SINGLE, None, None, wrappers, [], [], None, None,
                        optimizer, scheduler, None, basis.Basis(cfg, distributed.SINGLE, []))


def train(gate: str, grads: list[torch.Tensor], basis_at) -> tuple[list[torch.Tensor], list[float]]:
    """The erase arm's steps on `grads`, a new V set before each where basis_at(step) gives one (None: V stays);
    returns delta_s after every step and the hack-ward fraction of each step's actual update along its V."""
    run = make_run(gate)
    knobs, hackward = [], []
    for step, g in enumerate(grads):
        if (V := basis_at(step)) is not None:
            run.basis.set({"a": V})
        run.optimizer.zero_grad(set_to_none=True)
        run.wrappers["a"].delta_s.grad = g.clone()
        run.arm.gradient(run)
        before = projection.snapshot(run.wrappers)
        run.optimizer.step()
        run.arm.update(run, before)
        knobs.append(run.wrappers["a"].delta_s.detach().clone())
        hackward.append(projection.update_hackward_fraction(before, run.wrappers, run.basis.V))
    return knobs, hackward


def noisy_pull(V: torch.Tensor, pull: float, steps: int, seed: int) -> list[torch.Tensor]:
    """g = pull along every row of V (hack-ward) + unit noise in every knob coordinate."""
    noise = torch.Generator().manual_seed(seed)
    return [pull * V.sum(0) + torch.randn(R, generator=noise) for _ in range(steps)]


@pytest.mark.parametrize("gate", ["one_sided", "no_gate", "reverse", "smoothed"])
def test_turning_v_within_its_span_leaves_the_gradient_and_the_update_as_they_were(gate):
    # A per-row gate (one_sided, smoothed) decides row by row, so only a Q that keeps the rows (a permutation) can
    # leave it unchanged; no_gate and reverse act on span(V) as a whole, so any orthogonal Q does.
    V = orthonormal(K, R, 1)
    per_row = gate in ("one_sided", "smoothed")
    Q = torch.eye(K)[torch.randperm(K, generator=torch.Generator().manual_seed(2))] if per_row else \
        orthonormal(K, K, 3)
    grads = noisy_pull(V, 0.5, 12, seed=4)
    fixed, _ = train(gate, grads, lambda step: V if step == 0 else None)
    turned, _ = train(gate, grads, lambda step: Q @ V if step % 2 else V)  # turned at every step, back and forth
    for a, b in zip(fixed, turned):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # The gradient's projection itself, after the same history under V and under QV.
    torch.testing.assert_close(projected_gradient(gate, Q @ V, grads), projected_gradient(gate, V, grads),
                               atol=1e-6, rtol=0)


def projected_gradient(gate: str, V: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """The erase arm's gradient hook on each of `grads` in turn (no optimizer step); the last one projected."""
    run = make_run(gate)
    run.basis.set({"a": V})
    for g in grads:
        run.wrappers["a"].delta_s.grad = g.clone()
        run.arm.gradient(run)
    return run.wrappers["a"].delta_s.grad


def test_a_refresh_to_the_same_v_acts_on_the_next_step_as_if_none_had_happened():
    V = orthonormal(K, R, 5)
    grads = noisy_pull(V, 0.5, 10, seed=6)
    never, _ = train("smoothed", grads, lambda step: V if step == 0 else None)
    refreshed, _ = train("smoothed", grads, lambda step: V.clone())  # refreshed to the same rows at every step
    for a, b in zip(never, refreshed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("gate", ["smoothed", "no_gate"])
def test_a_steady_hackward_pull_stays_out_of_the_update_when_v_is_redrawn_every_step(gate):
    # A live V turns with every refresh: here it is redrawn in the same span at every step, each row oriented
    # hack-ward (as the live V's vote orients it). Per row, this step's noise (sd 1) often outweighs the pull
    # (0.8), so a gate that forgets at each new V decides from noise and lets Adam's hack-ward memory through.
    V = orthonormal(K, R, 7)

    def redrawn(step):
        turned = orthonormal(K, K, 100 + step) @ V
        return turned * torch.sign(turned @ V.sum(0)).unsqueeze(1)

    grads = noisy_pull(V, 0.8, 60, seed=8)
    _, hackward = train(gate, grads, redrawn)
    null = projection.null_cin(K, R)
    assert sum(hackward[10:]) / len(hackward[10:]) < 0.05 < null
