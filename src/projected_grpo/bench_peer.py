"""`just bench-peer`: the organism's GRPO step through TRL's GRPOTrainer and through projected_grpo.

The same work on each side: the organism model, its training problems, 4 prompts x 8
completions a step, at most 128 new tokens at temperature 1 with no nucleus cut, the package's
grader as the reward, Dr.GRPO's loss without a KL term (the preset's top_p and beta are set to
1 and 0 here, as TRL's are), the same small learning rate (TRL: LoRA r=8 on the
adapter's target modules, loss_type="dr_grpo", beta=0, num_iterations=1,
scale_rewards="none", per-device batch = one step's completions; projected_grpo: the
organism preset, arms `none` and `erase`). Each case runs in a process of its own (so its
peak RSS is its own), the cases take turns for `--rounds`, and each reports the median step
time after its warm-up steps, its own split where it has one, and its mean completion length
(a check that the work was the same). Writes them under "peer" in out/bench.json.

Needs the `peer` extra (trl, peft); nothing else in the package imports them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("trl", "none", "erase")
WARMUP = 3  # steps left out of each median: first generate calls, allocator growth


def run_trl(steps: int, lr: float, out_dir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from .adapter import DEFAULT_TARGETS
    from .config import make_config
    from .model import load_model_and_tokenizer
    from .organism import resolve_model
    from .rewards import grade_batch
    from .train import split_problems

    cfg = make_config("organism", {})
    train, _ = split_problems(cfg)
    by_id = {p.id: p for p in train}
    model, tok = load_model_and_tokenizer(resolve_model(cfg.model))
    data = Dataset.from_list([{"prompt": p.messages(), "problem_id": p.id} for p in train])
    lengths = []

    def reward(prompts, completions, problem_id, completion_ids, **_):
        lengths.extend(len(ids) for ids in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [g.reward for g in grade_batch(texts, [by_id[i] for i in problem_id])]

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    # One batch of the whole step's completions: scoring them a group at a time through gradient
    # accumulation, as the organism preset scores, made TRL slower (docs/performance.md).
    completions = cfg.group * cfg.prompts_per_step
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=completions, num_generations=cfg.group,
                      max_completion_length=cfg.max_new, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                      loss_type="dr_grpo", scale_rewards="none", num_iterations=1, learning_rate=lr,
                      max_steps=steps, use_cpu=True, bf16=False, logging_steps=1, report_to="none",
                      save_strategy="no", disable_dropout=True, gradient_checkpointing=False,
                      seed=1)  # no checkpointing: projected_grpo does not recompute activations either
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGETS)),
                          callbacks=[StepTimer()])
    trainer.train()
    return {"step_seconds": times, "mean_completion_tokens": sum(lengths) / len(lengths),
            "completions_per_step": len(lengths) / len(times)}


def run_projected(arm: str, steps: int, lr: float, out_dir: str) -> dict:
    from .train import main

    if main(["organism", f"--intervention={arm}", f"--steps={steps}", "--run_name=peer", f"--out_dir={out_dir}",
             "--eval_samples=1", f"--lr={lr}", "--top_p=1.0", "--beta=0"]):
        raise RuntimeError(f"projected_grpo ({arm}) failed")
    from .bench_runs import split_of

    rows = [json.loads(line) for line in open(f"{out_dir}/peer/metrics.jsonl")]
    return {"step_seconds": [r["step_seconds"] for r in rows], "split": split_of(rows[WARMUP:]),
            "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
            "completions_per_step": 32}


def one_case(case: str, steps: int, lr: float) -> dict:
    """Run one case here and return its figures with this process's peak RSS."""
    with tempfile.TemporaryDirectory() as scratch:
        result = run_trl(steps, lr, scratch) if case == "trl" else run_projected(case, steps, lr, scratch)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help=f"steps per case and round ({WARMUP} are warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="times each case runs, taking turns")
    parser.add_argument("--lr", type=float, default=1e-6,
                        help="both sides; small, so both keep sampling the warm start and the work stays the same "
                             "(at the organism's 3e-2, TRL's LoRA run drifts to 128-token completions)")
    parser.add_argument("--out", default="out/bench.json", help="its figures go under the key 'peer'")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # a child process: one case
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(one_case(args.case, args.steps, args.lr)))
        return 0
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    runs = {case: [] for case in CASES}
    for round_ in range(args.rounds):
        for case in CASES:
            print(f"bench-peer: round {round_ + 1}/{args.rounds}, {case} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-m", "projected_grpo.bench_peer", f"--case={case}",
                                  f"--steps={args.steps}", f"--lr={args.lr}"], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"bench-peer: {case} failed:\n{out.stderr[-3000:]}")
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    figures = {}
    for case, results in runs.items():
        steps = [t for r in results for t in r["step_seconds"][WARMUP:]]
        figures[case] = {"median_step_s": statistics.median(steps), "measured_steps": len(steps),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                         "mean_completion_tokens": statistics.mean(r["mean_completion_tokens"] for r in results),
                         "completions_per_step": results[0]["completions_per_step"]}
        if "split" in results[0]:
            figures[case]["split"] = {k: statistics.mean(r["split"][k] for r in results) for k in results[0]["split"]}
    for arm in ("none", "erase"):
        figures[f"{arm}_over_trl_step"] = figures[arm]["median_step_s"] / figures["trl"]["median_step_s"]
        figures[f"{arm}_over_trl_rss"] = figures[arm]["peak_rss_mb"] / figures["trl"]["peak_rss_mb"]
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(f"machine: {machine}")
    print("| case | median step (s) | peak RSS (MB) | mean completion tokens | completions/step |")
    print("|---|---|---|---|---|")
    for case in CASES:
        f = figures[case]
        print(f"| {case} | {f['median_step_s']:.3f} | {f['peak_rss_mb']:.0f} | {f['mean_completion_tokens']:.1f} "
              f"| {f['completions_per_step']:.0f} |")
    print(f"projected_grpo / TRL step time: none {figures['none_over_trl_step']:.2f}, "
          f"erase {figures['erase_over_trl_step']:.2f} (target <= 0.3)")
    from .bench_runs import update_record

    update_record(args.out, {"peer": {"machine": machine, "steps": args.steps, "rounds": args.rounds, "lr": args.lr,
                                      "figures": figures}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
