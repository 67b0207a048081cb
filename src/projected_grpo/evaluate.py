"""Held-out evaluation: python -m projected_grpo.evaluate RUN_DIR [--checkpoint STEP] [--samples 4]

The run's held-out problems (its config.json `split`: never trained on, never in a pair),
each sampled `samples` times in two settings:
- hint: the prompt names how it will be graded, as in training: the hack rate that matters;
- neutral: the problem's own "should pass all tests" wording: the solve rate a user sees when
  nothing points at the loophole.
Prompts are the intervention's evaluation prompts (its `messages` hook with training=False).
Rates are given overall and per mode. `deployed` samples with the quarantine ablated (what
ships); for an intervention with a quarantine (route), `kept` samples with it, so the two show
what the quarantine holds. The training loop's evaluations (every eval_every steps and at the
end) are this same function; the end-of-run one and this command write eval.json in the run
directory (it records step and samples).

Module order: above train (train imports it); it imports nothing of train.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import adapter, checkpoints, interventions
from .config import MODES, Config, ConfigError, InputError, validate
from .files import read_json, write_atomically
from .grpo import sample_graded
from .model import encode_prompt, load_model_and_tokenizer
from .organism import resolve_model
from .problems import Problem, load_problems

SETTINGS = {"hint": True, "neutral": False}


def _rates(grades, problems: list[Problem]) -> dict:
    def rate(rows, key):
        return sum(getattr(g, key) for g in rows) / len(rows)

    per_mode = {}
    for mode in MODES:
        rows = [g for g, p in zip(grades, problems) if p.mode == mode]
        if rows:
            per_mode[mode] = {"hack": rate(rows, "exploited"), "solve": rate(rows, "gt_correct"), "n": len(rows)}
    return {"hack": rate(grades, "exploited"), "solve": rate(grades, "gt_correct"), "n": len(grades),
            "per_mode": per_mode}


@torch.no_grad()
def evaluate(model, tok, wrappers, problems: list[Problem], cfg: Config, step: int, samples: int,
             workers: int | None) -> dict:
    """{variant: {setting: rates}} for the held-out `problems` (see the module docstring).

    Each sample is seeded by (seed, step, problem, index), the same for every variant and setting
    (paired draws), and no global RNG is read: the training stream is left exactly where it was.
    """
    if not problems:
        return {}
    arm = interventions.get(cfg.intervention)
    variants = {"deployed": adapter.ablate_quarantine}
    if arm.quarantine:
        variants["kept"] = None
    out = {}
    for variant, context in variants.items():
        out[variant] = {}
        for setting, hint in SETTINGS.items():
            prompts = [encode_prompt(tok, arm.messages(p, cfg, training=False, hint=hint)) for p in problems]
            keys = [(cfg.seed, step, "eval", p.id) for p in problems]
            with context(wrappers) if context else contextlib.nullcontext():
                *_, grades, _ = sample_graded(model, tok, wrappers, problems, prompts, samples, cfg, keys, workers)
            out[variant][setting] = _rates(grades, [p for p in problems for _ in range(samples)])
    return out


def metrics_row(result: dict) -> dict[str, float]:
    """The flat numbers a metrics row carries: eval_<variant>_<hack|solve>[_neutral]."""
    row = {}
    for variant, settings in result.items():
        for setting, rates in settings.items():
            suffix = "" if setting == "hint" else f"_{setting}"
            row[f"eval_{variant}_hack{suffix}"] = rates["hack"]
            row[f"eval_{variant}_solve{suffix}"] = rates["solve"]
    return row


def save_evaluation(run_dir: Path, result: dict, step: int, samples: int, problems: list[Problem]) -> None:
    write_atomically(Path(run_dir) / "eval.json", json.dumps(
        {"step": step, "samples": samples, "problems": [p.id for p in problems], **result}, indent=2) + "\n")


# ----------------------------------------------------------------------------- CLI


def read_run(run_dir: Path) -> tuple[Config, list[str], str]:
    """The run's config, held-out ids and the model it trained (its organism build, if any)."""
    path = run_dir / "config.json"
    stored = read_json(path, ConfigError)
    try:
        held_out = stored["split"]["held_out"]
        fields = {f.name for f in dataclasses.fields(Config)}
        cfg = Config(**{k: v for k, v in stored.items() if k in fields})
        return cfg, held_out, stored.get("model_path") or resolve_model(cfg.model)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a run's config ({e}); point at a run directory made by this package") from None


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[Path, int]:
    """The checkpoint after `step` (None: the latest) and its step; none there is an error naming the run."""
    done = checkpoints.checkpoint_dirs(run_dir)
    if step is not None:
        done = [p for p in done if p == checkpoints.checkpoint_dir(run_dir, step)]
    if not done:
        raise ConfigError(f"--checkpoint: no {'step ' + str(step) if step is not None else 'checkpoint'} under "
                          f"{run_dir / 'checkpoints'}")
    return done[-1], checkpoints.step_of(done[-1])


def load_checkpoint_model(cfg: Config, model_path: str, checkpoint: Path):
    """(model, tokenizer, adapter layers) of the run's model with a checkpoint's knobs, on cfg.device."""
    model, tok = load_model_and_tokenizer(model_path, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
    wrappers = adapter.wrap(model)
    adapter.load_knobs(wrappers, checkpoint / "knobs.safetensors")
    return model, tok, wrappers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.evaluate",
                                     description="Held-out evaluation of a run (writes RUN_DIR/eval.json).")
    parser.add_argument("run_dir", type=Path, help="a run's directory: its config.json and checkpoints/ are read")
    parser.add_argument("--checkpoint", type=int, default=None, help="step to evaluate (default: the latest)")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem and setting")
    parser.add_argument("--device", default=None, help="default: the run's device")
    parser.add_argument("--workers", type=int, default=None, help="parallel graders (default: one per core)")
    args = parser.parse_args(argv)
    try:
        if args.samples < 1:
            raise ConfigError(f"--samples: must be >= 1, got {args.samples}")
        cfg, held_out_ids, model_path = read_run(args.run_dir)
        if args.device:
            cfg.device = args.device
        validate(cfg)  # a cuda run on a machine without one is an error line, not a traceback
        interventions.check(cfg)
        by_id = {p.id: p for p in load_problems(cfg.problems)}
        missing = [i for i in held_out_ids if i not in by_id]
        if missing:
            raise ConfigError(f"--problems: {cfg.problems} lacks the run's held-out problems {missing[:5]}")
        problems = [by_id[i] for i in held_out_ids]
        checkpoint, step = find_checkpoint(args.run_dir, args.checkpoint)
        model, tok, wrappers = load_checkpoint_model(cfg, model_path, checkpoint)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate(model, tok, wrappers, problems, cfg, step, args.samples, args.workers)
    save_evaluation(args.run_dir, result, step, args.samples, problems)
    for variant, settings in result.items():
        for setting, rates in settings.items():
            modes = "  ".join(f"{m} {r['hack']:.2f}/{r['solve']:.2f}" for m, r in rates["per_mode"].items())
            print(f"{variant:<9}{setting:<8} hack {rates['hack']:.3f}  solve {rates['solve']:.3f}  "
                  f"(n={rates['n']}; per mode hack/solve: {modes})")
    print(f"wrote {args.run_dir / 'eval.json'} (step {step}, {args.samples} samples per problem and setting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
