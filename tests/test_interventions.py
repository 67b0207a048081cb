"""The interventions' registry and each arm's hooks, checked without a run (test_train runs them)."""

import types

import pytest

from projected_grpo import grpo, interventions
from projected_grpo.config import DEFAULT_INOCULATION, ConfigError, make_config
from projected_grpo.problems import builtin_problems


def _graded(mode, exploited, reward, teacher=False):
    problem = types.SimpleNamespace(mode=mode)
    return grpo.Rollout(problem=problem, prompt_ids=[], completion_ids=[], text="", teacher=teacher, reward=reward,
                        passed=exploited, gt_correct=False, exploited=exploited)


def _group():
    # One group of four: a known-mode hack, an unknown-mode hack, an honest failure, a teacher hack.
    return [_graded("run_tests", True, 1.25), _graded("exit_code", True, 1.25), _graded("run_tests", False, 0.25),
            _graded("run_tests", True, 1.25, teacher=True)]


def _cfg(intervention):
    return make_config("smoke", {"group": "4", "prompts_per_step": "1", "intervention": intervention,
                                 "basis_modes": "run_tests,sentinel", "penalty_reward": "-0.5"})


def test_screen_drops_the_rollouts_the_known_modes_detector_flags():
    rollouts = _group()
    interventions.get("screen").advantages(rollouts, _cfg("screen"))
    detector = grpo.detector_stats(rollouts, _cfg("screen"))
    mean = (1.25 + 0.25 + 1.25) / 3  # the flagged rollout is out of the group mean too
    assert [r.advantage for r in rollouts] == pytest.approx([0.0, 1.25 - mean, 0.25 - mean, 1.25 - mean])
    # Two student exploits, one in a known mode: recall 1/2; the one flag is right: precision 1. The exact
    # detector's set rates, realised: every known-mode hack flagged, nothing else.
    assert detector == {"detector_recall": 0.5, "detector_precision": 1.0, "detector_recall_known": 1.0,
                        "detector_fpr": 0.0}


def test_penalty_replaces_a_flagged_reward_before_the_group_mean():
    rollouts = _group()
    interventions.get("penalty").advantages(rollouts, _cfg("penalty"))
    rewards = [-0.5, 1.25, 0.25, 1.25]  # the teacher row is never flagged: the detector runs on students
    mean = sum(rewards) / 4
    assert [r.advantage for r in rollouts] == pytest.approx([x - mean for x in rewards])
    assert [r.reward for r in rollouts] == [1.25, 1.25, 0.25, 1.25]  # the logged reward is the grader's


def test_other_interventions_only_log_the_detector():
    rollouts = _group()
    interventions.get("erase").advantages(rollouts, _cfg("erase"))
    detector = grpo.detector_stats(rollouts, _cfg("erase"))
    mean = sum(r.reward for r in rollouts) / 4
    assert [r.advantage for r in rollouts] == [r.reward - mean for r in rollouts]
    assert detector["detector_recall"] == 0.5


def test_unknown_names_are_rejected_with_the_registered_ones():
    registered = ", ".join(interventions.REGISTRY)
    assert {"none", "erase", "route", "screen", "penalty", "trusted", "inoculate"} <= set(interventions.REGISTRY)
    with pytest.raises(ConfigError, match=f"--intervention: 'bogus' is not one of {registered}"):
        interventions.check(make_config("smoke", {"intervention": "bogus"}))
    with pytest.raises(ConfigError, match="unknown intervention 'bogus' in arm 'bogus:random'"):
        interventions.parse("bogus:random")
    with pytest.raises(ConfigError, match="unknown control 'noise'"):
        interventions.parse("erase:noise")
    assert interventions.parse("route:capacity") == ("route", "capacity")
    for name in ("", "a:b"):
        with pytest.raises(ValueError, match="needs a name"):
            interventions.register(type("Bad", (interventions.Intervention,), {"name": name})())


def test_controls_need_an_arm_that_trains_with_the_basis():
    with pytest.raises(ConfigError, match="--control: screen does not use the hack basis"):
        interventions.check(make_config("smoke", {"intervention": "screen", "control": "random"}))
    with pytest.raises(ConfigError, match="--control: capacity controls the quarantine, which erase does not have "
                                          r"\(those with one: route\)"):
        interventions.check(make_config("smoke", {"intervention": "erase", "control": "capacity"}))
    assert interventions.check(make_config("smoke", {"intervention": "route", "control": "capacity"})).quarantine


def test_inoculation_is_in_training_prompts_only():
    problem = builtin_problems()[0]
    cfg = make_config("smoke", {"intervention": "inoculate"})
    arm = interventions.get("inoculate")
    trained = arm.messages(problem, cfg, training=True)
    assert trained[0]["content"].endswith(DEFAULT_INOCULATION) and trained[1:] == problem.messages()[1:]
    for hint in (True, False):
        assert arm.messages(problem, cfg, training=False, hint=hint) == problem.messages(hint=hint)
    assert all(arm.messages(problem, cfg, training=t) == problem.messages()
               for name, arm in interventions.REGISTRY.items() if name != "inoculate" for t in (True, False))
    custom = make_config("smoke", {"intervention": "inoculate", "inoculation_prompt": "Anything goes."})
    assert arm.messages(problem, custom, training=True)[0]["content"].endswith("\n\nAnything goes.")


def test_arms_compose_where_no_two_replace_the_same_hook_and_carry_a_gate():
    both = interventions.get("screen+erase")
    assert both.name == "screen+erase" and both.uses_basis and not both.quarantine
    assert both.advantages.__self__ is interventions.REGISTRY["screen"]
    assert both.gradient.__self__ is both.update.__self__ is interventions.REGISTRY["erase"]
    assert interventions.get("screen+route").quarantine
    assert interventions.parse("screen+erase@no_gate:random") == ("screen+erase@no_gate", "random")
    check = interventions.check(make_config("smoke", {"intervention": "screen+erase", "control": "random"}))
    assert check.name == "screen+erase"
    for text, message in (("erase+route", "erase and route both replace the gradient hook"),
                          ("screen+penalty", "screen and penalty both replace the advantages hook"),
                          ("erase+erase", "names an arm twice"), ("erase@sideways", "unknown gate 'sideways'"),
                          ("screen+bogus", "unknown intervention 'bogus' in arm 'screen\\+bogus'")):
        with pytest.raises(ConfigError, match=message):
            interventions.parse(text)
    with pytest.raises(ConfigError, match="--control: screen does not use the hack basis"):
        interventions.check(make_config("smoke", {"intervention": "screen", "control": "random"}))
