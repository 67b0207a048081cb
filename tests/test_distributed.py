"""Data parallelism: two Gloo ranks on the CPU take the same steps as one process over the same global batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from projected_grpo import distributed
from projected_grpo.config import ConfigError, make_config

# Two prompt groups a step, so each rank takes one; a refresh at step 2 goes through the broadcast too.
RUN = ["smoke", "--steps=3", "--max_new=16", "--basis_k=4", "--checkpoint_every=1", "--prompts_per_step=2",
       "--refresh_every=2", "--intervention=erase", "--eval_prompts=4"]

# Rank 1 runs in a directory of its own (sharing only the pool cache), so anything it wrote would show there.
# INJECT=nan|sigint makes rank 1 alone meet a non-finite loss, or a Ctrl-C, in step 2.
LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    os.chdir(sys.argv[1] if os.environ["RANK"] == "0" else sys.argv[2])
    from projected_grpo import step, train
    if os.environ["RANK"] == "1" and os.environ.get("INJECT"):
        real = step.backward_rollouts
        def injected(*args, **kwargs):
            if injected.calls == 1:
                if os.environ["INJECT"] == "nan":
                    raise FloatingPointError("injected non-finite loss")
                os.kill(os.getpid(), signal.SIGINT)
            injected.calls += 1
            return real(*args, **kwargs)
        injected.calls = 0
        step.backward_rollouts = injected
    sys.exit(train.main(sys.argv[3:]))
""")


def _env(tmp_path):
    env = {**os.environ, "PROJECTED_GRPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(tmp_path, run_name: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """RUN on two Gloo ranks, rank 0 in tmp_path/rank0 and rank 1 in tmp_path/rank1 (pool cache shared)."""
    main_dir, other_dir = tmp_path / "rank0", tmp_path / "rank1"
    if not (other_dir / "out" / "pools").exists():
        (other_dir / "out").mkdir(parents=True)
        (other_dir / "out" / "pools").symlink_to(main_dir / "out" / "pools")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(launcher), str(main_dir), str(other_dir), *RUN, f"--run_name={run_name}", *extra],
                          cwd=main_dir, env=env, capture_output=True, text=True, timeout=600)


def _knobs(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "knobs.safetensors")


def test_two_ranks_take_the_steps_one_process_takes_and_only_rank_0_writes(tmp_path):
    main_dir, other_dir = tmp_path / "rank0", tmp_path / "rank1"
    main_dir.mkdir()
    env = _env(tmp_path)
    single = subprocess.run([sys.executable, "-m", "projected_grpo.train", *RUN, "--run_name=single"],
                            cwd=main_dir, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(tmp_path, "ddp", env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    runs = main_dir / "out" / "runs"
    for step in (1, 2, 3):
        one, two = _knobs(runs / "single", step), _knobs(runs / "ddp", step)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"step {step}, {name}")
        assert any(one[name].abs().max() > 0 for name in one)  # the steps really moved the knobs
    rows = {name: (runs / name / "metrics.jsonl").read_text().splitlines() for name in ("single", "ddp")}
    assert len(rows["ddp"]) == 3
    for a, b in zip(*(map(json.loads, rows[n]) for n in ("single", "ddp"))):
        assert ("basis_overlap" in a) == ("basis_overlap" in b) == (a["step"] == 2)  # the one refresh
        for key in ("reward", "hack_s", "format_s", "cin_s", "basis_overlap", "frac_zero_spread"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert sorted(p.name for p in (runs / "ddp").iterdir()) == sorted(p.name for p in (runs / "single").iterdir())
    assert [p.name for p in (other_dir / "out").iterdir()] == ["pools"]  # rank 1 wrote no run, cache or basis

    # A non-finite loss on rank 1 alone, then a Ctrl-C reaching rank 1 alone: every rank stops at the
    # same step, and rank 0 checkpoints the state the run can resume from.
    for inject, saved, says in (("nan", 1, "non-finite loss on another rank"),
                                ("sigint", 2, "interrupted after step 2")):
        stopped = _torchrun(tmp_path, inject, {**env, "INJECT": inject})
        assert stopped.returncode != 0 and says in stopped.stderr, stopped.stderr[-3000:]
        assert max(p.name for p in (runs / inject / "checkpoints").iterdir()) == f"step_{saved:06d}"
        assert len((runs / inject / "metrics.jsonl").read_text().splitlines()) == saved
    # Resumed under torchrun; both ranks read the checkpoint (as they would sharing one working directory).
    resumed = _torchrun(tmp_path, "sigint", env, "--resume=true", f"--out_dir={runs}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, value in _knobs(runs / "single", 3).items():
        torch.testing.assert_close(_knobs(runs / "sigint", 3)[name], value, rtol=1e-5, atol=1e-6)


def test_prompt_groups_must_divide_between_the_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"--prompts_per_step=2 does not divide by the 3 ranks"):
        distributed.init(make_config("smoke", {"prompts_per_step": "2"}))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the check comes before any GPU is touched
    with pytest.raises(ConfigError, match=r"--device=cuda:1: under torchrun each rank takes the GPU of its"):
        distributed.init(make_config("smoke", {"prompts_per_step": "3", "device": "cuda:1"}))


def test_one_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    world = distributed.init(make_config("smoke", {}))
    assert world == distributed.SINGLE and world.main
    assert distributed.share(world, [1, 2, 3, 4]) == [1, 2, 3, 4]
    t = [torch.ones(2)]
    assert distributed.all_sum(world, t) is t and distributed.all_gather(world, 5) == [5]
    assert distributed.share(distributed.World(rank=1, size=2), [1, 2, 3, 4]) == [3, 4]
