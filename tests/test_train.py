"""The training loop end to end on the smoke preset (tiny-random, CPU)."""

import dataclasses
import json
import os
import signal

import pytest
import torch
from conftest import module_workdir

from projected_grpo import (
    adapter,
    assembly,
    basis,
    checkpoints,
    config,
    distributed,
    grpo,
    interventions,
    projection,
    train,
    usage,
)
from projected_grpo import evaluate as evaluate_mod
from projected_grpo import step as step_mod
from projected_grpo.config import DEFAULT_INOCULATION, ConfigError, make_config, parse_overrides
from projected_grpo.hack_basis import BasisCacheMismatch
from projected_grpo.model import load_model_and_tokenizer
from projected_grpo.problems import HINT_SLOT, HINTS

SMALL = {"steps": "3", "max_new": "16", "basis_k": "4", "checkpoint_every": "2"}
TIMING = ("step_seconds", "t_generate", "t_grade", "t_score", "t_project", "t_optimizer")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with module_workdir(tmp_path_factory, "train") as path:
        yield path


def _cfg(**overrides):
    return make_config("smoke", {**SMALL, **{k: str(v) for k, v in overrides.items()}})


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arm", ["none", "erase", "route"])
def test_each_arm_runs_and_writes_its_outputs(workdir, arm, monkeypatch):
    untouched = []
    real_project_all = projection.project_all

    def spy(wrappers, basis, **kw):
        before = {n: w.delta_s.grad.clone() for n, w in wrappers.items()}
        stats = real_project_all(wrappers, basis, **kw)
        untouched.append(all(torch.equal(before[n], w.delta_s.grad) for n, w in wrappers.items()))
        return stats

    monkeypatch.setattr(projection, "project_all", spy)
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
    # hack scores every hack_score_every (10) steps and at the last: here the last alone
    assert all((c["hack_score"] is not None) == (c["step"] == 3) for c in completions)
    assert all(0 <= c["hack_score"] <= 1 for c in completions if c["step"] == 3)
    assert (summary["hack_auroc_steps"], summary["hack_auroc_rollouts"]) == (1, 4)  # 2 prompts x 2 students
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
    summaries = [json.loads((workdir / "out/runs" / name / "summary.json").read_text())
                 for name in ("straight", "resumed")]
    assert summaries[0]["basis_margins"] == summaries[1]["basis_margins"]  # V's notes survive the checkpoint


