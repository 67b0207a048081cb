import math

import pytest
import torch

from projected_grpo.hack_basis import random_like
from projected_grpo.projection import (
    hackward_fraction,
    keep_trusted,
    null_cin,
    project,
    project_adam_moments,
    project_all,
    project_update,
    snapshot,
    update_hackward_fraction,
)

ATOL = 1e-5


class FakeLayer:
    def __init__(self, r):
        self.r = r
        self.delta_s = torch.nn.Parameter(torch.zeros(r))
        self.delta_s_hack = torch.nn.Parameter(torch.zeros(r))


def random_basis(k, r, seed=0):
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # (k, r), orthonormal rows


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_removed_lies_in_span_and_no_gate_clears_it():
    V = random_basis(4, 32)
    g = torch.randn(32, generator=gen(1))
    for gate in ("one_sided", "no_gate", "reverse"):
        _, removed, _, _ = project(g, V, gate)
        assert torch.allclose(removed, V.T @ (V @ removed), atol=ATOL)
    g_proj, _, _, cout = project(g, V, "no_gate")
    assert torch.allclose(V @ g_proj, torch.zeros(4), atol=ATOL)
    assert cout < ATOL


def test_one_sided_kills_cout_and_never_grows_the_gradient():
    V = random_basis(6, 40)
    g = torch.randn(500, 40, generator=gen(2)) * torch.rand(500, 1, generator=gen(3)) * 10
    g_proj, _, cin, cout = project(g, V, "one_sided")
    assert cin.shape == cout.shape == (500,)
    assert (cin > 0).float().mean() > 0.9
    assert (cout < ATOL).all()
    assert (g_proj.norm(dim=1) <= g.norm(dim=1) * (1 + 1e-6)).all()
    # Only hack-ward motion is removed: the anti-hack-ward components pass through unchanged.
    c = g @ V.T
    assert torch.allclose(g_proj @ V.T, torch.clamp(c, max=0), atol=1e-4)


def test_reverse_flips_the_component_along_v():
    V = random_basis(3, 16)
    g = torch.randn(16, generator=gen(4))
    g_proj, _, _, _ = project(g, V, "reverse")
    c = V @ g
    # 2 * c * V is subtracted: V g_proj = c - 2c = -c.
    assert torch.allclose(V @ g_proj, -c, atol=ATOL)
    # The part of g outside span(V) is untouched.
    outside = g - V.T @ c
    assert torch.allclose(g_proj - V.T @ (V @ g_proj), outside, atol=ATOL)


def test_overshoot_scales_removed_and_preserve_magnitude_keeps_the_norm():
    V = random_basis(4, 24)
    g = torch.randn(24, generator=gen(5))
    _, removed_1, _, _ = project(g, V, "no_gate")
    _, removed_3, _, _ = project(g, V, "no_gate", overshoot=3.0)
    assert torch.allclose(removed_3, 3 * removed_1, atol=ATOL)
    for gate in ("one_sided", "no_gate", "reverse"):
        g_proj, _, _, _ = project(g, V, gate, overshoot=1.5, preserve_magnitude=True)
        assert math.isclose(g_proj.norm().item(), g.norm().item(), rel_tol=1e-5)


def test_preserve_magnitude_leaves_a_fully_removed_gradient_at_zero():
    V = random_basis(4, 24)
    g = V.T @ torch.tensor([1.0, -2.0, 3.0, 0.5]) * 100  # entirely in span(V)
    g_proj, _, _, _ = project(g, V, "no_gate", preserve_magnitude=True)
    assert torch.isfinite(g_proj).all()
    assert g_proj.norm() < 1e-3


def test_zero_gradient_gives_zero_scores_not_nan():
    V = random_basis(4, 24)
    for gate in ("one_sided", "no_gate", "reverse"):
        g_proj, removed, cin, cout = project(torch.zeros(24), V, gate, preserve_magnitude=True)
        assert cin.item() == 0.0 and cout.item() == 0.0
        assert torch.isfinite(g_proj).all() and not g_proj.any() and not removed.any()
    assert hackward_fraction({"a": torch.zeros(3, 24)}, {"a": V}).tolist() == [0.0, 0.0, 0.0]


