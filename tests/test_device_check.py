"""The device check's CPU fallback: a part's processes run and land in one JSON, and a part that
crashes fails the check by name after the others ran. (On a GPU: just gpu-check; docs/performance.md.)"""

import json

import pytest

from projected_grpo import device_check


def test_the_cpu_fallback_runs_the_organism_arms_into_one_record(workdir, capsys):
    # the quick form (CI runs the fast dry run too: .ci/run)
    out = workdir / "check.json"
    code = device_check.main(["--device=cpu", "--model=tiny-random", "--steps=4", "--parts=organism", f"--out={out}"])
    record = json.loads(out.read_text())
    assert code == 0 and record["failed"] == [] and record["device"] == "cpu"
    organism = record["parts"]["organism"]["figures"]
    assert set(organism) == {"none", "erase_live"} and all(f["step_s"] > 0 for f in organism.values())
    assert "device check passed" in capsys.readouterr().out


def test_a_crashing_part_fails_the_check_by_name_after_the_others_ran(workdir, monkeypatch, capsys):
    def crash(*_):
        raise SystemExit("bench --device=cpu failed: RuntimeError: CUDA error: an illegal memory access")

    monkeypatch.setattr(device_check, "_bench", crash)
    monkeypatch.setattr(device_check, "_fast_dry_run", lambda *_: {"step_s": 1.0})
    out = workdir / "check.json"
    assert device_check.main(["--device=cpu", "--parts=fast_tiny_bf16,bench", f"--out={out}"]) == 1
    record = json.loads(out.read_text())
    assert record["failed"] == ["bench"] and "illegal memory access" in record["parts"]["bench"]["error"]
    assert record["parts"]["fast_tiny_bf16"]["figures"] == {"step_s": 1.0}
    assert "device check FAILED: bench" in capsys.readouterr().err


def test_bad_parts_and_a_missing_cuda_device_are_errors(workdir):
    with pytest.raises(SystemExit):
        device_check.main(["--device=cpu", "--parts=organism,warp"])
    with pytest.raises(SystemExit):
        device_check.main(["--device=cpu", "--steps=2"])
