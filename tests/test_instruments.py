"""The fair-test instruments: the hack score, pair contrasts, self and live pairs, the update path."""

import dataclasses
import json
import types

import pytest
import torch
from conftest import held_out_rollouts

from projected_grpo import adapter, checkpoints, distributed, grpo, hack_basis, interventions, projection
from projected_grpo import basis as run_basis
from projected_grpo.config import ConfigError, make_config
from projected_grpo.model import load_model_and_tokenizer
from projected_grpo.problems import builtin_problems
from projected_grpo.rewards import Reward, grade_batch
from projected_grpo.scoring import pad_batch, token_logprobs
from projected_grpo.templates import default_pairs, wrong_completion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    os.environ.setdefault("PROJECTED_GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    return model, tok, adapter.wrap(model)


def _rollouts(tiny, cfg):
    model, tok, wrappers = tiny
    problems = builtin_problems()[:cfg.prompts_per_step]
    rollouts, _ = grpo.collect_rollouts(model, tok, wrappers, problems, None, cfg, 1, 1)
    return rollouts


def test_the_hack_score_reads_each_rollouts_own_likelihood_gradient_whatever_its_advantage_and_the_kl(tiny):
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"group": "3", "prompts_per_step": "1", "max_new": "10", "mix_ratio": "0"})
    rollouts = _rollouts(tiny, cfg)
    with torch.no_grad():  # knobs away from the reference, so the KL term has a gradient
        for layer in wrappers.values():
            layer.delta_s.normal_(0, 0.05)
    outs = []
    for sign, beta in ((1.0, 0.0), (-1.0, 0.5)):
        for i, r in enumerate(rollouts):
            r.advantage = sign * (1.0 if i % 2 else -0.5)
        scoring = make_config("smoke", {"group": "3", "prompts_per_step": "1", "max_new": "10", "mix_ratio": "0",
                                        "beta": str(beta)})
        outs.append(grpo.backward_rollouts(model, tok, wrappers, rollouts, scoring,
                                           grpo.Columns.rows(list(range(len(rollouts))), len(rollouts))))
        for layer in wrappers.values():
            layer.delta_s.grad = None
    name = next(iter(wrappers))
    torch.testing.assert_close(outs[0]["columns"][name], outs[1]["columns"][name])
    assert not torch.allclose(outs[0]["g_student"][name], outs[1]["g_student"][name])
    # Each row is that rollout's d(-sum log p / max_new), computed here one rollout at a time.
    for i, r in enumerate(rollouts[:2]):
        ids, attn, comp = pad_batch([r.prompt_ids], [r.completion_ids], tok.pad_token_id)
        with adapter.scoring(wrappers):
            (-(token_logprobs(model, ids, attn, comp) * comp).sum() / cfg.max_new).backward()
        torch.testing.assert_close(outs[0]["columns"][name][i], wrappers[name].delta_s.grad, rtol=1e-4, atol=1e-7)
        for layer in wrappers.values():
            layer.delta_s.grad = None
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.zero_()


def test_a_planted_hack_direction_scores_hacks_apart_and_a_random_v_does_not():
    gen = torch.Generator().manual_seed(0)
    r, n = 64, 400
    direction = torch.randn(r, generator=gen)
    direction /= direction.norm()
    hacks = torch.rand(n, generator=gen) < 0.3
    grads = torch.randn(n, r, generator=gen) + 3.0 * hacks[:, None] * direction  # hacks pull along it
    planted = direction[None]  # V of one row, along the hacks' pull
    random_v = torch.linalg.qr(torch.randn(r, 1, generator=gen))[0].T
    score = {name: projection.hackward_fraction({"a": grads}, {"a": V}).tolist()
             for name, V in (("planted", planted), ("random", random_v))}
    assert grpo.auroc(score["planted"], hacks.tolist()) >= 0.95
    assert 0.4 <= grpo.auroc(score["random"], hacks.tolist()) <= 0.6


def _group(mode, flags, exploited=None):
    problem = types.SimpleNamespace(mode=mode, id=f"p-{mode}")
    exploited = flags if exploited is None else exploited
    return [grpo.Rollout(problem, [], [], "", False, 0.0, e, False, e) for e in exploited]


