"""Export: a run's checkpoint as a plain transformers checkpoint, knobs merged, quarantine ablated unless kept."""

import contextlib
import json

import pytest
import torch
from conftest import module_workdir
from transformers import AutoModelForCausalLM

from projected_grpo import adapter, export, train
from projected_grpo.config import make_config
from projected_grpo.evaluate import evaluate, find_checkpoint, load_checkpoint_model, read_run
from projected_grpo.model import load_model_and_tokenizer
from projected_grpo.problems import load_problems


@pytest.fixture(scope="module")
def route_run(tmp_path_factory):
    """A 3-step route run on the smoke preset, both knobs moved, with its end-of-run evaluation."""
    with module_workdir(tmp_path_factory, "export") as root:
        train.run(make_config("smoke", {"steps": "3", "max_new": "16", "basis_k": "4", "intervention": "route",
                                        "run_name": "route", "eval_samples": "2"}))
        yield root, root / "out/runs/route"


def _adapter_model(run_dir):
    cfg, held_out, model_path = read_run(run_dir)
    return cfg, held_out, *load_checkpoint_model(cfg, model_path, find_checkpoint(run_dir, None)[0])


@pytest.mark.parametrize("keep", [False, True])
def test_exported_checkpoint_gives_the_adapter_models_logits(route_run, keep):
    root, run_dir = route_run
    out = root / f"exported-{keep}"
    assert export.main([str(run_dir), "--out", str(out)] + (["--keep_quarantine"] if keep else [])) == 0
    _, _, model, _, wrappers = _adapter_model(run_dir)
    assert all(w.delta_s_hack.abs().sum() > 0 for w in wrappers.values())  # route moved the quarantine
    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    with torch.no_grad(), contextlib.nullcontext() if keep else adapter.ablate_quarantine(wrappers):
        expected = model(ids).logits
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = exported(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "arm: `route`" in card and ("**kept**" in card) == keep and '"intervention": "route"' in card
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_the_packages_evaluate_on_the_export_matches_the_runs_deployed_evaluation(route_run):
    root, run_dir = route_run
    out = root / "exported-eval"
    step = export.export(run_dir, out)
    cfg, held_out, _ = read_run(run_dir)
    model, tok = load_model_and_tokenizer(str(out), dtype=cfg.dtype, seed=cfg.seed)
    by_id = {p.id: p for p in load_problems(cfg.problems)}
    problems = [by_id[i] for i in held_out]
    # the export is a plain model: wrapped with zero knobs it samples through its own (merged) weights
    result = evaluate(model, tok, adapter.wrap(model), problems, cfg, step, cfg.eval_samples, None)
    ran = json.loads((run_dir / "eval.json").read_text())
    assert ran["step"] == step and result["deployed"] == ran["deployed"]


def test_bad_inputs_are_one_error_line(route_run, tmp_path, capsys):
    _, run_dir = route_run
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((run_dir / "config.json").read_text())
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for args, error in [([str(no_checkpoint), "--out", str(tmp_path / "a")], "no checkpoint under"),
                        ([str(run_dir), "--out", str(tmp_path / "b"), "--checkpoint", "7"], "no step 7 under"),
                        ([str(run_dir), "--out", str(full)], "exists and is not an empty directory"),
                        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "c")], "config.json: no such file")]:
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and error in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
