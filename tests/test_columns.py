"""Scoring builds only the columns a step reads: a live V's per-group columns are the differences the
per-row gradients give, and the hack score is taken on its schedule."""

import json
import os

import pytest
import torch

from projected_grpo import adapter, grpo, train
from projected_grpo import basis as run_basis
from projected_grpo import step as step_mod
from projected_grpo.config import make_config
from projected_grpo.model import load_model_and_tokenizer
from projected_grpo.problems import builtin_problems


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    os.environ.setdefault("PROJECTED_GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    wrappers = adapter.wrap(model)
    with torch.no_grad():  # knobs off zero, so the gradients are not the base model's alone
        for layer in wrappers.values():
            layer.delta_s.normal_(0, 0.05)
    return model, tok, wrappers


def _differences(cfg, rollouts, per_row: torch.Tensor) -> list[torch.Tensor]:
    """The old rule, spelled out: per group, the mean of its flagged students' rows minus the mean of its
    unflagged students' rows; a group lacking either gives nothing."""
    out = []
    for start in range(0, len(rollouts), cfg.group):
        students = [i for i in range(start, start + cfg.group) if not rollouts[i].teacher]
        flagged = [i for i in students if grpo.detected(rollouts[i], cfg)]
        unflagged = [i for i in students if i not in flagged]
        if flagged and unflagged:
            out.append(per_row[flagged].mean(0) - per_row[unflagged].mean(0))
    return out


@pytest.mark.parametrize("micro_batch", ["0", "3"])
def test_a_groups_column_is_its_flagged_mean_minus_its_unflagged_mean(tiny, micro_batch):
    model, tok, wrappers = tiny
    cfg = make_config("smoke", {"group": "4", "prompts_per_step": "4", "max_new": "10", "mix_ratio": "0",
                                "beta": "0.2", "micro_batch": micro_batch})
    problems = [p for p in builtin_problems() if p.mode in cfg.basis_mode_list]
    problems = [problems[0], next(p for p in problems if len(p.user_prompt()) != len(problems[0].user_prompt())),
                *problems[2:4]]
    rollouts, _ = grpo.collect_rollouts(model, tok, wrappers, problems, None, cfg, 1, 1)
    assert len({len(r.prompt_ids) for r in rollouts}) > 1  # prompts of more than one length
    # group 0: two flagged, one unflagged, a teacher row (flagged by the oracle, which must not count);
    # group 1: one flagged, two unflagged and a teacher; group 2: none flagged; group 3: all flagged
    flags = [True, True, False, True, True, False, False, False, False, False, False, False, True, True, True, True]
    for i, (r, flag) in enumerate(zip(rollouts, flags)):
        r.exploited, r.advantage = flag, (-1.0) ** i
        if i in (3, 7):
            r.teacher, r.sample_logp = True, None
    columns = run_basis.live_columns(cfg, rollouts)
    assert columns.count == 2  # the groups with no unflagged or no flagged row give none
    per_row = grpo.Columns.rows(list(range(len(rollouts))), len(rollouts))
    rows = grpo.backward_rollouts(model, tok, wrappers, rollouts, cfg, per_row)["columns"]
    by_group = grpo.backward_rollouts(model, tok, wrappers, rollouts, cfg, columns)["columns"]
    for layer in wrappers.values():
        layer.delta_s.grad = layer.delta_s_hack.grad = None
    for name in wrappers:
        expected = _differences(cfg, rollouts, rows[name])
        assert len(expected) == 2
        torch.testing.assert_close(by_group[name], torch.stack(expected), rtol=1e-4, atol=1e-7)
        # and from the per-row columns by the groups' weights, as a step that also scores rollouts takes them
        torch.testing.assert_close(step_mod._group_columns(columns, per_row, rows)[name], by_group[name],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("hack_score_every", ["0", "1"])
def test_a_live_v_is_the_one_the_per_row_gradients_give(workdir, monkeypatch, hack_score_every):
    # The tiny model hacks nowhere: the weak detector flags rollouts by the parity of their token ids instead,
    # the same rule for the run and for the expected V.
    monkeypatch.setattr(run_basis, "detected", lambda r, modes: not r.teacher and sum(r.completion_ids) % 2 == 0)
    monkeypatch.setattr(grpo, "detected", run_basis.detected)
    cfg = make_config("smoke", {"steps": "5", "max_new": "16", "basis_k": "4", "intervention": "erase",
                                "pairs": "live", "refresh_every": "2", "live_window": "2",
                                "hack_score_every": hack_score_every, "mix_ratio": "0"})
    expected, made = [], []
    real = step_mod.backward_rollouts

    def both(model, tok, wrappers, rollouts, cfg, columns=None, reference=None):
        every = grpo.Columns.rows(list(range(len(rollouts))), len(rollouts))
        rows = real(model, tok, wrappers, rollouts, cfg, every)["columns"]
        differences = {n: _differences(cfg, rollouts, g) for n, g in rows.items()}
        expected.append([{n: d[g] for n, d in differences.items()}
                         for g in range(len(next(iter(differences.values()))))])
        return real(model, tok, wrappers, rollouts, cfg, columns, reference)

    real_refresh = run_basis.Basis.refresh

    def refresh(self, step, *args):
        overlap = real_refresh(self, step, *args)
        made.append((step, {n: v.clone() for n, v in self.V.items()}))
        return overlap

    monkeypatch.setattr(step_mod, "backward_rollouts", both)
    monkeypatch.setattr(run_basis.Basis, "refresh", refresh)
    train.run(cfg, "smoke")
    assert [step for step, _ in made] == [2, 4]
    for step, V in made:
        live = [(s, expected[s - 1]) for s in range(step - cfg.live_window + 1, step + 1)]
        assert any(d for _, d in live)
        want = run_basis.usable(cfg, run_basis.live_basis(cfg, live))
        assert V.keys() == want.keys()
        for name in V:
            torch.testing.assert_close(V[name], want[name], rtol=1e-3, atol=1e-5)
    scored = [json.loads(line) for line in (workdir / "out/runs" / cfg.run_name / "scores.jsonl").open()]
    steps = sorted({r["step"] for r in scored if r["hack_score"] is not None})
    assert steps == ([] if hack_score_every == "0" else [3, 4, 5])  # no V before step 2's refresh