def test_cin_applies_relu_before_the_norm():
    V = random_basis(2, 10)
    w = torch.randn(10, generator=gen(6))
    w = w - V.T @ (V @ w)  # orthogonal to V
    w = w / w.norm()
    g = 3.0 * V[0] - 4.0 * V[1] + 2.0 * w
    _, _, cin, cout = project(g, V)
    # Only the +3 survives the relu; the -4 neither cancels it nor counts.
    assert math.isclose(cin.item(), 3.0 / math.sqrt(9 + 16 + 4), rel_tol=1e-5)
    assert cout.item() < ATOL


def make_layers(r=20, names=("a", "b", "c"), seed=7):
    torch.manual_seed(seed)
    wrappers = {n: FakeLayer(r) for n in names}
    for layer in wrappers.values():
        layer.delta_s.grad = torch.randn(r)
        # As after a real backward: the knobs enter the layer as a sum, so both get g.
        layer.delta_s_hack.grad = layer.delta_s.grad.clone()
    return wrappers


def test_project_all_none_only_measures():
    wrappers = make_layers()
    basis = {"a": random_basis(3, 20, 1), "b": random_basis(5, 20, 2)}
    before = {n: layer.delta_s.grad.clone() for n, layer in wrappers.items()}
    stats = project_all(wrappers, basis)
    for n, layer in wrappers.items():
        assert torch.equal(layer.delta_s.grad, before[n])
        assert layer.delta_s_hack.grad is None
    cins = [project(before[n], basis[n])[2].item() for n in basis]
    assert stats["layers"] == 2
    assert math.isclose(stats["cin"], sum(cins) / 2, rel_tol=1e-6)
    assert stats["cout"] == stats["cin"] and stats["fired"] == 0.0
    assert math.isclose(stats["cin_null"], (null_cin(3, 20) + null_cin(5, 20)) / 2)


def test_project_all_erase_writes_g_proj_only():
    wrappers = make_layers()
    basis = {"a": random_basis(3, 20, 1), "b": random_basis(5, 20, 2)}
    before = {n: layer.delta_s.grad.clone() for n, layer in wrappers.items()}
    stats = project_all(wrappers, basis, erase=True, gate="one_sided")
    for n in basis:
        g_proj = project(before[n], basis[n])[0]
        assert torch.allclose(wrappers[n].delta_s.grad, g_proj)
        assert wrappers[n].delta_s_hack.grad is None
    assert torch.equal(wrappers["c"].delta_s.grad, before["c"])  # not in the basis
    assert stats["cout"] < ATOL and stats["cin"] > 0 and stats["fired"] == 1.0


def test_project_all_route_splits_the_gradient():
    wrappers = make_layers()
    basis = {"a": random_basis(3, 20, 1), "b": random_basis(5, 20, 2)}
    before = {n: layer.delta_s.grad.clone() for n, layer in wrappers.items()}
    project_all(wrappers, basis, route=True)
    for n in basis:
        layer = wrappers[n]
        assert project(before[n], basis[n])[2] > 0
        assert layer.delta_s_hack.grad is not None and layer.delta_s_hack.grad.norm() > 0
        assert torch.allclose(layer.delta_s.grad + layer.delta_s_hack.grad, before[n], atol=ATOL)
    assert torch.equal(wrappers["c"].delta_s.grad, before["c"])
    assert wrappers["c"].delta_s_hack.grad is None


def test_project_all_skips_layers_without_gradient_and_rejects_unknown_gates():
    wrappers = make_layers()
    wrappers["a"].delta_s.grad = None
    stats = project_all(wrappers, {"a": random_basis(3, 20)}, erase=True)
    assert stats["layers"] == 0 and wrappers["a"].delta_s.grad is None
    with pytest.raises(ValueError, match="one_sided"):
        project(torch.randn(20), random_basis(3, 20), gate="two_sided")


def test_null_baseline_matches_monte_carlo():
    k, r = 4, 64
    V = random_basis(k, r)
    g = torch.randn(20_000, r, generator=gen(8))
    cin = project(g, V)[2]
    assert math.isclose(cin.square().mean().item(), null_cin(k, r) ** 2, rel_tol=0.03)


def test_hackward_fraction_scores_each_rollout():
    V = random_basis(3, 16)
    grads = torch.randn(5, 16, generator=gen(9))
    scores = hackward_fraction({"a": grads}, {"a": V})
    assert scores.shape == (5,)
    assert torch.allclose(scores, project(grads, V)[2])
    assert math.isclose(hackward_fraction({"a": grads[0]}, {"a": V}).item(), scores[0].item(), rel_tol=1e-6)