def _crash_in_step_3_and_resume(workdir, monkeypatch, name: str, **overrides) -> tuple[list, list]:
    """A run that crashes in step 3's rollouts, resumed from its checkpoint after step 2, and the same run
    straight through: the rows of each, without timings."""
    real, calls = step_mod.collect_rollouts, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(step_mod, "collect_rollouts", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        train.run(_cfg(run_name=name, **overrides))
    assert checkpoints.latest(workdir / "out" / "runs" / name).name == "step_000002"
    monkeypatch.setattr(step_mod, "collect_rollouts", real)
    train.run(_cfg(run_name=name, resume="true", **overrides))
    train.run(_cfg(run_name=f"{name}-straight", **overrides))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    return strip(_rows(workdir / "out/runs" / f"{name}-straight")), strip(_rows(workdir / "out/runs" / name))


def test_the_probe_monitor_resumes_as_it_was_and_screens_what_it_flags(workdir, monkeypatch):
    # The tiny model hacks nowhere: false positives give the probe two classes to fit. A crash in step 3
    # resumes from the checkpoint after step 2, the probe's buffer and fit in it.
    straight, resumed = _crash_in_step_3_and_resume(workdir, monkeypatch, "probe", steps=4, intervention="screen",
                                                    monitor="probe", refresh_every=1, detector_fpr=0.4,
                                                    checkpoint_every=25)
    assert straight == resumed
    assert straight[0]["probe_flagged"] == 0 and straight[-1]["probe_flagged"] > 0  # nothing before its first fit
    scores = [json.loads(line) for line in (workdir / "out/runs/probe-straight/scores.jsonl").read_text().splitlines()]
    assert {r["step"] for r in scores if "probe_score" in r} == {2, 3, 4}


def test_same_seed_same_metrics(workdir):
    a = train.run(_cfg(run_name="det-a", steps=2))
    b = train.run(_cfg(run_name="det-b", steps=2))
    assert a["last5"] == b["last5"]


def test_cli_errors_name_the_field(workdir, capsys):
    for args, message in [
        (["smoke", "--stpes=3"], "did you mean --steps"),
        (["smoke", "--mix_ratio=1.5"], "--mix_ratio: must be in [0, 1]"),
        (["smoke", "--steps=0"], "--steps: must be >= 1"),
        (["smoke", "--intervention=delete"], "--intervention: 'delete' is not one of none, erase, route, screen, "
                                             "penalty, advmod, trusted, inoculate"),
        (["smoke", "--gate=both"], "--gate"),
        (["smoke", "--control=noise"], "--control"),
        (["smoke", "--modes=run_tests,bogus"], "--modes: unknown"),
        (["smoke", "--steps=three"], "--steps: expected int"),
        (["warp"], "unknown preset 'warp'"),
    ]:
        assert train.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, args
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
    real_loss, real_step = grpo.policy_loss, train.train_step
    steps = []

    def poisoned(*args, **kw):
        loss = real_loss(*args, **kw)
        return loss * float("nan") if steps[-1] == 2 else loss

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    monkeypatch.setattr(train, "train_step", lambda run, step: steps.append(step) or real_step(run, step))
    with pytest.raises(train.TrainingDiverged, match="step 2: non-finite loss"):
        train.run(_cfg(run_name="nan"))
    run_dir = workdir / "out" / "runs" / "nan"
    assert [r["step"] for r in _rows(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "step_000001" / "knobs.safetensors").exists()


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(workdir, monkeypatch):
    real_step = train.train_step

    def interrupted(run, step):
        out = real_step(run, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return out

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(run_name="ctrl-c", steps=5, checkpoint_every=25))
    run_dir = workdir / "out" / "runs" / "ctrl-c"
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert checkpoints.latest(run_dir).name == "step_000002"
    monkeypatch.setattr(train, "train_step", real_step)
    summary = train.run(_cfg(run_name="ctrl-c", steps=5, checkpoint_every=25, resume="true"))
    assert summary["complete"] and summary["steps_done"] == 5


def test_nan_gradient_is_caught_before_the_optimizer_step(workdir, monkeypatch):
    real = grpo.backward_rollouts

    def poisoned(model, tok, wrappers, *args):
        out = real(model, tok, wrappers, *args)
        next(iter(wrappers.values())).delta_s.grad[0] = float("inf")
        return out

    monkeypatch.setattr(step_mod, "backward_rollouts", poisoned)
    with pytest.raises(train.TrainingDiverged, match="step 1: non-finite knob gradient"):
        train.run(_cfg(run_name="inf-grad"))
    assert (workdir / "out/runs/inf-grad/checkpoints/step_000000/knobs.safetensors").exists()


def test_one_process_per_run_directory_and_an_abort_keeps_a_checkpoint(workdir, monkeypatch):
    cfg = _cfg(run_name="locked", steps=2)
    with train._sole_writer(workdir / "out/runs/locked"), pytest.raises(FileExistsError, match="another process"):
        train.run(cfg)
    real_step = train.train_step

    def aborted(run, step):
        if step == 2:
            raise KeyboardInterrupt  # a second Ctrl-C mid-step
        return real_step(run, step)

    monkeypatch.setattr(train, "train_step", aborted)
    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(run_name="aborted", steps=3, checkpoint_every=25))
    assert checkpoints.latest(workdir / "out/runs/aborted").name == "step_000001"


def test_resume_refuses_a_different_config(workdir):
    train.run(_cfg(run_name="cfg-a", steps=2, intervention="route"))
    with pytest.raises(ConfigError, match="--intervention: run has 'route', asked 'none'"):
        train.run(_cfg(run_name="cfg-a", steps=4, intervention="none", resume="true"))
    config = workdir / "out/runs/cfg-a/config.json"  # as a run started before grade_seconds existed wrote it
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "grade_seconds"}))
    with pytest.raises(ConfigError, match="--grade_seconds: run has 10, asked 2"):  # it ran with the default
        train.run(_cfg(run_name="cfg-a", steps=3, intervention="route", resume="true", grade_seconds=2))
    summary = train.run(_cfg(run_name="cfg-a", steps=3, intervention="route", resume="true"))  # steps may grow
    assert summary["steps_done"] == 3


