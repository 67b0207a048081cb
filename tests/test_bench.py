"""The benchmark's cases run and report sane figures (speed is never asserted here)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from projected_grpo import adapter, bench, bench_runs


def test_cases_run_on_a_small_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    base = bench.bench_model(512, "cpu", torch.float32, "cpu")
    wrapped = copy.deepcopy(base)
    wrappers = adapter.wrap(wrapped)
    bench._randomize_knobs(wrappers)
    gen = bench.generation_case(base, wrapped, wrappers, "cpu", repeats=1, batch=2, prompt_len=4, new=4)
    score = bench.scoring_case(base, wrapped, wrappers, "cpu", repeats=1, batch=2, prompt_len=4, completion_len=8)
    for figures in (gen, score):
        assert all(v > 0 for v in figures.values())
    assert all(layer._merged_weight is None for layer in wrappers.values())  # contexts cleaned up
    assert adapter.AdapterLayer.forward is not bench._plain_autograd_forward  # the naive patch was undone


def test_verdicts_follow_the_targets():
    assert bench.verdict("gen_merged_over_base", 0.97).startswith("ok")
    assert bench.verdict("gen_merged_over_base", 0.90).startswith("MISS")
    assert bench.verdict("logprob_peak_over_full", 0.3).startswith("MISS")
    assert bench.verdict("gen_hook_over_base", 0.5) == "reported"


def test_bench_and_bench_peer_share_one_record_each_keeping_the_others_keys(tmp_path):
    path = str(tmp_path / "out" / "bench.json")
    bench_runs.update_record(path, {"figures": {"a": 1.0}})
    bench_runs.update_record(path, {"peer": {"figures": {"b": 2.0}}})
    bench_runs.update_record(path, {"figures": {"a": 3.0}})  # a new `just bench` replaces its own keys only
    assert json.loads(open(path).read()) == {"figures": {"a": 3.0}, "peer": {"figures": {"b": 2.0}}}
    open(path, "w").write("{cut")
    with pytest.raises(SystemExit, match=r"bench\.json: not JSON"):
        bench_runs.update_record(path, {"figures": {}})


_FAKE_TRAIN = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
run = os.path.join(args["out_dir"], args["run_name"])
os.makedirs(run)
with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    for _ in range(int(args["steps"])):
        f.write(json.dumps({"step_seconds": 2.0, "completion_tokens": 7, "t_generate": 0.5, "t_grade": 0.1,
                            "t_score": 1.0, "t_project": 0.2, "t_optimizer": 0.2}) + "\\n")
"""


def test_a_step_split_runs_the_package_it_is_pointed_at(tmp_path):
    # What --vs relies on: the older commit's code, not this checkout's installed package, trains.
    package = tmp_path / "src" / "projected_grpo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(_FAKE_TRAIN)
    split = bench_runs.step_split("organism", 4, "--seed=1", src=str(tmp_path / "src"))
    assert split["step_s"] == 2.0 and split["completion_tokens"] == 7
    assert split["split_generate"] == 0.25 and split["split_score"] == 0.5


def test_a_step_split_needs_a_step_past_its_warm_up():
    with pytest.raises(ValueError, match="2 steps leave none past the two warm-up steps"):
        bench_runs.step_split("organism", 2)


def test_a_step_split_that_fails_names_the_code_and_its_error(tmp_path):
    package = tmp_path / "src" / "projected_grpo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text("import sys; sys.exit('error: --pairs: live is not one of templates')")
    with pytest.raises(SystemExit, match="failed on the older commit: error: --pairs: live is not one of"):
        bench_runs.step_split("organism", 4, "--pairs=live", src=str(tmp_path / "src"))


def test_taking_turns_runs_each_seed_on_both_codes_in_alternating_order(monkeypatch):
    runs = []

    def fake_split(preset, steps, *args, src=None):
        assert args[0] == "--intervention=erase"  # the arm asked for, on both codes
        runs.append((args[1], "then" if src else "now"))
        assert src is None or (Path(src) / "projected_grpo" / "bench.py").is_file()  # the commit's package
        return {"step_s": 2.0 if src else 1.0, "split_generate": 0.25, "split_score": 0.5, "completion_tokens": 9.0}

    monkeypatch.setattr(bench_runs, "step_split", fake_split)
    figures = bench_runs.turns_case("HEAD", [1, 2, 3], 4, ["--intervention=erase"])
    assert runs == [("--seed=1", "then"), ("--seed=1", "now"), ("--seed=2", "now"), ("--seed=2", "then"),
                    ("--seed=3", "then"), ("--seed=3", "now")]
    assert figures["s2_then_step_s"] == 2.0 and figures["s2_now_generate_s"] == 0.25 and figures["s1_now_tokens"] == 9
    assert figures["s3_now_over_then"] == 0.5 and figures["now_over_then"] == pytest.approx(0.5)


def test_taking_turns_with_a_commit_git_cannot_read_names_it():
    with pytest.raises(SystemExit, match="--vs no-such-commit: git cannot read"):
        bench_runs.turns_case("no-such-commit", [1], 4, [])
    with pytest.raises(SystemExit, match="--seeds=1,x: comma-separated integers"):
        bench.main(["--vs", "HEAD", "--seeds", "1,x"])
