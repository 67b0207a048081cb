"""The pieces of one GRPO step, checked against hand computations."""

import math

import torch

from projected_grpo import grpo
from projected_grpo.config import make_config
from projected_grpo.model import cut_at_eos


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


def test_completion_ends_at_the_first_stop_token():
    assert cut_at_eos([5, 6, 2, 7, 2, 0, 0], [2]) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], [2]) == [5, 6, 7]  # cut by max_new: no EOS to keep
    assert cut_at_eos([5, 9, 6, 2], [2, 9]) == [5, 9]  # any of several stop ids
    assert cut_at_eos([0, 0, 2], [2]) == [0, 0, 2]  # a pad-valued token the model wrote is kept