def test_any_crash_mid_step_keeps_the_last_good_state(workdir, monkeypatch):
    straight, resumed = _crash_in_step_3_and_resume(workdir, monkeypatch, "crash", steps=4, checkpoint_every=25)
    assert resumed == straight


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_refresh_in_the_loop_replaces_the_basis_on_the_models_device(workdir, monkeypatch, device):
    seen = []
    real_step = train.train_step

    def spy(run, step):
        device = next(run.model.parameters()).device
        seen.append((step, run.basis.V))
        assert all(v.device == device for v in run.basis.V.values())
        return real_step(run, step)

    monkeypatch.setattr(train, "train_step", spy)
    # A cached basis (loaded on the CPU) at the start, then refreshes: the first sweep of a study.
    kw = dict(steps=3, refresh_every=1, intervention="route", device=device, basis_path=workdir / f"{device}.st")
    train.run(_cfg(run_name=f"refresh-{device}-miss", **kw))
    seen.clear()
    train.run(_cfg(run_name=f"refresh-{device}", **kw))
    rows = _rows(workdir / f"out/runs/refresh-{device}")
    assert all(0.2 < rows[i]["basis_overlap"] <= 1 + 1e-6 for i in (0, 1))  # the knobs moved a little
    assert "basis_overlap" not in rows[2]  # no refresh after the last step
    assert seen[1][1] is not seen[0][1] and seen[2][1] is not seen[1][1]
    name = next(iter(seen[0][1]))
    assert not torch.equal(seen[0][1][name], seen[1][1][name])


def test_refresh_counts_a_dropped_layer_as_zero_and_warns_on_a_rotated_basis(workdir):
    cfg = _cfg()
    run, _ = assembly.assemble(cfg, distributed.SINGLE, cfg.model, *assembly.split_problems(cfg))
    # What the refresh will find:
    fresh = basis.usable(cfg, basis.extract(cfg, run.model, run.tok, run.wrappers, run.basis.pairs))

    def refresh():
        return run.basis.refresh(1, run.model, run.tok, run.wrappers)

    run.basis.V = fresh
    assert refresh() == pytest.approx(1.0, abs=1e-5)
    assert run.basis.V.keys() == fresh.keys()
    # The old basis had one more layer, which the refresh dropped: 1 of len+1 layers counts 0.
    run.basis.V = {**fresh, "gone.layer": fresh[name := next(iter(fresh))]}
    assert refresh() == pytest.approx(len(fresh) / (len(fresh) + 1), abs=1e-5)
    # An old basis orthogonal to the new one: overlap 0 and a warning.
    orthogonal = {}
    for n, V in fresh.items():
        complement = torch.eye(V.shape[1]) - V.T @ V
        orthogonal[n] = torch.linalg.qr(complement @ torch.randn(V.shape[1], V.shape[0]))[0].T
    run.basis.V = orthogonal
    with pytest.warns(UserWarning, match="rotated the basis away"):
        assert refresh() < 1e-5
    assert basis.basis_overlap({name: fresh[name]}, {}) == 0.0