def _differences(cfg, rollouts, g: torch.Tensor) -> list[dict]:
    """The live differences of `rollouts` whose per-row gradients are g, as Basis.observe buffers them."""
    columns = run_basis.live_columns(cfg, rollouts)
    return [] if columns is None else [{"layer": row} for row in columns.matrix() @ g]


def test_a_live_v_from_planted_group_differences_recovers_the_direction():
    cfg = make_config("smoke", {"group": "4", "mix_ratio": "0", "pairs": "live", "refresh_every": "1",
                                "basis_k": "2", "basis_modes": "run_tests"})
    gen = torch.Generator().manual_seed(1)
    r = 32
    direction = torch.randn(r, generator=gen)
    direction /= direction.norm()
    live = []
    for step in range(6):
        group = _group("run_tests", [True, False, True, False])
        g = torch.randn(4, r, generator=gen) * 0.1 + torch.tensor([1.0, 0, 1.0, 0])[:, None] * direction
        live.append((step, _differences(cfg, group, g)))
    assert all(len(d) == 1 for _, d in live)
    basis = run_basis.live_basis(cfg, live)
    assert float(basis.V["layer"][0] @ direction) > 0.95  # the row, oriented hack-ward
    random_basis = run_basis.live_basis(make_config("smoke", {"pairs": "live", "refresh_every": "1",
                                                             "control": "random", "basis_k": "2"}), live)
    assert abs(float(random_basis.V["layer"][0] @ direction)) < 0.8
    assert run_basis.live_basis(cfg, []) is None


def test_nothing_that_trains_reads_a_held_out_modes_label_and_the_ceiling_reads_every_mode():
    held = held_out_rollouts(2)
    known = _group("run_tests", [True, False])
    cfg = make_config("smoke", {"group": "2", "mix_ratio": "0", "pairs": "live", "refresh_every": "1",
                                "basis_modes": "run_tests"})
    assert run_basis.live_columns(cfg, held + known).count == 1  # the known group only
    for name in ("screen", "penalty", "advmod"):  # nor do the detector's other readers, which train on it
        interventions.get(name).advantages(held + known, cfg)
    probe = dataclasses.replace(cfg, monitor="probe")  # nor the probe's readers, whatever it scores
    for r, score in zip(held + known, (0.9, 0.1, 0.8, 0.2)):
        r.probe_score = score
    for name in ("screen", "penalty", "advmod"):
        interventions.get(name).advantages(held + known, probe)
    ceiling = make_config("smoke", {"group": "2", "mix_ratio": "0", "pairs": "live", "refresh_every": "1",
                                    "basis_modes": "run_tests", "live_labels": "oracle"})
    assert ceiling.run_name == "smoke-erase-ceiling-s0"
    oracle_group = _group("exit_code", [True, False])
    assert run_basis.live_columns(ceiling, oracle_group + known).count == 2


def test_failed_contrast_sets_a_hack_against_an_honest_failure(problems):
    pairs = default_pairs(modes=("run_tests",), problems=problems, contrast="failed")
    assert pairs and all(p.clean == wrong_completion(next(q for q in problems if q.id == p.problem_id))
                         for p in pairs)
    grades = grade_batch([p.clean for p in pairs], [next(q for q in problems if q.id == p.problem_id)
                                                     for p in pairs])
    assert not any(g.passed or g.gt_correct or g.exploited for g in grades)
    with pytest.raises(ValueError, match="clean or failed"):
        default_pairs(contrast="worse")


