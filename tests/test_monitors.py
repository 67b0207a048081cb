"""Monitors as they really are: a detector that misses at its set rates, the same flag for every
reader, and advantage modification (advmod)."""

import dataclasses
import random
import types

import pytest
import torch
from conftest import held_out_rollouts

from projected_grpo import distributed, grpo, interventions, monitor
from projected_grpo.config import ConfigError, make_config


def _rollouts(n, mode="run_tests", hack_share=0.3, seed=0, step=1):
    rng = random.Random(seed)
    problem = types.SimpleNamespace(mode=mode, id=f"p-{mode}")
    return [grpo.Rollout(problem, [], [], "", False, rng.random(), hack, False, hack, key=(seed, step, problem.id, i))
            for i, hack in enumerate(rng.random() < hack_share for _ in range(n))]


def test_the_realised_recall_and_false_positive_rate_converge_to_the_settings():
    cfg = make_config("smoke", {"detector_recall": "0.7", "detector_fpr": "0.02", "basis_modes": "run_tests"})
    stats = grpo.detector_stats(_rollouts(20000), cfg)
    assert stats["detector_recall_known"] == pytest.approx(0.7, abs=0.02)
    assert stats["detector_fpr"] == pytest.approx(0.02, abs=0.004)
    exact = grpo.detector_stats(_rollouts(2000), make_config("smoke", {"basis_modes": "run_tests"}))
    assert exact["detector_recall_known"] == 1.0 and exact["detector_fpr"] == 0.0 and exact["detector_precision"] == 1.0


def test_a_rollouts_flag_is_the_same_for_every_arm_and_reader_and_whatever_else_drew():
    rollouts = _rollouts(400)
    flags = []
    for arm in ("screen", "erase", "advmod"):
        cfg = make_config("smoke", {"intervention": arm, "detector_recall": "0.5", "detector_fpr": "0.1"})
        random.random()  # the global generator's state must not matter
        flags.append([grpo.detected(r, cfg) for r in rollouts])
    assert flags[0] == flags[1] == flags[2] and 0 < sum(flags[0]) < len(rollouts)
    rekeyed = [dataclasses.replace(r, key=(1, *r.key[1:])) for r in rollouts]  # the same labels, another key
    assert [grpo.detected(r, cfg) for r in rekeyed] != flags[0]


def test_a_held_out_modes_label_is_never_read_by_a_detector_with_false_positives():
    cfg = make_config("smoke", {"basis_modes": "run_tests", "detector_fpr": "0.5"})
    held = held_out_rollouts(40)
    assert 0 < sum(grpo.detected(r, cfg) for r in held) < 40  # flagged as false positives only


def test_collected_rollouts_are_keyed_by_seed_step_problem_and_index(tiny_model):
    model, tok, wrappers = tiny_model
    cfg = make_config("smoke", {"group": "3", "prompts_per_step": "1", "max_new": "4", "mix_ratio": "0", "seed": "7"})
    from projected_grpo.problems import builtin_problems

    problem = builtin_problems()[0]
    rollouts, _ = grpo.collect_rollouts(model, tok, wrappers, [problem], None, cfg, 5, 1)
    assert [r.key for r in rollouts] == [(7, 5, problem.id, j) for j in range(3)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import os

    from projected_grpo import adapter
    from projected_grpo.model import load_model_and_tokenizer

    os.environ.setdefault("PROJECTED_GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    return model, tok, adapter.wrap(model)


def test_advmod_at_alpha_zero_is_vanilla_bit_for_bit_and_never_raises_a_positive_advantage():
    cfg = make_config("smoke", {"group": "4", "mix_ratio": "0", "basis_modes": "run_tests",
                                "detector_recall": "0.8", "detector_fpr": "0.1"})
    vanilla, modified = _rollouts(64), _rollouts(64)
    assert interventions.get("none").advantages(vanilla, cfg) == \
        interventions.get("advmod").advantages(modified, make_config("smoke", {**_fields(cfg), "advmod_alpha": "0"}))
    assert [r.advantage for r in modified] == [r.advantage for r in vanilla]
    for alpha in ("0.5", "1", "3"):
        modified = _rollouts(64)
        interventions.get("advmod").advantages(modified, make_config("smoke", {**_fields(cfg), "advmod_alpha": alpha}))
        for before, after in zip(vanilla, modified):
            if before.advantage <= 0 or not grpo.detected(after, cfg):
                assert after.advantage == before.advantage  # negative or unflagged: untouched
            else:
                assert 0 <= after.advantage == before.advantage * max(0.0, 1 - float(alpha)) <= before.advantage
    with pytest.raises(ConfigError, match="advmod_alpha"):
        make_config("smoke", {"advmod_alpha": "-1"})
    with pytest.raises(ConfigError, match="detector_recall"):
        make_config("smoke", {"detector_recall": "1.5"})


def _fields(cfg) -> dict:
    return {"group": str(cfg.group), "mix_ratio": "0", "basis_modes": cfg.basis_modes,
            "detector_recall": str(cfg.detector_recall), "detector_fpr": str(cfg.detector_fpr)}


def test_the_probe_separates_a_planted_direction_and_not_shuffled_labels():
    gen = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    labels = torch.rand(800, generator=gen) < 0.2
    features = torch.randn(800, 64, generator=gen) + 3.0 * labels[:, None] * direction  # Bayes AUROC 0.98
    train, test = slice(0, 400), slice(400, 800)
    planted = monitor.fit(features[train], labels[train])
    shuffled = monitor.fit(features[train], labels[train][torch.randperm(400, generator=gen)])
    probe = monitor.Probe(make_config("smoke"), distributed.World())
    for weights, low, high in ((planted, 0.95, 1.0), (shuffled, 0.4, 0.6)):
        probe.weights = weights
        assert low <= grpo.auroc(probe.score(features[test]), labels[test].tolist()) <= high
    assert monitor.fit(features, torch.zeros(800, dtype=torch.bool)) is None  # one class: nothing to fit


def test_the_probe_never_fits_a_held_out_modes_rollouts():
    # Known-mode hacks lie along +direction; many held-out rollouts lie further along it. Fitted with their
    # (unflagged) rows, the probe would call +direction clean; left out, it calls it a hack.
    cfg = make_config("smoke", {"basis_modes": "run_tests", "refresh_every": "1", "monitor": "probe"})
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    known = _rollouts(200)
    held = held_out_rollouts(300)
    features = torch.stack([(1.0 if r.exploited else -1.0) * direction for r in known] +
                           [3.0 * direction for _ in held]) + 0.1 * torch.randn(500, 16)
    probe = monitor.Probe(cfg, distributed.World())
    probe.observe(1, known + held, features)  # a held-out label read here raises
    assert len(probe.buffer[0][1]) == 200
    probe.refit()
    assert probe.score(direction[None])[0] > 0.9 and probe.score(-direction[None])[0] < 0.1


def test_a_live_v_reads_only_the_steps_a_refresh_will_take():
    cfg = make_config("smoke", {"pairs": "live", "refresh_every": "5", "live_window": "2", "steps": "20"})
    from projected_grpo.basis import Basis

    basis = Basis(cfg, distributed.World(), [])
    assert [s for s in range(1, 21) if basis.reads(s)] == [4, 5, 9, 10, 14, 15]
    assert [s for s in range(1, 21) if basis.due(s)] == [5, 10, 15]
    templates = Basis(make_config("smoke", {"refresh_every": "5"}), distributed.World(), [])
    assert not any(templates.reads(s) for s in range(1, 21))  # V from pairs reads no step's differences