def test_evaluation_samples_deployed_without_the_quarantine_and_leaves_the_training_rng(workdir, monkeypatch):
    cfg = _cfg(intervention="route")
    model, tok = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
    wrappers = adapter.wrap(model)
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.normal_(0, 0.1)
            layer.delta_s_hack.normal_(0, 0.1)
    knobs = adapter.knob_state(wrappers)
    seen = []
    real_sample = grpo.sample

    def spy(model, tok, wrappers, prompts, *args):
        seen.append(({k: v.clone() for k, v in adapter.knob_state(wrappers).items()}, prompts))
        return real_sample(model, tok, wrappers, prompts, *args)

    monkeypatch.setattr(grpo, "sample", spy)
    rng = torch.get_rng_state()
    held_out = train.split_problems(cfg)[1]
    out = evaluate_mod.evaluate(model, tok, wrappers, held_out, cfg, 5, samples=2, workers=1)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is not consumed
    assert set(evaluate_mod.metrics_row(out)) == {f"eval_{v}_{m}{s}" for v in ("deployed", "kept")
                                                  for m in ("hack", "solve") for s in ("", "_neutral")}
    assert out["deployed"]["hint"]["n"] == 2 * len(held_out)
    assert set(out["deployed"]["hint"]["per_mode"]) == {p.mode for p in held_out}
    (deployed, hinted), (_, neutral), (kept, _), _ = seen
    tok_text = [tok.decode(p) for p in hinted], [tok.decode(p) for p in neutral]
    assert all(HINTS[p.mode] in t for p, t in zip(held_out, tok_text[0]))  # the loophole hint, as in training
    assert all(HINT_SLOT in t and HINTS[p.mode] not in t for p, t in zip(held_out, tok_text[1]))  # neutral
    for key, value in knobs.items():
        if key.endswith("delta_s_hack"):
            assert not deployed[key].any() and torch.equal(kept[key], value)
        else:
            assert torch.equal(deployed[key], value) and torch.equal(kept[key], value)
    assert all(torch.equal(v, knobs[k]) for k, v in adapter.knob_state(wrappers).items())  # restored