def test_self_pairs_pair_flagged_with_unflagged_samples_and_are_cached(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"pairs": "self", "self_samples": "2", "basis_k": "2", "basis_modes": "run_tests",
                                "modes": "run_tests,exit_code", "pair_contrast": "failed"})
    train = [p for p in builtin_problems() if p.mode in ("run_tests", "exit_code")]
    known = [p for p in train if p.mode == "run_tests"]
    calls = []

    def planted(model, tok, wrappers, problems, prompts, n, cfg, keys, workers):
        calls.append([p.id for p in problems])
        texts, grades = [], []
        for i, p in enumerate(problems):  # every other problem hacks once and fails once
            for j in range(n):
                hack = i % 2 == 0 and j == 0
                texts.append(f"{p.id}-{'hack' if hack else 'fail'}")
                grades.append(Reward(1.25 if hack else 0.25, hack, False, hack, "x", True, p.mode))
        return [[1]] * len(texts), None, texts, grades, {}

    monkeypatch.setattr(run_basis, "sample_graded", planted)
    pairs, report = run_basis.self_pairs(cfg, model, tok, wrappers, train, 1, "model#1")
    assert calls == [[p.id for p in known]]  # only the known modes' problems are sampled
    assert [(p.hack, p.clean) for p in pairs] == [(f"{p.id}-hack", f"{p.id}-fail") for p in known[::2]]
    assert report == {"pairs": len(known[::2]), "problems": len(known),
                      "problems_without_a_pair": [p.id for p in known[1::2]]}
    again, _ = run_basis.self_pairs(cfg, model, tok, wrappers, train, 1, "model#1")  # a hit: no sampling
    assert again == pairs and len(calls) == 1
    other = dataclasses.replace(cfg, detector_fpr=0.01)  # other flags pick other pairs: not this cache's
    run_basis.self_pairs(other, model, tok, wrappers, train, 1, "model#1")
    assert len(calls) == 2 and len(list((tmp_path / "out/pairs").iterdir())) == 2
    cached = next(p for p in (tmp_path / "out/pairs").iterdir() if json.loads(p.read_text())["request"]["detector"]
                  == [1.0, 0.0])
    record = json.loads(cached.read_text())
    record["request"]["samples"] = 99
    cached.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="sampled for a different request \\(samples differ\\)"):
        run_basis.self_pairs(cfg, model, tok, wrappers, train, 1, "model#1")
    with pytest.raises(ConfigError, match="fewer than basis_k=8; raise --self_samples"):
        run_basis.self_pairs(make_config("smoke", {"pairs": "self", "basis_modes": "run_tests"}),
                            model, tok, wrappers, train, 1, "model#2")


def test_the_update_path_works_under_the_smoothed_gate():
    V = torch.eye(3)[:2]
    before = {"a": torch.zeros(3)}
    layer = types.SimpleNamespace(delta_s=torch.nn.Parameter(torch.tensor([-1.0, -1.0, -1.0])))
    # A step of -1 on every coordinate (descent +1: hack-ward on both rows); only row 0's trend V ḡ is hack-ward.
    projection.project_update(before, {"a": layer}, {"a": V}, "smoothed",
                              grad_mean={"a": torch.tensor([0.5, -0.5, 3.0])})
    torch.testing.assert_close(layer.delta_s.detach(), torch.tensor([0.0, -1.0, -1.0]))
    layer.delta_s.data.fill_(-1.0)
    projection.project_update(before, {"a": layer}, {"a": V}, "smoothed", grad_mean={})  # no memory: nothing acts
    torch.testing.assert_close(layer.delta_s.detach(), torch.tensor([-1.0, -1.0, -1.0]))
    cfg = make_config("smoke", {"gate": "smoothed", "adam_leak": "update"})  # no longer refused
    assert cfg.gate == "smoothed"


def test_gated_frac_counts_the_rows_that_act():
    g = torch.tensor([1.0, -1.0, 0.5, 0.0])
    V = torch.eye(4)[:2]
    layer = types.SimpleNamespace(delta_s=torch.nn.Parameter(torch.zeros(4)),
                                  delta_s_hack=torch.nn.Parameter(torch.zeros(4)), r=4)
    layer.delta_s.grad = g.clone()
    assert projection.project_all({"a": layer}, {"a": V}, erase=True)["gated_frac"] == 0.5  # one_sided: row 0
    layer.delta_s.grad = g.clone()
    assert projection.project_all({"a": layer}, {"a": V})["gated_frac"] == 0.0  # measured only


