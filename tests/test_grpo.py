"""The pieces of one GRPO step, checked against hand computations."""

import math
import os
import warnings

import pytest
import torch

from projected_grpo import adapter, grpo
from projected_grpo.config import make_config
from projected_grpo.model import load_model_and_tokenizer
from projected_grpo.problems import builtin_problems
from projected_grpo.scoring import pad_batch, token_logprobs


def _rollout(reward):
    return grpo.Rollout(problem=None, prompt_ids=[], completion_ids=[], text="", teacher=False, reward=reward,
                        passed=False, gt_correct=False, exploited=False)


def test_dr_grpo_advantage_is_reward_minus_group_mean_and_counts_flat_groups():
    rollouts = [_rollout(r) for r in (1.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25)]
    zero_spread = grpo.group_advantages(rollouts, group=4)
    assert [r.advantage for r in rollouts[:4]] == [0.75, -0.25, -0.25, -0.25]  # no division by the std
    assert all(r.advantage == 0 for r in rollouts[4:])
    assert zero_spread == 1


def test_loss_is_the_fixed_denominator_policy_gradient_plus_k3():
    cfg = make_config("smoke", {"group": "4", "max_new": "8", "prompts_per_step": "2", "beta": "0.5"})
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -0.5])
    denom = cfg.group * cfg.max_new * cfg.prompts_per_step
    # At the sampling policy the ratio is 1: the loss is -sum(A * mask) / denom, and K3 is 0 at ref == logp.
    loss = grpo.policy_loss(logp, logp.detach(), logp.detach(), adv, mask, cfg)
    assert math.isclose(loss.item(), -(1.0 * 2 - 0.5 * 2) / denom, rel_tol=1e-6)
    loss.backward()
    expected = -(adv[:, None] * mask) / denom  # d/dlogp of -A * ratio, plus K3's zero slope at ref == logp
    torch.testing.assert_close(logp.grad, expected)
    ref = logp.detach() - 0.1  # K3 = exp(d) - d - 1 with d = ref - logp = -0.1 per masked token
    k3 = math.exp(-0.1) + 0.1 - 1
    with_kl = grpo.policy_loss(logp, logp.detach(), ref, torch.zeros(2), mask, cfg)
    assert math.isclose(with_kl.item(), cfg.beta * k3 * mask.sum().item() / denom, rel_tol=1e-5)


def test_importance_weight_scales_the_policy_term_only():
    cfg = make_config("smoke", {"group": "2", "max_new": "4", "prompts_per_step": "1", "beta": "0.5"})
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    ref = logp.detach() - 0.1
    weight = torch.tensor([[0.5, 2.0]])
    plain = grpo.policy_loss(logp, logp.detach(), ref, adv, mask, cfg)
    weighted = grpo.policy_loss(logp, logp.detach(), ref, adv, mask, cfg, is_weight=weight)
    denom = cfg.group * cfg.max_new * cfg.prompts_per_step
    # The policy term -A * ratio per token becomes -A * w; the K3 term is unchanged.
    assert math.isclose(weighted.item() - plain.item(), -(0.5 + 2.0 - 2) / denom, rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("PROJECTED_GRPO_CACHE")
    os.environ["PROJECTED_GRPO_CACHE"] = str(cache)
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    wrappers = adapter.wrap(model)
    with torch.no_grad():  # knobs away from zero, so the merged weights are really merged
        for layer in wrappers.values():
            layer.delta_s.normal_(0, 0.05)
    yield model, tok, wrappers
    if old is None:
        os.environ.pop("PROJECTED_GRPO_CACHE")
    else:
        os.environ["PROJECTED_GRPO_CACHE"] = old


def _student_rollouts(tiny, cfg, perturb: float):
    """Two groups of student rollouts, sampled through merged weights perturbed by `perturb` (std)."""
    model, tok, wrappers = tiny
    problems = builtin_problems()[:cfg.prompts_per_step]
    real_generate = grpo.generate_completions

    def perturbed_generate(*args, **kw):
        # A sampler whose weights are not the scored ones, as bf16 merging makes them.
        held = {n: layer._merged_weight for n, layer in wrappers.items()}
        gen = torch.Generator().manual_seed(1)
        for layer in wrappers.values():
            w = layer._merged_weight
            layer._merged_weight = w + perturb * torch.randn(w.shape, generator=gen)
        try:
            return real_generate(*args, **kw)
        finally:
            for n, layer in wrappers.items():
                layer._merged_weight = held[n]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "generate_completions", perturbed_generate)
        rollouts, _ = grpo.collect_rollouts(model, tok, wrappers, problems, None, cfg, 1, 1)
    for i, r in enumerate(rollouts):
        r.advantage = 1.0 if i % 2 else -1.0
    return rollouts