@pytest.mark.parametrize("where", ["refresh", "evaluate"])
def test_a_crash_in_refresh_or_evaluation_keeps_the_pre_step_state(workdir, monkeypatch, where):
    owner, name = (basis.Basis, "refresh") if where == "refresh" else (train, "evaluate")
    real = getattr(owner, name)
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(f"{where} failed (simulated)")
        return real(*args)

    kw = dict(steps=4, checkpoint_every=25, refresh_every=1, eval_every=1)
    monkeypatch.setattr(owner, name, flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        train.run(_cfg(run_name=f"crash-{where}", **kw))
    run_dir = workdir / "out/runs" / f"crash-{where}"
    assert checkpoints.latest(run_dir).name == "step_000001"
    assert [r["step"] for r in _rows(run_dir)] == [1]
    monkeypatch.setattr(owner, name, real)
    train.run(_cfg(run_name=f"crash-{where}", resume="true", **kw))
    train.run(_cfg(run_name=f"straight-{where}", **kw))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(_rows(run_dir)) == strip(_rows(workdir / "out/runs" / f"straight-{where}"))


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not any(line.startswith("Traceback") for line in lines)
    return lines[-1]


def test_user_errors_print_one_line_exit_2_and_leave_no_run_directory(workdir, capsys):
    bad_problems = workdir / "bad_problems.jsonl"
    bad_problems.write_text('{"id": 1, "func_name": "Solution().f"}\n')
    bad_basis = workdir / "cut_basis.safetensors"
    train.run(_cfg(run_name="basis-source", steps=1, basis_path=bad_basis))
    bad_basis.write_bytes(bad_basis.read_bytes()[:100])
    pools = sorted((workdir / "out" / "pools").glob("fixture-*"))
    garbled = workdir / "garbled_pool"
    garbled.mkdir()
    for name in ("meta.json", "pool.jsonl"):
        (garbled / name).write_bytes((pools[0] / name).read_bytes())
    with open(garbled / "pool.jsonl", "a") as f:
        f.write("{garbled\n")
    not_gzip = workdir / "not_gzip.jsonl.gz"
    not_gzip.write_text("plain text\n")
    for override, names in [(f"--problems={bad_problems}", [f"{bad_problems}:1", "--problems", "missing field"]),
                            (f"--problems={not_gzip}", [f"{not_gzip}:1", "cannot read"]),
                            (f"--model={workdir / 'no-model'}", ["--model", "no-model"]),
                            (f"--teacher_pool={garbled}", [f"{garbled / 'pool.jsonl'}:", "rebuild the pool"]),
                            (f"--basis_path={bad_basis}", [str(bad_basis), "--reextract_basis=true"]),
                            ("--problems=no/such/file.jsonl", ["--problems", "no/such/file.jsonl"])]:
        assert train.main(["smoke", override, "--steps=1", "--run_name=bad-input"]) == 2, override
        line = _last_error_line(capsys)
        assert line.startswith("error: ") and all(n in line for n in names), line
        assert not (workdir / "out/runs/bad-input").exists()


def test_a_damaged_checkpoint_or_config_is_an_error_line_on_resume(workdir, capsys):
    train.run(_cfg(run_name="damaged", steps=2, checkpoint_every=1))
    run_dir = workdir / "out/runs/damaged"
    knobs = run_dir / "checkpoints/step_000002/knobs.safetensors"
    knobs.write_bytes(knobs.read_bytes()[:64])
    assert train.main(["smoke", *[f"--{k}={v}" for k, v in SMALL.items()], "--steps=3", "--checkpoint_every=1",
                       "--run_name=damaged", "--resume=true"]) == 2
    line = _last_error_line(capsys)
    assert line.startswith("error: --resume: checkpoint") and "step_000002" in line and "delete it" in line
    (run_dir / "config.json").write_text("{cut")
    assert train.main(["smoke", *[f"--{k}={v}" for k, v in SMALL.items()], "--steps=3", "--run_name=damaged",
                       "--resume=true"]) == 2
    assert "config.json" in _last_error_line(capsys)


def test_evaluate_cli_reproduces_the_end_of_run_evaluation_and_writes_eval_json(workdir, capsys):
    train.run(_cfg(run_name="to-eval", steps=2, intervention="route", eval_samples=2))
    run_dir = workdir / "out/runs/to-eval"
    at_end = json.loads((run_dir / "eval.json").read_text())
    assert at_end["step"] == 2 and set(at_end) >= {"deployed", "kept", "problems"}
    config = json.loads((run_dir / "config.json").read_text())
    assert at_end["problems"] == config["split"]["held_out"]  # never a training problem
    assert not set(at_end["problems"]) & set(config["split"]["train"])
    (run_dir / "eval.json").unlink()
    assert evaluate_mod.main([str(run_dir), "--samples", "2"]) == 0
    assert json.loads((run_dir / "eval.json").read_text()) == at_end  # the same function, the same seeds
    assert evaluate_mod.main([str(run_dir), "--checkpoint", "7"]) == 2
    assert "--checkpoint: no step 7" in capsys.readouterr().err


def test_fast_preset_trains_on_the_shipped_real_problems(workdir):
    # A dry run of fast's code path (bf16, real problems, importance correction) on the CPU.
    summary = train.run(make_config("fast", {"device": "cpu", "model": "tiny-random", "steps": "1", "max_new": "8",
                                             "mix_ratio": "0", "eval_prompts": "6", "eval_every": "0",
                                             "refresh_every": "0", "group": "2", "prompts_per_step": "2"}),
                        preset="fast")
    run_dir = workdir / "out/runs/fast-erase-s0"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["problems"] == "leetcode_medhard" and config["dtype"] == "bfloat16" and config["is_correction"]
    assert len(config["split"]["train"]) == 113 and len(config["split"]["held_out"]) == 6
    assert "exit_code" not in config["basis_modes"]
    row = _rows(run_dir)[0]
    assert row["sample_kl"] >= 0 and "sample_dlogp" in row
    assert summary["complete"] and summary["per_mode"] and all(
        cell["in_basis"] == (mode != "exit_code") for mode, cell in summary["per_mode"].items())


@pytest.mark.parametrize("overrides", [{"intervention": "screen"}, {"intervention": "penalty"},
                                       {"intervention": "trusted"}, {"intervention": "route", "control": "capacity"},
                                       {"intervention": "erase", "pairs": "pool"}])
def test_baselines_and_controls_run_end_to_end(workdir, overrides):
    name = "-".join(overrides.values())
    summary = train.run(_cfg(run_name=f"baseline-{name}", steps=2, **overrides))
    rows = _rows(workdir / "out/runs" / f"baseline-{name}")
    assert summary["complete"] and all("detector_recall" in r and "hack_auroc" in r for r in rows)
    scores = (workdir / "out/runs" / f"baseline-{name}" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == 2 * 2 * 2  # steps x prompts x student samples
    if overrides.get("control") == "capacity":
        assert rows[-1]["dS_hack_norm"] > 0
    if overrides["intervention"] == "trusted":
        assert all(r["cout"] != r["cin"] for r in rows)  # the trusted projection changed the gradient
    if overrides["intervention"] in ("screen", "penalty"):
        assert all(r["cout"] == r["cin"] for r in rows)  # no projection: the gradient is only measured


def test_resume_under_the_smoothed_gate_matches_an_uninterrupted_run(workdir):
    kw = dict(steps=4, intervention="erase", gate="smoothed", checkpoint_every=25)
    train.run(_cfg(run_name="smoothed-straight", **kw))
    first = _cfg(run_name="smoothed-resumed", **kw)
    first.steps = 2  # as a crash after step 2 would leave it
    train.run(first)
    train.run(_cfg(run_name="smoothed-resumed", resume="true", **kw))
    straight, resumed = _rows(workdir / "out/runs/smoothed-straight"), _rows(workdir / "out/runs/smoothed-resumed")
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in straight]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in resumed]
    assert straight[0]["fired"] == 0 and straight[-1]["fired"] > 0  # nothing removed before a trend exists


