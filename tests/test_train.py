"""The training loop end to end on the smoke preset (tiny-random, CPU)."""

import json
import os
import signal

import pytest
import torch

from projected_grpo import grpo, projection, train
from projected_grpo.config import ConfigError, make_config, parse_overrides
from projected_grpo.hack_basis import BasisCacheMismatch

SMALL = {"steps": "3", "max_new": "16", "basis_k": "4", "checkpoint_every": "2"}
TIMING = ("step_seconds", "t_generate", "t_grade", "t_score", "t_project", "t_optimizer")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # One directory for the module: the fixture pool, bases and tokenizer are built once.
    path = tmp_path_factory.mktemp("train")
    old, old_cache = os.getcwd(), os.environ.get("PROJECTED_GRPO_CACHE")
    os.chdir(path)
    os.environ["PROJECTED_GRPO_CACHE"] = str(path / "cache")
    yield path
    os.chdir(old)
    if old_cache is None:
        os.environ.pop("PROJECTED_GRPO_CACHE")
    else:
        os.environ["PROJECTED_GRPO_CACHE"] = old_cache


def _cfg(**overrides):
    return make_config("smoke", {**SMALL, **{k: str(v) for k, v in overrides.items()}})


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arm", ["none", "erase", "route"])
def test_each_arm_runs_and_writes_its_outputs(workdir, arm, monkeypatch):
    untouched = []
    real_project_all = projection.project_all

    def spy(wrappers, basis, arm, **kw):
        before = {n: w.delta_s.grad.clone() for n, w in wrappers.items()}
        stats = real_project_all(wrappers, basis, arm, **kw)
        untouched.append(all(torch.equal(before[n], w.delta_s.grad) for n, w in wrappers.items()))
        return stats

    monkeypatch.setattr(train.projection, "project_all", spy)
    summary = train.run(_cfg(intervention=arm, run_name=f"arm-{arm}", eval_every=2))
    run_dir = workdir / "out" / "runs" / f"arm-{arm}"
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["complete"]
    for key in ("reward", "hack_s", "gt_s", "hack_t", "gt_t", "loss", "grad_norm", "cin_s", "cin_t", "cin", "cout",
                "cin_null", "update_hackward", "frac_zero_spread", "dS_norm", "dS_hack_norm", "step_seconds"):
        assert key in rows[0], key
    assert all(r["dS_norm"] > 0 for r in rows)
    if arm == "route":
        assert rows[-1]["dS_hack_norm"] > 0
        assert "eval_kept_hack" in rows[1] and "eval_kept_hack" in summary["eval"]
    else:
        assert all(r["dS_hack_norm"] == 0 for r in rows)
    assert all(untouched) == (arm == "none")
    assert (run_dir / "config.json").exists() and (run_dir / "summary.txt").read_text().startswith("run arm-")
    completions = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in completions} == {1, 2, 3} and all("completion" in c for c in completions)
    assert all(0 <= c["hack_score"] <= 1 for c in completions)
    assert (run_dir / "checkpoints" / "step_000002" / "knobs.safetensors").exists()


def test_resume_matches_an_uninterrupted_run(workdir):
    full = _cfg(steps=4, run_name="straight", intervention="route")
    train.run(full)
    first = _cfg(steps=4, run_name="resumed", intervention="route")
    first.steps = 2  # stop after two steps, as a crash would, then continue to four
    train.run(first)
    with open(workdir / "out/runs/resumed/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # a crash mid-write leaves a cut line behind
    train.run(_cfg(steps=4, run_name="resumed", intervention="route", resume="true"))
    straight, resumed = _rows(workdir / "out/runs/straight"), _rows(workdir / "out/runs/resumed")
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in straight]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in resumed]


def test_same_seed_same_metrics(workdir):
    a = train.run(_cfg(run_name="det-a", steps=2))
    b = train.run(_cfg(run_name="det-b", steps=2))
    assert a["last5"] == b["last5"]


def test_cli_errors_name_the_field(workdir, capsys):
    for args, message in [
        (["smoke", "--stpes=3"], "did you mean --steps"),
        (["smoke", "--mix_ratio=1.5"], "--mix_ratio: must be in [0, 1]"),
        (["smoke", "--steps=0"], "--steps: must be >= 1"),
        (["smoke", "--intervention=delete"], "--intervention: 'delete' is not one of none, erase, route"),
        (["smoke", "--gate=both"], "--gate"),
        (["smoke", "--control=noise"], "--control"),
        (["smoke", "--modes=run_tests,bogus"], "--modes: unknown"),
        (["smoke", "--steps=three"], "--steps: expected int"),
        (["warp"], "unknown preset 'warp'"),
    ]:
        assert train.main(args) == 2
        assert message in capsys.readouterr().err, args
    if not torch.cuda.is_available():
        assert train.main(["smoke", "--device=cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert parse_overrides(["--steps", "5", "--mix-ratio=0"]) == {"steps": "5", "mix_ratio": "0"}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--steps"])