def test_hackward_fraction_concatenates_layers_in_the_basis():
    Va, Vb = random_basis(2, 8, 1), random_basis(3, 12, 2)
    ga, gb, gc = torch.randn(8), torch.randn(12), torch.randn(30)
    score = hackward_fraction({"a": ga, "b": gb, "c": gc}, {"a": Va, "b": Vb})
    hack = torch.cat([torch.relu(Va @ ga), torch.relu(Vb @ gb)]).norm()
    assert math.isclose(score.item(), (hack / torch.cat([ga, gb]).norm()).item(), rel_tol=1e-5)


def test_update_fraction_of_an_sgd_step_is_the_gradient_cin():
    # Pins the sign: the parameters move against g, and that motion is hack-ward when V g > 0.
    wrappers = {"a": FakeLayer(16)}
    V = random_basis(3, 16)
    g = torch.randn(16, generator=gen(10))
    opt = torch.optim.SGD([wrappers["a"].delta_s], lr=0.1)
    before = snapshot(wrappers)
    wrappers["a"].delta_s.grad = g.clone()
    opt.step()
    assert math.isclose(update_hackward_fraction(before, wrappers, {"a": V}), project(g, V)[2].item(),
                        rel_tol=1e-4)


def adam_after_hackward_history(V, r, seed):
    """An AdamW whose first moment remembers five steps of strongly hack-ward gradients."""
    torch.manual_seed(seed)
    wrappers = {"a": FakeLayer(r)}
    opt = torch.optim.AdamW([wrappers["a"].delta_s], lr=1e-2)
    for _ in range(5):
        wrappers["a"].delta_s.grad = V.T @ (3 * torch.rand(V.shape[0])) + 0.3 * torch.randn(r)
        opt.step()
    return wrappers, opt


def erased_step(wrappers, opt, V, project_moments):
    basis = {"a": V}
    wrappers["a"].delta_s.grad = torch.randn(wrappers["a"].r)
    project_all(wrappers, basis, erase=True)
    if project_moments:
        project_adam_moments(opt, wrappers, basis)
    before = snapshot(wrappers)
    opt.step()
    return update_hackward_fraction(before, wrappers, basis)


def test_adam_moment_projection_clears_the_first_moment():
    V = random_basis(4, 32)
    wrappers, opt = adam_after_hackward_history(V, 32, seed=0)
    exp_avg = opt.state[wrappers["a"].delta_s]["exp_avg"]
    exp_avg_sq = opt.state[wrappers["a"].delta_s]["exp_avg_sq"].clone()
    assert (V @ exp_avg).norm() > 0.1
    project_adam_moments(opt, wrappers, {"a": V})
    assert torch.allclose(V @ exp_avg, torch.zeros(4), atol=ATOL)
    assert torch.equal(opt.state[wrappers["a"].delta_s]["exp_avg_sq"], exp_avg_sq)


def test_adam_moment_projection_before_the_first_step_is_a_no_op():
    wrappers = {"a": FakeLayer(8)}
    opt = torch.optim.Adam([wrappers["a"].delta_s])
    project_adam_moments(opt, wrappers, {"a": random_basis(2, 8)})
    assert len(opt.state) == 0


def test_adam_leaks_hackward_memory_through_an_erased_gradient():
    r, k = 64, 4
    V = random_basis(k, r)
    leaked, cleared = [], []
    for seed in range(10):
        leaked.append(erased_step(*adam_after_hackward_history(V, r, seed), V, project_moments=False))
        cleared.append(erased_step(*adam_after_hackward_history(V, r, seed), V, project_moments=True))
    # Erasing g alone: the step is still mostly hack-ward, far above a random direction.
    assert min(leaked) > 3 * null_cin(k, r)
    # Clearing the first moment removes the memory; what is left is the preconditioner's small
    # rotation (exp_avg_sq is elementwise), well below even a random direction.
    assert max(cleared) < 0.5 * null_cin(k, r)
    assert sum(cleared) < 0.05 * sum(leaked)


def test_project_update_keeps_the_actual_step_out_of_the_hackward_half():
    r, k = 64, 4
    V = random_basis(k, r)
    wrappers, opt = adam_after_hackward_history(V, r, seed=3)
    wrappers["a"].delta_s.grad = torch.randn(r)
    project_all(wrappers, {"a": V}, erase=True)
    before = snapshot(wrappers)
    opt.step()
    assert update_hackward_fraction(before, wrappers, {"a": V}) > 0.3
    project_update(before, wrappers, {"a": V})
    assert update_hackward_fraction(before, wrappers, {"a": V}) < ATOL


