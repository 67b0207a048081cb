"""The package run as a child process for the benchmark: a preset's steps in a scratch directory and
each part's share of them (`step_split`), the organism step taking turns with an older commit's code
(`just bench-vs`), and out/bench.json, which `just bench`, `bench-vs` and `bench-peer` share.

Module order: above files; bench, bench_peer and device_check import it.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .files import write_atomically


def run_child(args: list[str], where: str, env: dict | None = None) -> None:
    """`python -m` args in a child process; one that fails is a SystemExit naming it, `where` it ran and
    its last error line (its own output is captured, so the reason would otherwise be lost)."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench: {' '.join(args)} failed on {where}: {tail}")


def step_split(preset: str, steps: int, *args: str, src: str | None = None) -> dict[str, float]:
    """Train `preset` for `steps` in a scratch dir (with the package found in `src`, if given,
    instead of this one); the mean step time, each part's share of it and the mean completion
    length, past two warm-up steps."""
    if steps < 3:
        raise ValueError(f"step_split: {steps} steps leave none past the two warm-up steps")
    env = {**os.environ, "PROJECTED_GRPO_CACHE": os.path.abspath("out/cache")}
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        run_child(["projected_grpo.train", preset, f"--steps={steps}", "--run_name=bench", f"--out_dir={scratch}/runs",
                   *args], "the older commit" if src else "this checkout", env)
        rows = [json.loads(line) for line in open(f"{scratch}/runs/bench/metrics.jsonl")][2:]
    return {"step_s": sum(r["step_seconds"] for r in rows) / len(rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
            **{f"split_{part}": share for part, share in split_of(rows).items()}}


def turns_case(commit: str, seeds: list[int], steps: int, train_args: list[str],
               preset: str = "organism") -> dict[str, float]:
    """`preset`'s step with `train_args` (an arm and its settings) on this code against `commit`'s,
    taking turns seed by seed (the same `steps`-step run, alone, each in its own process; the order
    flips from seed to seed so drift in the machine's load does not favour one code): per seed each
    code's mean step, its generate / score seconds and its mean completion length (the work: the
    trajectories part after a few steps), and the ratio now / then; the ratios' geometric mean."""
    with tempfile.TemporaryDirectory() as then:
        # `COMMIT:src` names the package's folder from the top of the repository, wherever this runs
        archive = subprocess.run(["git", "archive", f"{commit}:src"], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"--vs {commit}: git cannot read its src/ from this checkout "
                             f"({archive.stderr.decode().strip()})")
        subprocess.run(["tar", "-x", "-C", then], input=archive.stdout, check=True)
        if not os.path.isdir(os.path.join(then, "projected_grpo")):
            raise SystemExit(f"--vs {commit}: its src/ holds no projected_grpo package")
        out, ratios = {}, []
        for n, seed in enumerate(seeds):
            codes = [("then", then), ("now", None)]
            for code, src in codes[::-1] if n % 2 else codes:
                split = step_split(preset, steps, *train_args, f"--seed={seed}", "--eval_prompts=6",
                                   "--eval_samples=1", src=src)
                out |= {f"s{seed}_{code}_step_s": split["step_s"], f"s{seed}_{code}_tokens": split["completion_tokens"],
                        **{f"s{seed}_{code}_{part}_s": split["step_s"] * split[f"split_{part}"]
                           for part in ("generate", "score")}}
            ratios.append(out[f"s{seed}_now_step_s"] / out[f"s{seed}_then_step_s"])
            out[f"s{seed}_now_over_then"] = ratios[-1]
    return out | {"now_over_then": statistics.geometric_mean(ratios)}


def split_of(rows: list[dict]) -> dict[str, float]:
    """Each part's share of the summed step time of metrics rows: generate, grade, score, project, optimizer."""
    total = sum(r["step_seconds"] for r in rows)
    return {p: sum(r[f"t_{p}"] for r in rows) / total for p in ("generate", "grade", "score", "project", "optimizer")}


def vs_main(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds={args.seeds}: comma-separated integers") from None
    if args.steps < 4:
        raise SystemExit(f"--steps={args.steps}: at least 4 (the first two are warm-up)")
    print(f"bench: the organism step, taking turns with {args.vs} ...", file=sys.stderr, flush=True)
    figures = turns_case(args.vs, seeds, args.steps, shlex.split(args.arm))
    lines = [f"organism step (s, mean past 2 warm-up steps of {args.steps}) with {args.arm}, {args.vs} and now "
             f"taking turns:", "",
             f"| seed | {args.vs}: step / generate / score (s), tokens | now: step / generate / score (s), tokens "
             f"| now / then |", "|---|---|---|---|"]
    for seed in seeds:
        cells = [" / ".join(f"{figures[f's{seed}_{code}_{part}_s']:.3f}" for part in ("step", "generate", "score"))
                 + f", {figures[f's{seed}_{code}_tokens']:.1f}" for code in ("then", "now")]
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {figures[f's{seed}_now_over_then']:.2f} |")
    lines.append(f"| all | | | {figures['now_over_then']:.2f} (geometric mean) |")
    print("\n".join(lines))
    update_record(args.out, {f"vs {args.arm}": {"commit": args.vs, "steps": args.steps, "figures": figures}})
    return 0


def update_record(path: str, entries: dict) -> None:
    """Merge `entries` into the JSON record at `path`: `just bench`, `bench-vs` and `bench-peer`
    share out/bench.json, each replacing only its own keys."""
    record = {}
    if os.path.exists(path):
        try:
            record = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e}); delete it and run again") from None
    write_atomically(path, json.dumps({**record, **entries}, indent=2))
