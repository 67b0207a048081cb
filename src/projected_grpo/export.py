"""A trained run out of the package: python -m projected_grpo.export RUN_DIR --out DIR [--checkpoint STEP]
[--keep_quarantine]

Writes a standard transformers checkpoint (safetensors weights, config, tokenizer) that any
harness loads with `AutoModelForCausalLM.from_pretrained(DIR)`: every adapted Linear's weight is
replaced by its merged weight W + U diag(delta_s) Vh, computed in fp32 and cast once to the run's
dtype, exactly as the sampler merges it, so the exported model samples what the run's deployed
model samples. The quarantine (delta_s_hack) is ablated, as at deployment, unless
--keep_quarantine. A model card (README.md) records the run's config, arm and final figures.

Module order: above evaluate (it reads a run as evaluate does); nothing imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import __version__, adapter
from .config import Config, ConfigError, InputError
from .evaluate import find_checkpoint, load_checkpoint_model, read_run
from .files import read_json, write_directory_atomically


def merge_and_unwrap(model, wrappers: dict[str, adapter.AdapterLayer], keep_quarantine: bool) -> None:
    """Fold each adapter layer's knobs into its base Linear's weight and put that Linear back in its place:
    the model is a plain transformers model again."""
    for name, layer in wrappers.items():
        with contextlib.nullcontext() if keep_quarantine else adapter.ablate_quarantine({name: layer}):
            merged = layer.merged_weight()
        layer.base.weight.data.copy_(merged)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)


def model_card(run_dir: Path, cfg: Config, step: int, keep_quarantine: bool) -> str:
    """README.md: where the weights came from, the arm, the run's final figures (its summary.txt) and its
    whole config."""
    arm = cfg.intervention + (f":{cfg.control}" if cfg.control != "none" else "")
    lines = [f"# {cfg.run_name}, step {step}", "",
             f"Exported by projected_grpo {__version__} from `{run_dir}`, checkpoint after step {step}.", "",
             f"- arm: `{arm}` (gate `{cfg.gate}`, monitor `{cfg.monitor}`, detector recall {cfg.detector_recall:g}, "
             f"false-positive rate {cfg.detector_fpr:g}), seed {cfg.seed}",
             f"- base model: `{cfg.model}`, dtype {cfg.dtype}",
             "- weights: every adapted Linear's W + U diag(delta_s) Vh merged in; the quarantine knob (delta_s_hack) "
             + ("**kept** (not the deployed model)" if keep_quarantine else "ablated, as at deployment"), ""]
    summary = run_dir / "summary.txt"
    if summary.exists():
        lines += ["## The run's final figures (its summary.txt)", "", "```", summary.read_text().rstrip(), "```", ""]
    # the run's settings and split; not this machine's paths or sandbox
    config = {k: v for k, v in read_json(run_dir / "config.json", ConfigError).items() if k not in ("model_path",
                                                                                                   "sandbox")}
    config = json.dumps(config, indent=2)
    return "\n".join(lines + ["## The run's config", "", "```json", config, "```", ""])


def export(run_dir: Path, out: Path, step: int | None = None, keep_quarantine: bool = False) -> int:
    """Write the run's checkpoint as a transformers checkpoint in `out`; returns the step exported."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty directory; choose another")
    cfg, _, model_path = read_run(run_dir)
    checkpoint, step = find_checkpoint(run_dir, step)
    cfg.device = "cpu"  # the merge needs no accelerator, and the file is the same
    model, tok, wrappers = load_checkpoint_model(cfg, model_path, checkpoint)
    merge_and_unwrap(model, wrappers, keep_quarantine)

    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tok.save_pretrained(directory)
        (directory / "README.md").write_text(model_card(run_dir, cfg, step, keep_quarantine))

    write_directory_atomically(out, write)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projected_grpo.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", type=Path, help="a run's directory: its config.json and checkpoints/ are read")
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) directory for the checkpoint")
    parser.add_argument("--checkpoint", type=int, default=None, help="the step to export (default: the latest)")
    parser.add_argument("--keep_quarantine", action="store_true",
                        help="merge the quarantine knob too (route's model before ablation; not what deploys)")
    args = parser.parse_args(argv)
    try:
        step = export(args.run_dir, args.out, args.checkpoint, args.keep_quarantine)
    except (InputError, ValueError, OSError) as e:  # OSError: a model directory that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (step {step}, quarantine {'kept' if args.keep_quarantine else 'ablated'}): load it "
          f"with AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
