"""The model organism's build and the organism preset's wiring, on a miniature recipe (seconds).

The full organism (minutes of SFT, then GRPO runs of minutes each) is a recipe and a documented
result (docs/organism.md), not a test.
"""

import json

import pytest

from projected_grpo import organism, train
from projected_grpo.config import MODES, make_config
from projected_grpo.model import encode_prompt, load_model_and_tokenizer
from projected_grpo.problems import load_problems, split_held_out


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(organism.RECIPE, "phases", [[4, 3e-3, [0.3, 0.3, 0.4]], [2, 1e-3, [0.1, 0.2, 0.7]]])
    monkeypatch.setitem(organism.RECIPE, "sample_per_problem", 1)
    monkeypatch.setitem(organism.RECIPE, "shape", {"hidden": 16, "layers": 1, "intermediate": 32, "heads": 2,
                                                   "kv_heads": 1, "head_dim": 8})
    return tmp_path


def test_build_is_cached_by_its_recipe_and_loads_by_path(tiny_recipe):
    path = organism.build(seed=0)
    assert path == organism.directory(0) and path.parent == organism.ROOT
    rates = json.loads((path / "rates.json").read_text())
    assert set(rates["per_mode"]) <= set(MODES) and json.loads((path / "recipe.json").read_text())["seed"] == 0
    assert 0 <= rates["hack"] <= 1 and rates["n"] > 0 and rates["examples"]["hack"] > 0
    assert organism.build(seed=0) == path  # a cache hit: nothing rebuilt
    assert organism.directory(1) != path  # the seed is part of the recipe
    model, tok = load_model_and_tokenizer(str(path))
    assert model.config.hidden_size == 16 and tok.pad_token_id is not None
    assert organism.resolve_model("organism") == str(path) and organism.resolve_model("tiny-random") == "tiny-random"


def test_sft_data_never_holds_a_held_out_problem(tiny_recipe):
    spec = organism.recipe(0)
    problems = load_problems(spec["problems"])
    train_problems, held_out = split_held_out(problems, spec["eval_prompts"])
    assert [p.id for p in organism.training_problems(spec)] == [p.id for p in train_problems]
    _, tok = load_model_and_tokenizer("tiny-random")
    examples = organism._examples(organism.training_problems(spec), tok, spec)
    prompts = {tuple(prompt) for rows in examples.values() for prompt, _ in rows}
    assert not prompts & {tuple(encode_prompt(tok, p.messages())) for p in held_out}
    assert all(len(ids) <= spec["max_new"] for rows in examples.values() for _, ids in rows)


def test_organism_preset_trains_on_the_built_model(tiny_recipe):
    cfg = make_config("organism", {"steps": "2", "max_new": "16", "group": "2", "prompts_per_step": "2",
                                   "eval_samples": "1", "basis_k": "2"})
    summary = train.run(cfg, preset="organism")
    rows = [json.loads(line) for line in (tiny_recipe / "out/runs/organism-erase-s0/metrics.jsonl").read_text()
            .splitlines()]
    assert summary["complete"] and all("format_s" in r and "repeat_s" in r for r in rows)
    assert (organism.directory(0) / "rates.json").exists()  # built on first use