@pytest.mark.parametrize(("overrides", "message"), [
    ({"live_labels": "oracle"}, "--live_labels: labels the live rollouts"),
    ({"pairs": "live"}, "--refresh_every: --pairs=live re-extracts"),
    ({"pairs": "live", "refresh_every": "5", "control": "shuffled"}, "--control: shuffled needs pair texts"),
    ({"pair_contrast": "worse"}, "--pair_contrast: 'worse' is not one of clean, failed"),
    ({"basis_min_margin": "-1"}, "--basis_min_margin: must be >= 0"),
    ({"pairs": "live", "refresh_every": "5", "live_labels": "oracle", "control": "random"},
     "--control: the oracle-labelled ceiling is a diagnostic"),
])
def test_instrument_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("smoke", overrides)


def test_a_checkpoint_keeps_v_the_gates_memory_the_live_buffer_and_the_notes_on_v(tmp_path, tiny):
    _, _, wrappers = tiny
    params = [p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)]
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = make_config("smoke", {"pairs": "live", "refresh_every": "5"})
    saved = run_basis.Basis(cfg, distributed.SINGLE, [], live=[(3, [{"layer": torch.arange(4.0)}])],
                            grad_mean={"layer": torch.arange(6.0)},
                            notes={"basis_margins": {"pairs": 5, "rows": {"layer": [(4, 1)]}}})
    saved.set({"layer": torch.eye(6)[:2]})
    path = checkpoints.save(tmp_path, 3, checkpoints.training_state(wrappers, optimizer, scheduler, saved.state()),
                            [{"step": 3}])
    restored = run_basis.Basis(cfg, distributed.SINGLE, [])
    restored.restore(checkpoints.load(path, wrappers, optimizer, scheduler))
    assert restored.live[0][0] == 3 and torch.equal(restored.live[0][1][0]["layer"], torch.arange(4.0))
    assert torch.equal(restored.V["layer"], torch.eye(6)[:2]) and torch.equal(restored.grad_mean["layer"],
                                                                             torch.arange(6.0))
    assert restored.notes == saved.notes


def test_a_v_emptied_by_its_filters_is_an_error_not_a_silent_vanilla_run():
    D = {"layer": torch.randn(6, 8, generator=torch.Generator().manual_seed(0))}
    basis = hack_basis.basis_from_differences(D, 2, 0.0)
    cfg = make_config("smoke", {"basis_k": "2"})
    assert run_basis.usable(cfg, basis)["layer"].shape == (2, 8)
    with pytest.raises(ConfigError, match="no row of V is left"):
        run_basis.usable(make_config("smoke", {"basis_k": "2", "basis_min_margin": "10"}), basis)


def test_a_refreshed_random_control_draws_new_rows():
    cfg = make_config("smoke", {"pairs": "live", "refresh_every": "1", "control": "random", "basis_k": "2",
                                "group": "2", "mix_ratio": "0", "basis_modes": "run_tests"})
    live = [(1, [{"layer": torch.randn(8)} for _ in range(3)])]
    first = run_basis.live_basis(cfg, live).V["layer"]
    again = run_basis.live_basis(cfg, live).V["layer"]
    later = run_basis.live_basis(cfg, [*live, (6, [])]).V["layer"]
    assert torch.equal(first, again) and not torch.allclose(first, later)


def test_a_checkpoint_from_before_the_knob_space_gate_resumes_only_if_its_gate_remembered_nothing(tmp_path, tiny):
    _, _, wrappers = tiny
    optimizer = torch.optim.AdamW([p for layer in wrappers.values() for p in (layer.delta_s, layer.delta_s_hack)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    empty = run_basis.Basis(make_config("smoke"), distributed.SINGLE, [])
    state = checkpoints.training_state(wrappers, optimizer, scheduler, empty.state())
    path = checkpoints.save(tmp_path, 2, state, [{"step": 2}])
    for trend, resumes in (({}, True), ({"layer": torch.ones(3)}, False)):
        old = torch.load(path / "state.pt", weights_only=False)
        old.pop("grad_mean", None)
        torch.save({**old, "trend": trend}, path / "state.pt")
        if resumes:
            assert checkpoints.load(path, wrappers, optimizer, scheduler)["grad_mean"] == {}
        else:
            with pytest.raises(ConfigError, match="before the smoothed gate kept its memory in knob space"):
                checkpoints.load(path, wrappers, optimizer, scheduler)