class _Recorded(interventions.Intervention):
    """An arm that exists only in this test: it halves every advantage and records each hook call."""
    name = "halved"

    def __init__(self):
        self.calls = []

    def messages(self, problem, cfg, training, hint=True):
        self.calls.append(("messages", training))
        return super().messages(problem, cfg, training, hint)

    def advantages(self, rollouts, cfg):
        self.calls.append(("advantages",))
        zero_spread = super().advantages(rollouts, cfg)
        for r in rollouts:
            r.advantage /= 2
        return zero_spread

    def gradient(self, run):
        self.calls.append(("gradient",))
        return super().gradient(run)

    def update(self, run, before):
        self.calls.append(("update",))


def test_an_arm_registered_at_run_time_takes_smoke_steps(workdir, monkeypatch):
    monkeypatch.setattr(interventions, "REGISTRY", dict(interventions.REGISTRY))
    arm = interventions.register(_Recorded())
    summary = train.run(_cfg(intervention="halved", run_name="halved", steps=2))
    assert summary["complete"] and summary["intervention"] == "halved"
    hooks = [c for c in arm.calls if c[0] != "messages"]
    assert hooks == [("advantages",), ("gradient",), ("update",)] * 2  # each step calls each hook once, in order
    assert ("messages", True) in arm.calls and ("messages", False) in arm.calls  # training and evaluation
    assert all(r["cout"] == r["cin"] for r in _rows(workdir / "out/runs/halved"))  # its default: measured only


def test_inoculation_reaches_every_student_training_prompt_and_no_other(workdir, monkeypatch):
    seen, real_collect = [], step_mod.collect_rollouts
    sampled, real_sample = [], grpo.sample

    def collect(*args, **kwargs):
        rollouts, timings = real_collect(*args, **kwargs)
        seen.extend(rollouts)
        return rollouts, timings

    def sample(model, tok, wrappers, prompts, *args):
        sampled.append([tok.decode(p) for p in prompts])
        return real_sample(model, tok, wrappers, prompts, *args)

    monkeypatch.setattr(step_mod, "collect_rollouts", collect)
    monkeypatch.setattr(grpo, "sample", sample)
    train.run(_cfg(intervention="inoculate", run_name="inoculate", steps=2, eval_every=1))
    tok = load_model_and_tokenizer("tiny-random")[1]
    students = [tok.decode(r.prompt_ids) for r in seen if not r.teacher]
    teachers = [tok.decode(r.prompt_ids) for r in seen if r.teacher]
    assert students and teachers
    assert all(DEFAULT_INOCULATION in text for text in students)
    assert not any(DEFAULT_INOCULATION in text for text in teachers)  # teacher rows keep the problem's prompt
    # Sampling: step 1, evaluation after it (hint, neutral), step 2, the final evaluation (hint, neutral).
    carries = [[DEFAULT_INOCULATION in t for t in texts] for texts in sampled]
    assert [all(c) for c in carries] == [True, False, False, True, False, False]
    assert [any(c) for c in carries] == [True, False, False, True, False, False]