def test_existing_run_and_missing_checkpoint_are_errors(workdir):
    train.run(_cfg(run_name="twice", steps=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train.run(_cfg(run_name="twice", steps=1))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.run(_cfg(run_name="never-ran", resume="true"))


def test_stale_basis_cache_is_an_error(workdir):
    path = workdir / "pinned_basis.safetensors"
    train.run(_cfg(run_name="basis-a", steps=1, basis_path=path))
    with pytest.raises(BasisCacheMismatch, match="k: cached '4' vs requested '3'"):
        train.run(_cfg(run_name="basis-b", steps=1, basis_path=path, basis_k=3))
    train.run(_cfg(run_name="basis-c", steps=1, basis_path=path, basis_k=3, reextract_basis="true"))


def test_corrupt_teacher_pool_line_is_an_error(workdir):
    pools = sorted((workdir / "out" / "pools").glob("fixture-*"))
    assert pools, "the earlier runs built a fixture pool"
    broken = workdir / "broken_pool"
    broken.mkdir()
    for name in ("meta.json", "pool.jsonl"):
        (broken / name).write_bytes((pools[0] / name).read_bytes())
    lines = (broken / "pool.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"problem_id": "pg-001", "mode": \n'
    (broken / "pool.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=f"{broken / 'pool.jsonl'}:3"):
        train.run(_cfg(run_name="bad-pool", teacher_pool=broken))


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_state(workdir, monkeypatch):
    real = grpo.policy_loss
    calls = []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) > 1 else loss

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    with pytest.raises(train.TrainingDiverged, match="step 2: non-finite loss"):
        train.run(_cfg(run_name="nan"))
    run_dir = workdir / "out" / "runs" / "nan"
    assert [r["step"] for r in _rows(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "step_000001" / "knobs.safetensors").exists()


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(workdir, monkeypatch):
    real_step = train.train_step

    def interrupted(step, *args):
        out = real_step(step, *args)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return out

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(run_name="ctrl-c", steps=5, checkpoint_every=25))
    run_dir = workdir / "out" / "runs" / "ctrl-c"
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert train.latest_checkpoint(run_dir).name == "step_000002"
    monkeypatch.setattr(train, "train_step", real_step)
    summary = train.run(_cfg(run_name="ctrl-c", steps=5, checkpoint_every=25, resume="true"))
    assert summary["complete"] and summary["steps_done"] == 5


def test_nan_gradient_is_caught_before_the_optimizer_step(workdir, monkeypatch):
    real = grpo.backward_rollouts

    def poisoned(model, tok, wrappers, *args):
        out = real(model, tok, wrappers, *args)
        next(iter(wrappers.values())).delta_s.grad[0] = float("inf")
        return out

    monkeypatch.setattr(train, "backward_rollouts", poisoned)
    with pytest.raises(train.TrainingDiverged, match="step 1: non-finite knob gradient"):
        train.run(_cfg(run_name="inf-grad"))
    assert (workdir / "out/runs/inf-grad/checkpoints/step_000000/knobs.safetensors").exists()


def test_resume_refuses_a_different_config(workdir):
    train.run(_cfg(run_name="cfg-a", steps=2, intervention="route"))
    with pytest.raises(ConfigError, match="--intervention: run has 'route', asked 'none'"):
        train.run(_cfg(run_name="cfg-a", steps=4, intervention="none", resume="true"))
    summary = train.run(_cfg(run_name="cfg-a", steps=3, intervention="route", resume="true"))  # steps may grow
    assert summary["steps_done"] == 3


def test_any_crash_mid_step_keeps_the_last_good_state(workdir, monkeypatch):
    real = grpo.collect_rollouts
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(train, "collect_rollouts", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        train.run(_cfg(run_name="crash", steps=4, checkpoint_every=25))
    run_dir = workdir / "out" / "runs" / "crash"
    assert train.latest_checkpoint(run_dir).name == "step_000002"
    monkeypatch.setattr(train, "collect_rollouts", real)
    train.run(_cfg(run_name="crash", steps=4, checkpoint_every=25, resume="true"))
    train.run(_cfg(run_name="crash-straight", steps=4, checkpoint_every=25))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(_rows(run_dir)) == strip(_rows(workdir / "out/runs/crash-straight"))