@pytest.mark.parametrize("perturb", [0.0, 0.05])
def test_sample_kl_measures_the_sampler_mismatch_and_is_correction_weights_by_it(tiny, perturb, monkeypatch):
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"group": "3", "prompts_per_step": "2", "max_new": "12", "mix_ratio": "0",
                                "is_correction": "true", "is_cap": "1.05"})
    rollouts = _student_rollouts(tiny, cfg, perturb)
    assert all(len(r.sample_logp) == len(r.completion_ids) for r in rollouts)
    # The scored log-probs, computed independently of backward_rollouts.
    ids, attn, comp = pad_batch([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                tok.pad_token_id)
    with torch.no_grad(), adapter.merged(wrappers):
        scored = token_logprobs(model, ids, attn, comp)
    delta = torch.cat([scored[i, -len(r.completion_ids):] - torch.tensor(r.sample_logp)
                       for i, r in enumerate(rollouts)])
    weights = []
    real_loss = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **kw: weights.append(a[-1]) or real_loss(*a, **kw))
    out = grpo.backward_rollouts(model, tok, wrappers, rollouts, cfg)
    for layer in wrappers.values():
        layer.delta_s.grad = None
    assert out["sampled_tokens"] == delta.numel()  # the sums come with their count, so ranks can add them
    mean = {k: out[k] / out["sampled_tokens"] for k in ("sample_kl", "sample_dlogp", "is_truncated")}
    assert math.isclose(mean["sample_kl"], float((delta.exp() - 1 - delta).mean()), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(mean["sample_dlogp"], float(delta.abs().mean()), rel_tol=1e-4, abs_tol=1e-7)
    got = torch.cat([weights[0][i][comp[i].bool()] for i in range(len(rollouts))])
    torch.testing.assert_close(got, delta.exp().clamp(max=1.05), rtol=1e-4, atol=1e-6)
    if perturb:
        assert mean["sample_kl"] > 1e-3 and mean["is_truncated"] > 0 and (got < 1).any()
    else:  # fp32 on CPU: the sampler and the scorer agree
        assert mean["sample_kl"] < 1e-8 and mean["sample_dlogp"] < 1e-4


@pytest.mark.parametrize("micro_batch", ["0", "3"])
def test_the_loss_gradient_of_each_kind_is_that_of_whole_rows(tiny, micro_batch):
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"group": "4", "prompts_per_step": "2", "max_new": "10", "mix_ratio": "0",
                                "beta": "0.3", "micro_batch": micro_batch})
    rollouts = _student_rollouts(tiny, cfg, 0.0)
    for r in rollouts[2:4] + rollouts[7:]:  # teacher rows within each group: they share its prompt
        r.teacher, r.sample_logp = True, None
    per_row = grpo.Columns.rows(list(range(len(rollouts))), len(rollouts))
    outs, scored = [], []
    for columns in (None, per_row):  # the loss's gradient is the same whether or not columns are asked for
        outs.append(grpo.backward_rollouts(model, tok, wrappers, rollouts, cfg, columns))
        scored.append({n: (layer.delta_s.grad, layer.delta_s_hack.grad) for n, layer in wrappers.items()})
        for layer in wrappers.values():
            layer.delta_s.grad = layer.delta_s_hack.grad = None
    assert "columns" not in outs[0]
    knobs = [layer.delta_s for layer in wrappers.values()]
    expected_loss, expected_grad = 0.0, {name: 0.0 for name in wrappers}
    for kind, key in ((False, "g_student"), (True, "g_teacher")):
        rows = [r for r in rollouts if r.teacher == kind]
        ids, attn, comp = pad_batch([r.prompt_ids for r in rows], [r.completion_ids for r in rows], tok.pad_token_id)
        with adapter.scoring(wrappers):
            logp = token_logprobs(model, ids, attn, comp)
            with torch.no_grad(), adapter.zeroed(wrappers):
                ref = token_logprobs(model, ids, attn, comp)
        advantages = torch.tensor([r.advantage for r in rows])
        loss = grpo.policy_loss(logp, logp.detach(), ref, advantages, comp.float(), cfg)
        expected_loss += loss.item()
        for name, g in zip(wrappers, torch.autograd.grad(loss, knobs)):
            for out in outs:
                torch.testing.assert_close(out[key][name], g, rtol=1e-4, atol=1e-8)
            expected_grad[name] = expected_grad[name] + g
    for out, knob_grads in zip(outs, scored):
        assert math.isclose(out["loss"], expected_loss, rel_tol=1e-4, abs_tol=1e-7)  # a sum that nearly cancels
        for name, (main, quarantine) in knob_grads.items():  # both knobs hold the loss's gradient over all rows
            torch.testing.assert_close(main, expected_grad[name], rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(quarantine, expected_grad[name], rtol=1e-4, atol=1e-8)
    for i, r in enumerate(rollouts):  # each per-row column is its rollout's, whatever micro-batch and kind held it
        ids, attn, comp = pad_batch([r.prompt_ids], [r.completion_ids], tok.pad_token_id)
        with adapter.scoring(wrappers):
            alone = torch.autograd.grad(-token_logprobs(model, ids, attn, comp).sum() / cfg.max_new, knobs)
        for name, g in zip(wrappers, alone):
            torch.testing.assert_close(outs[1]["columns"][name][i], g, rtol=1e-4, atol=1e-8)


def test_the_kl_term_does_not_warn(tiny):
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"group": "2", "prompts_per_step": "1", "max_new": "8", "mix_ratio": "0",
                                "beta": "0.1"})
    rollouts = _student_rollouts(tiny, cfg, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad warns
        out = grpo.backward_rollouts(model, tok, wrappers, rollouts, cfg)
    for layer in wrappers.values():
        layer.delta_s.grad = None
    assert out["kl"] >= 0


def test_auroc_counts_ties_half_and_needs_both_classes():
    assert grpo.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert grpo.auroc([0.1, 0.2, 0.9], [True, False, False]) == 0.0
    assert grpo.auroc([0.5, 0.5], [True, False]) == 0.5
    assert grpo.auroc([0.3, 0.4], [False, False]) is None


def test_samples_are_graded_under_the_configured_time_limit_in_row_order(monkeypatch):
    cfg = make_config("smoke", {"grade_seconds": "1"})
    model, tok = load_model_and_tokenizer("tiny-random")
    problem = builtin_problems()[0]
    loop = "```python\nwhile True:\n    pass\n```"
    texts = [loop, "no code", "```python\nprint(1)\n```"]

    def fake_sample(model, tok, wrappers, prompts, n, cfg, keys, on_finished):
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        for i in (2, 0):  # handed on out of order, as rows stop
            on_finished(i, ids[i])
        on_finished(1, ids[1])
        return ids, [[0.0] * len(row) for row in ids]

    made, real_grading = [], grpo.Grading
    monkeypatch.setattr(grpo, "sample", fake_sample)
    monkeypatch.setattr(grpo, "Grading", lambda workers, limits: made.append(limits) or real_grading(workers, limits))
    _, _, got, grades, timings = grpo.sample_graded(model, tok, {}, [problem], [[1, 2]], 3, cfg, [(0,)], 2)
    assert (made[0].cpu_seconds, made[0].wall_seconds) == (1, 2.0)
    assert got == texts
    assert grades[0].format_ok and not grades[0].passed  # the loop was stopped, and failed
    assert grades[1].mechanism == "no_code" and grades[2].format_ok
    assert set(timings) == {"t_generate", "t_grade"}
