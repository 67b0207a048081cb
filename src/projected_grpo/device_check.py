"""The device check: the package's paths on one accelerator in a few minutes, every figure in one JSON.

    python -m projected_grpo.device_check [--device cuda] [--steps 20] [--out out/device-check.json]
    (just gpu-check; --device cpu is the fallback: the suite runs its organism part on tiny-random,
    CI its organism and fast parts)

Each part runs in its own process, as a user would run it:
1. the organism preset for `steps` steps, vanilla and erase with a live V (pairs=live, refreshed every
   5 steps, or every steps // 2 in a shorter check, the update path): the step and its split;
2. the fast preset on tiny-random in bf16 for 3 steps, as route with a refresh and an evaluation after
   each but the last (a dry run of the GPU preset's paths: bf16 scoring, is_correction, leetcode problems, extraction
   and the quarantine on the device);
3. `bench --device DEVICE`.
A part that crashes is recorded with its error and the check exits 1 after the others ran, naming it.
Nothing downloads: the organism's first run builds it (offline, on the CPU, minutes, outside the step
times); on a machine that must not spend them, carry a built out/organism along.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_runs import run_child, step_split
from .files import write_atomically

PARTS = ("organism", "fast_tiny_bf16", "bench")


def _organism(device: str, steps: int, model: str) -> dict:
    arms = {"none": ["--intervention=none"],
            "erase_live": ["--intervention=erase", "--pairs=live", f"--refresh_every={min(5, steps // 2)}",
                           "--adam_leak=update"]}  # a refresh within even the fallback's few steps
    return {arm: step_split("organism", steps, *flags, f"--device={device}", f"--model={model}", "--eval_prompts=6",
                            "--eval_samples=1") for arm, flags in arms.items()}


def _fast_dry_run(device: str, max_new: int) -> dict:
    return step_split("fast", 3, "--model=tiny-random", "--dtype=bfloat16", f"--device={device}",
                      "--intervention=route", "--refresh_every=1", "--eval_every=1", "--eval_prompts=2",
                      "--eval_samples=1", f"--max_new={max_new}", "--checkpoint_every=1")


def _bench(device: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        run_child(["projected_grpo.bench", f"--device={device}", f"--repeats={repeats}", f"--out={out}"], device)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="each organism run's steps (at least 4)")
    parser.add_argument("--max_new", type=int, default=512, help="the fast dry run's completion length")
    parser.add_argument("--bench_repeats", type=int, default=5)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts, comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--model", default="organism",
                        help="the organism runs' model (the suite's quick check: tiny-random, no organism to build)")
    parser.add_argument("--out", default="out/device-check.json")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error(f"--steps={args.steps}: at least 4 (the first two are warm-up)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device={args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    asked = args.parts.split(",")
    if not asked or set(asked) - set(PARTS):
        parser.error(f"--parts={args.parts}: a comma-separated subset of {', '.join(PARTS)}")
    parts = {"organism": lambda: _organism(args.device, args.steps, args.model),
             "fast_tiny_bf16": lambda: _fast_dry_run(args.device, args.max_new),
             "bench": lambda: _bench(args.device, args.bench_repeats)}
    parts = {name: part for name, part in parts.items() if name in asked}
    record = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "args": vars(args), "parts": {}, "failed": []}
    for name, part in parts.items():
        print(f"device check: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            record["parts"][name] = {"figures": part()}
        except SystemExit as e:  # a part's process failed: recorded, and the others still run
            record["parts"][name] = {"error": str(e)}
            record["failed"].append(name)
        record["parts"][name]["seconds"] = time.perf_counter() - start
        write_atomically(args.out, json.dumps(record, indent=2))  # what ran so far survives a later crash
    for name, part in record["parts"].items():
        print(f"{name}: {part.get('error') or 'ok'} ({part['seconds']:.0f} s)")
    if record["failed"]:
        print(f"device check FAILED: {', '.join(record['failed'])} (errors in {args.out})", file=sys.stderr)
        return 1
    print(f"device check passed on {record['device']}; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
