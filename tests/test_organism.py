"""The model organism's build and the organism preset's wiring, on a miniature recipe (seconds).

The full organism (minutes of SFT, then GRPO runs of minutes each) is a recipe and a documented
result (docs/organism.md), not a test.
"""

import json

import pytest

from projected_grpo import organism, train
from projected_grpo.config import MODES, ConfigError, make_config
from projected_grpo.model import encode_prompt, load_model_and_tokenizer


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
    real_sft = organism._sft
    organism._sft = None  # a second build would call it
    try:
        assert organism.build(seed=0) == path  # a cache hit: nothing rebuilt
    finally:
        organism._sft = real_sft
    assert organism.directory(1) != path  # the seed is part of the recipe
    model, tok = load_model_and_tokenizer(str(path))
    assert model.config.hidden_size == 16 and tok.pad_token_id is not None
    assert organism.resolve_model("organism") == str(path) and organism.resolve_model("tiny-random") == "tiny-random"


def test_sft_data_never_holds_a_held_out_problem(tiny_recipe):
    spec = organism.recipe(0)
    _, held_out = train.split_problems(make_config("organism"))  # what an organism run holds out
    _, tok = load_model_and_tokenizer("tiny-random")
    examples = organism._examples(organism.training_problems(spec), tok, spec)
    prompts = {tuple(prompt) for rows in examples.values() for prompt, _ in rows}
    assert not prompts & {tuple(encode_prompt(tok, p.messages())) for p in held_out}
    assert all(len(ids) <= spec["max_new"] for rows in examples.values() for _, ids in rows)


def test_a_run_that_would_evaluate_on_sft_problems_is_refused(tiny_recipe):
    path = organism.build(seed=0)
    sft = json.loads((path / "recipe.json").read_text())["sft_problems"]
    organism.check_unseen(str(path), ["not-a-training-problem"])
    with pytest.raises(ConfigError, match="were in the SFT data"):
        organism.check_unseen(str(path), sft[:1])
    with pytest.raises(ConfigError, match="were in the SFT data"):  # another split moves held-out problems
        train.run(make_config("organism", {"steps": "1", "eval_prompts": "12"}), preset="organism")


def test_organism_preset_trains_on_the_built_model(tiny_recipe):
    cfg = make_config("organism", {"steps": "2", "max_new": "16", "group": "2", "prompts_per_step": "2",
                                   "eval_samples": "1", "basis_k": "2"})
    summary = train.run(cfg, preset="organism")
    rows = [json.loads(line) for line in (tiny_recipe / "out/runs/organism-erase-s0/metrics.jsonl").read_text()
            .splitlines()]
    assert summary["complete"] and all("format_s" in r and "repeat_s" in r for r in rows)
    assert (organism.directory(0) / "rates.json").exists()  # built on first use
    config = json.loads((tiny_recipe / "out/runs/organism-erase-s0/config.json").read_text())
    assert config["model_path"] == str(organism.directory(0))  # a resume or evaluation loads this very build