class _Zeroed(interventions.Intervention):
    """A second arm that exists only in this test: it zeroes every knob gradient after measuring it."""
    name = "zeroed"

    def gradient(self, run):
        stats = super().gradient(run)
        for layer in run.wrappers.values():
            layer.delta_s.grad.zero_()
        return stats


def test_two_arms_registered_at_run_time_compose_and_both_act(workdir, monkeypatch, capsys):
    monkeypatch.setattr(interventions, "REGISTRY", dict(interventions.REGISTRY))
    halved = interventions.register(_Recorded())
    interventions.register(_Zeroed())
    with pytest.raises(ConfigError, match="halved and zeroed both replace the gradient hook"):
        train.run(_cfg(intervention="halved+zeroed", run_name="clash", steps=1))
    monkeypatch.setattr(_Recorded, "gradient", interventions.Intervention.gradient)  # now only zeroed replaces it
    summary = train.run(_cfg(intervention="halved+zeroed", steps=2))
    assert summary["run_name"] == "smoke-halved+zeroed-s0" and summary["intervention"] == "halved+zeroed"
    assert [c for c in halved.calls if c[0] != "messages"] == [("advantages",), ("update",)] * 2  # halved acted
    rows = _rows(workdir / "out/runs/smoke-halved+zeroed-s0")
    assert all(r["cin"] > 0 and r["grad_norm"] == 0 and r["dS_norm"] == 0 for r in rows)  # and so did zeroed
    capsys.readouterr()
    assert train.main(["smoke", "--intervention=erase+trusted", "--run_name=x"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --intervention: erase+trusted cannot compose: erase and "
                                               "trusted both replace the gradient hook")


def test_replay_runs_a_config_json_again_and_refuses_unknown_fields(workdir, capsys):
    assert train.main(["smoke", *(f"--{k}={v}" for k, v in SMALL.items()), "--run_name=original"]) == 0
    original = workdir / "out/runs/original"
    assert train.main(["replay", str(original)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(_rows(workdir / "out/runs/original-replay")) == strip(_rows(original))
    configs = [json.loads((workdir / "out/runs" / name / "config.json").read_text())
               for name in ("original", "original-replay")]
    assert {k for k in configs[0] if configs[0][k] != configs[1][k]} == {"run_name"}
    # overrides after the run still apply; the record's run_name is replaced, never reused
    preset, cfg = config.replay_config(configs[0], "c.json", {"lr": "0.5", "run_name": "again"})
    assert (preset, cfg.lr, cfg.run_name, cfg.max_new) == ("smoke", 0.5, "again", 16)
    # a config.json from another version: one error line naming what this one does not know
    older = workdir / "older.json"
    older.write_text(json.dumps({**configs[0], "old_knob": 1, "older_gate": "x"}))
    capsys.readouterr()
    assert train.main(["replay", str(older)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "old_knob, older_gate" in err and err.startswith("error: ")


def test_help_lists_every_field_with_its_type_defaults_and_reason(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())  # long heads wrap
    for field in dataclasses.fields(config.Config):
        assert " ".join(f"--{field.name} ({field.type}, default {field.default!r}".split()) in flat, field.name
    assert "--steps (int, default 30; fast: 60; organism: 200; full: 200)" in text
    assert "rollouts per prompt (G = G_s + G_t)" in text  # the field's own comment
    reasons = usage.field_reasons()
    assert all(reasons[field.name] for field in dataclasses.fields(config.Config))
    assert reasons["detector_fpr"].startswith("... and any other student rollout") and "keyed by" in reasons[
        "detector_fpr"]  # a comment's continuation lines are its reason too
    assert reasons["clip_eps"].endswith("the clip never acts")  # and nothing of the next field's
    for preset in config.PRESETS:
        assert f"\n  {preset}: " in text