def test_capacity_control_erases_along_v_and_feeds_the_quarantine_along_r():
    wrappers = make_layers()
    basis = {"a": random_basis(3, 20, 1), "b": random_basis(5, 20, 2)}
    R = random_like(basis, seed=9)
    assert {n: r.shape for n, r in R.items()} == {n: v.shape for n, v in basis.items()}  # same capacity
    for rows in R.values():
        torch.testing.assert_close(rows @ rows.T, torch.eye(rows.shape[0]), atol=1e-5, rtol=0)
    before = {n: layer.delta_s.grad.clone() for n, layer in wrappers.items()}
    project_all(wrappers, basis, route=True, quarantine=R)
    for n in basis:
        torch.testing.assert_close(wrappers[n].delta_s.grad, project(before[n], basis[n])[0])  # as under erase
        torch.testing.assert_close(wrappers[n].delta_s_hack.grad, project(before[n], R[n])[1])  # relu(R g) R
        assert not torch.allclose(wrappers[n].delta_s_hack.grad, project(before[n], basis[n])[1])


def test_trusted_keeps_a_gradient_inside_t_and_removes_one_orthogonal_to_it():
    T = {"a": random_basis(3, 20, 4)}
    w = {"a": torch.tensor([1.0, 0.5, 0.25])}
    inside = 2.0 * T["a"][0]
    orthogonal = torch.randn(20, generator=gen(5))
    orthogonal -= T["a"].T @ (T["a"] @ orthogonal)
    mixed = T["a"][1] + orthogonal
    for g, expected in ((inside, inside), (orthogonal, torch.zeros(20)), (mixed, 0.5 * T["a"][1])):
        wrappers = {"a": FakeLayer(20), "b": FakeLayer(20)}
        wrappers["a"].delta_s.grad = g.clone()
        wrappers["b"].delta_s.grad = torch.randn(20)
        keep_trusted(wrappers, T, w)
        torch.testing.assert_close(wrappers["a"].delta_s.grad, expected, atol=1e-5, rtol=0)
        assert not wrappers["b"].delta_s.grad.any()  # no trusted subspace: nothing is trusted


def _drift(gate, signal, steps=400, seed=11):
    """Mean component along v of the projected gradient, over noisy steps g = signal * v + noise."""
    V = random_basis(3, 20, seed)
    wrappers, grad_mean, along = {"a": FakeLayer(20)}, {}, []
    noise = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        wrappers["a"].delta_s.grad = signal * V[0] + torch.randn(20, generator=noise)
        project_all(wrappers, {"a": V}, erase=True, gate=gate, grad_mean=grad_mean, gate_beta=0.9)
        along.append(float(wrappers["a"].delta_s.grad @ V[0]))
    return sum(along) / steps


def test_smoothed_gate_does_not_turn_noise_into_drift_and_still_removes_a_steady_pull():
    # Pure noise: one_sided removes only the positive half of each coordinate, a steady bias of
    # -E[relu(c)] ~ -0.4 per step along v; the smoothed gate decides from the past, so ~0.
    assert _drift("one_sided", 0.0) < -0.3
    assert abs(_drift("smoothed", 0.0)) < 0.1
    # A steady hack-ward pull of 2 (noise 1): the smoothed gate removes nearly all of it.
    assert abs(_drift("smoothed", 2.0)) < 0.2 and _drift("no_gate", 2.0) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="running mean"):
        project(torch.randn(20), random_basis(3, 20), gate="smoothed")


def test_smoothed_gate_keeps_one_knob_space_mean_a_layer_that_serves_the_quarantine_rows_too():
    # ḡ is the raw gradient's running mean, r floats a layer, kept for every layer with a gradient (b has no V
    # yet); the capacity control's rows read their trend from the same ḡ.
    basis = {"a": random_basis(3, 20, 1)}
    R = random_like(basis, seed=2)
    grad_mean, raw = {}, []
    for seed in range(3):
        wrappers = make_layers(seed=seed)
        raw.append({n: w.delta_s.grad.clone() for n, w in wrappers.items()})
        project_all(wrappers, basis, route=True, gate="smoothed", quarantine=R, grad_mean=grad_mean, gate_beta=0.5)
    assert set(grad_mean) == set(raw[0]) and grad_mean["a"].shape == (20,)
    for n in grad_mean:
        torch.testing.assert_close(grad_mean[n], 0.25 * raw[0][n] * 0.5 + 0.25 * raw[1][n] + 0.5 * raw[2][n])
