"""End to end, without D's definition: does erasing the hack-ward gradient really slow the hack down?

A flipped sign anywhere (V's orientation, the gate, the projection, the loss) passes every
mechanics test that reuses the same definitions; this one measures log p(hack) itself.
"""

import pytest
import torch

from projected_grpo import adapter, hack_basis, projection
from projected_grpo.config import make_config
from projected_grpo.grpo import Rollout, backward_rollouts
from projected_grpo.model import encode_completion, encode_prompt, load_model_and_tokenizer
from projected_grpo.problems import builtin_problems
from projected_grpo.scoring import pad_batch, token_logprobs
from projected_grpo.templates import default_pairs

LR = 5.0  # plain SGD on the knobs: large enough to move log p(hack) well above float noise
MAX_NEW = 64  # the loss normaliser


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROJECTED_GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
        model, tok = load_model_and_tokenizer("tiny-random", seed=0)
        wrappers = adapter.wrap(model)
    problems = builtin_problems()
    pairs = default_pairs(modes=("run_tests",), problems=problems)
    # V from four pairs; the GRPO step below is on a fifth problem the basis never saw. Extraction scores
    # texts to their end, so the step takes whole texts too, under the same normaliser.
    V = hack_basis.extract_basis(model, tok, wrappers, pairs[:4], k=8, max_new=MAX_NEW).V
    unseen = pairs[6]
    problem = next(p for p in problems if p.id == unseen.problem_id)
    return model, tok, wrappers, V, unseen, problem


def _change_in_log_p_hack(setup, arm: str, gate: str) -> float:
    """One SGD step on a GRPO loss whose group rewards the hack over the clean answer, with the
    arm's projection; returns the change in the hack completion's log-probability."""
    model, tok, wrappers, V, pair, problem = setup
    cfg = make_config("smoke", {"max_new": str(MAX_NEW), "group": "2", "prompts_per_step": "1", "mix_ratio": "0"})
    prompt = encode_prompt(tok, pair.messages)
    hack, clean = encode_completion(tok, pair.hack, None), encode_completion(tok, pair.clean, None)

    def log_p_hack():
        ids, attn, comp = pad_batch([prompt], [hack], tok.pad_token_id)
        with torch.no_grad():
            return float(token_logprobs(model, ids, attn, comp).sum())

    group = [Rollout(problem, prompt, hack, pair.hack, False, 1.25, True, False, True, advantage=0.5),
             Rollout(problem, prompt, clean, pair.clean, False, 0.25, False, True, False, advantage=-0.5)]
    backward_rollouts(model, tok, wrappers, group, cfg)
    projection.project_all(wrappers, V, erase=arm == "erase", gate=gate)
    before, knobs = log_p_hack(), {name: layer.delta_s.detach().clone() for name, layer in wrappers.items()}
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s -= LR * layer.delta_s.grad
            layer.delta_s.grad = None
    change = log_p_hack() - before
    with torch.no_grad():
        for name, layer in wrappers.items():
            layer.delta_s.copy_(knobs[name])
    return change


def test_plain_step_raises_the_hack_erase_raises_it_less_reverse_lowers_it(setup):
    plain = _change_in_log_p_hack(setup, "none", "one_sided")
    erased = _change_in_log_p_hack(setup, "erase", "one_sided")
    reversed_ = _change_in_log_p_hack(setup, "erase", "reverse")
    assert plain > 1e-3  # the GRPO step makes the hack more likely
    assert erased < plain / 2  # the erased step, much less so
    assert reversed_ < 0  # the reversed one makes it less likely
