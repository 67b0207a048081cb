"""Sweeps: the grid, its validation, run directories, the core split, sweep.json, and one real sweep."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from projected_grpo import __version__, sweep
from projected_grpo.config import MODES, make_config
from projected_grpo.results import build_report

SWEEP_DIR = Path("out/sweeps/study")


def test_grid_is_seeds_by_arms_named_like_train():
    runs = sweep.expand_grid("smoke", sweep.parse_arms("none,erase:random"), [1, 2], None, {"steps": "2"},
                             SWEEP_DIR)
    assert [r.name for r in runs] == ["smoke-none-s1", "smoke-erase-random-s1", "smoke-none-s2",
                                      "smoke-erase-random-s2"]
    assert runs[1].overrides == {"steps": "2", "seed": "1", "intervention": "erase", "control": "random",
                                 "run_name": "smoke-erase-random-s1", "out_dir": str(SWEEP_DIR)}
    # the names train would choose itself, so a sweep's runs read like hand-started ones
    for run in runs:
        fields = {k: run.overrides[k] for k in ("seed", "intervention", "control")}
        assert make_config("smoke", fields).run_name == run.name


def test_lomo_leaves_each_mode_out_of_the_basis_and_trains_on_all():
    modes = ["run_tests", "sentinel", "exit_code"]
    runs = sweep.expand_grid("fast", sweep.parse_arms("none,erase"), [1, 2], modes, {"modes": ",".join(modes)},
                             SWEEP_DIR)
    assert len(runs) == 3 * 2 * 2
    for run in runs:
        left_out = run.name.rsplit("-lomo-", 1)[1]
        assert run.overrides["basis_modes"] == ",".join(m for m in modes if m != left_out)
        assert run.overrides["modes"] == ",".join(modes)
    assert runs[0].name == "fast-none-s1-lomo-run_tests" and runs[-1].name == "fast-erase-s2-lomo-exit_code"


def test_lomo_sweep_plans_one_run_per_mode_in_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planned = {}

    def execute(preset, runs, slots, sweep_dir, record):  # the plan, not the runs
        planned.update(runs=runs, sweep_dir=sweep_dir, record=record)
        return 0

    monkeypatch.setattr(sweep, "execute", execute)
    assert sweep.main(["--lomo", "--preset", "smoke", "--arms", "erase", "--seeds", "1"]) == 0  # as `just lomo` says
    assert planned["sweep_dir"] == Path("out/sweeps/smoke-lomo")
    assert planned["record"]["lomo_modes"] == list(MODES)
    assert [r.overrides["basis_modes"].split(",") for r in planned["runs"]] == [
        [m for m in MODES if m != left_out] for left_out in MODES]


@pytest.mark.parametrize("args, message", [
    (["--arms", "none,erse"], "--arms: unknown intervention 'erse'"),
    (["--arms", "erase:randm"], "--arms: unknown control 'randm'"),
    (["--arms", "erase:capacity"], "run smoke-erase-capacity-s1: --control: capacity"),
    (["--stepz=3"], "unknown field --stepz; did you mean --steps?"),
    (["--arm", "erase"], "unknown option --arm; did you mean --arms?"),
    (["--jobs", "0"], "--jobs: must be >= 1"),
    (["--steps=0"], "--steps: must be >= 1"),
    (["--seed=3"], "--seed is set by the sweep for each run (use --seeds)"),
    (["--threads", "2"], "--threads is set by the sweep"),
    (["--resume=true"], "--resume is set by the sweep"),
    (["--lomo", "--basis_modes=run_tests"], "--basis_modes is set by the sweep for each run (--lomo"),
    (["--lomo", "--modes=sentinel"], "--lomo: needs at least two modes"),
    (["--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    (["--name", "a/b"], "--name: 'a/b' must be a plain directory name"),
    (["--devices", "cpu,cuda:0"], "--devices: expected distinct cuda devices"),
])
def test_a_bad_grid_fails_up_front_with_the_field_named(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["smoke", "--seeds", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_jobs_on_one_gpu_is_an_error_and_devices_take_one_run_each():
    with pytest.raises(sweep.SweepError, match="--devices"):
        sweep.device_slots("cuda", 2, [])
    with pytest.raises(sweep.SweepError, match="give one"):
        sweep.device_slots("cuda", 2, ["cuda:0", "cuda:1"])
    assert sweep.device_slots("cuda", None, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert sweep.device_slots("cuda", None, []) == [None]
    assert sweep.device_slots("cpu", 3, []) == [None] * 3


def test_cores_are_split_between_concurrent_runs():
    split = sweep.thread_split(cores=2, concurrent=2, overrides={})
    argv, env = sweep.child_invocation("smoke", {"seed": "1", **split})
    assert argv[:4] == [sys.executable, "-m", "projected_grpo.train", "smoke"]
    assert "--threads=1" in argv and "--grade_workers=1" in argv and env["OMP_NUM_THREADS"] == "1"
    assert sweep.thread_split(cores=16, concurrent=3, overrides={}) == {"threads": "5", "grade_workers": "5"}
    assert sweep.thread_split(cores=1, concurrent=4, overrides={}) == {"threads": "1", "grade_workers": "1"}
    # the user's grade_workers stays (it is among the overrides every run gets)
    assert sweep.thread_split(cores=2, concurrent=2, overrides={"grade_workers": "3"}) == {"threads": "1"}


def _run_dir(root: Path, name: str, *, steps_done=0, complete=False, checkpoint=None, threads=1) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"threads": threads, "grade_workers": threads,
                                                     "device": "cuda:1"}))
    if steps_done:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                       for s in range(1, steps_done + 1)))
    if checkpoint:
        (run_dir / "checkpoints" / checkpoint).mkdir(parents=True)
    if complete:
        (run_dir / "summary.json").write_text(json.dumps({"complete": True, "steps_done": steps_done}))
    return run_dir


def test_finished_runs_are_skipped_interrupted_ones_resumed_others_started(tmp_path):
    assert sweep.decide(tmp_path / "never-ran", steps=4) == "fresh"
    assert sweep.decide(_run_dir(tmp_path, "done", steps_done=4, complete=True), steps=4) == "skip"
    assert sweep.decide(_run_dir(tmp_path, "cut", steps_done=3, checkpoint="step_000002"), steps=4) == "resume"
    # a finished run asked for more steps continues from its last checkpoint
    longer = _run_dir(tmp_path, "longer", steps_done=4, complete=True, checkpoint="step_000004")
    assert sweep.decide(longer, steps=8) == "resume"
    for name, checkpoint in (("no-checkpoint", None), ("half-written", "step_000002.tmp")):
        with pytest.raises(sweep.SweepError, match=f"{name} has metrics.jsonl but no checkpoint"):
            sweep.decide(_run_dir(tmp_path, name, steps_done=2, checkpoint=checkpoint), steps=4)


def test_actions_are_decided_for_the_whole_grid_before_anything_runs(tmp_path):
    runs = sweep.expand_grid("smoke", [("erase", "none")], [1, 2, 3], None, {}, tmp_path)
    for run in runs:
        run.overrides.update(sweep.thread_split(cores=4, concurrent=2, overrides={}))
    _run_dir(tmp_path, "smoke-erase-s1", steps_done=1)
    _run_dir(tmp_path, "smoke-erase-s3", steps_done=1)
    with pytest.raises(sweep.SweepError) as err:
        sweep.plan_actions(runs, {r.name: 4 for r in runs}, tmp_path, devices=[])
    assert "smoke-erase-s1 has metrics" in str(err.value) and "smoke-erase-s3 has metrics" in str(err.value)

    # a resumed run keeps the threads and device it started with: train resumes only an unchanged config
    shutil.rmtree(tmp_path / "smoke-erase-s3")
    (tmp_path / "smoke-erase-s1" / "checkpoints" / "step_000001").mkdir(parents=True)
    sweep.plan_actions(runs, {r.name: 4 for r in runs}, tmp_path, devices=["cuda:0", "cuda:1"])
    assert [r.action for r in runs] == ["resume", "fresh", "fresh"]
    assert runs[0].overrides["resume"] == "true" and runs[0].overrides["threads"] == "1"
    assert runs[0].device == "cuda:1" and runs[1].overrides["threads"] == "2" and runs[1].device is None


def _record(**changes):
    study = dict(preset="smoke", arms=[("none", "none"), ("erase", "random")], seeds=[1, 2], lomo_modes=None,
                 overrides={"steps": "2"}, jobs=2, devices=[])
    return sweep.sweep_record(**{**study, **changes})


def test_sweep_json_records_the_study_and_the_code(tmp_path):
    record = _record()
    assert record["arms"] == ["none", "erase:random"] and record["seeds"] == [1, 2]
    assert record["overrides"] == {"steps": "2"} and record["jobs"] == 2 and record["devices"] is None
    assert record["version"] == __version__ and record["started"]
    package_dir = Path(sweep.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True)
    if shutil.which("git") and head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    assert sweep.git_state(tmp_path) == (None, None)

    path = tmp_path / "sweep.json"
    runs = sweep.expand_grid("smoke", [("none", "none")], [1], None, {}, tmp_path)
    sweep.save_record(path, record, runs)
    assert json.loads(path.read_text())["runs"] == [
        {"name": "smoke-none-s1", "action": "fresh", "status": "pending", "exit_code": None}]
    sweep.check_same_study(path, _record(), force=False)  # the same command again
    with pytest.raises(sweep.SweepError, match=r"seeds: \[1, 2\] there, \[1, 2, 3\] now; overrides"):
        sweep.check_same_study(path, _record(seeds=[1, 2, 3], overrides={}), force=False)
    sweep.check_same_study(path, _record(seeds=[1, 2, 3]), force=True)


# Stand-ins for train, by run name: fast children to test scheduling, failure and Ctrl-C.
FAKE_CHILDREN = {
    "ok": "pass",
    "crash": "raise SystemExit(1)",
    "waits": "import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
             "time.sleep(30)",
}


@pytest.fixture
def fake_train(monkeypatch):
    monkeypatch.setattr(sweep, "child_invocation",
                        lambda preset, overrides: ([sys.executable, "-c", FAKE_CHILDREN[overrides["run_name"]]],
                                                   dict(os.environ)))
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.02)


def _planned(*names):
    return [sweep.PlannedRun(name, {"run_name": name}) for name in names]


def test_a_failed_run_does_not_stop_the_others(tmp_path, fake_train, capsys):
    runs = _planned("crash", "ok")
    record = _record()
    assert sweep.execute("smoke", runs, [None, None], tmp_path, record) == 1
    assert [(r.status, r.exit_code) for r in runs] == [("failed", 1), ("done", 0)]
    out, err = capsys.readouterr()
    assert "crash  FAILED (exit 1)" in out and f"log: {tmp_path / 'logs' / 'crash.log'}" in out
    assert "failed: crash (exit 1)" in err
    saved = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [(r["status"], r["exit_code"]) for r in saved] == [("failed", 1), ("done", 0)]
    assert (tmp_path / "logs" / "ok.log").read_text().startswith("=== ")


def test_ctrl_c_stops_launching_and_forwards_to_running_children(tmp_path, fake_train):
    runs = _planned("waits", "ok")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        interrupted = sweep.run_all("smoke", runs, [None], tmp_path, on_finish=lambda run, seconds: None)
    finally:
        timer.cancel()
    assert interrupted
    assert runs[0].status == "interrupted" and runs[1].status == "pending"


def test_a_real_sweep_runs_skips_when_done_and_results_reads_it(workdir, capsys):
    args = ["smoke", "--arms", "none,erase", "--seeds", "1", "--jobs", "2", "--steps=2", "--max_new=8",
            "--basis_k=2", "--eval_prompts=6"]
    assert sweep.main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "smoke-none-s1  done in" in out and "smoke-erase-s1  done in" in out
    sweep_dir = workdir / "out" / "sweeps" / "smoke"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["name"], r["status"], r["exit_code"]) for r in record["runs"]] == [
        ("smoke-none-s1", "done", 0), ("smoke-erase-s1", "done", 0)]
    share = max(1, sweep.available_cores() // 2)
    config = json.loads((sweep_dir / "smoke-erase-s1" / "config.json").read_text())
    assert config["threads"] == share and config["grade_workers"] == share

    assert sweep.main(args) == 0
    assert "0 to start, 0 to resume, 2 already complete" in capsys.readouterr().out
    assert (sweep_dir / "logs" / "smoke-none-s1.log").read_text().count("=== ") == 1
    assert "2 complete runs, 0 incomplete" in build_report(sweep_dir)


def test_an_arm_with_a_gate_runs_under_it_and_is_named_for_it(tmp_path):
    runs = sweep.expand_grid("organism", sweep.parse_arms("erase@no_gate:random,screen+erase"), [1], None, {},
                             tmp_path)
    assert [r.name for r in runs] == ["organism-erase@no_gate-random-s1", "organism-screen+erase-s1"]
    assert runs[0].overrides["gate"] == "no_gate" and runs[0].overrides["intervention"] == "erase"
    assert "gate" not in runs[1].overrides and runs[1].overrides["intervention"] == "screen+erase"
    with pytest.raises(sweep.SweepError, match="give a run's gate once"):
        sweep.expand_grid("organism", sweep.parse_arms("erase@no_gate"), [1], None, {"gate": "smoothed"}, tmp_path)
    with pytest.raises(sweep.SweepError, match="smoothed is the organism preset's gate; write the arm without"):
        sweep.expand_grid("organism", sweep.parse_arms("erase@smoothed"), [1], None, {}, tmp_path)
    with pytest.raises(sweep.SweepError, match="none does not train with V"):
        sweep.parse_arms("none@no_gate")
    # A gate given to the whole sweep names its runs as the arm label results will give them.
    runs = sweep.expand_grid("organism", sweep.parse_arms("erase"), [1], None, {"gate": "no_gate"}, tmp_path)
    assert runs[0].name == "organism-erase@no_gate-s1"


def test_an_arm_with_a_monitor_reads_it_and_is_named_for_it(tmp_path):
    arms = sweep.parse_arms("screen~probe~r0.7~fp0.02,erase@no_gate~r0.4~fp0.02:random,none")
    runs = sweep.expand_grid("organism", arms, [1], None, {"pairs": "live"}, tmp_path)
    assert [r.name for r in runs] == ["organism-screen~probe~r0.7~fp0.02-s1",
                                      "organism-erase@no_gate~r0.4~fp0.02-random-s1", "organism-none-s1"]
    assert {k: runs[0].overrides[k] for k in ("intervention", "monitor", "detector_recall", "detector_fpr")} == \
        {"intervention": "screen", "monitor": "probe", "detector_recall": "0.7", "detector_fpr": "0.02"}
    assert (runs[1].overrides["gate"], runs[1].overrides["detector_recall"]) == ("no_gate", "0.4")
    assert "detector_recall" not in runs[2].overrides
    with pytest.raises(sweep.SweepError, match="give a run's monitor once"):
        sweep.expand_grid("organism", sweep.parse_arms("screen~r0.7"), [1], None, {"detector_recall": "0.5"}, tmp_path)
    for arm, error in [("none~r0.7", "none reads no monitor"), ("erase~probe", "its V reads the detector's flags"),
                       ("screen~r1", "write its monitor as 'screen'"), ("screen~fp0.1~r0.5", "'screen~r0.5~fp0.1'"),
                       ("screen~q0.5", "unknown monitor 'q0.5'")]:
        with pytest.raises(sweep.SweepError, match=error):
            sweep.parse_arms(arm)
    # a monitor given to the whole sweep names its runs as the arm label results will give them
    runs = sweep.expand_grid("organism", sweep.parse_arms("screen"), [1], None, {"detector_recall": "0.7"}, tmp_path)
    assert runs[0].name == "organism-screen~r0.7-s1"


def test_help_lists_the_presets_and_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--arms" in text and "\n  organism: " in text and "--detector_recall (float, default 1.0)" in text
