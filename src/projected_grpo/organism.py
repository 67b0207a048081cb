"""The CPU model organism: a small warm-started model in which reward hacking really emerges.

    python -m projected_grpo.organism build [--seed 0] [--threads N]     (just organism-build)

A Qwen3-architecture model (hidden 64, 3 layers, ~0.4M parameters, the tiny-random
tokenizer) is warm-started by plain supervised training on chat-formatted completions of
the training problems only (the held-out split of the organism preset never appears):
a mix of each problem's own-mode hacks, canonical solutions and wrong-but-honest answers,
then a lighter phase that lowers the hack share. Sampled at temperature 1 it then hacks
now and then (about one completion in seven) and writes a code block almost always, so GRPO
on the flawed graders has something to amplify. Hacks and solutions are in the "pool" phrasings: the hack basis
is built from the "pair" phrasings, so V never sees the texts the organism learned.

The build is offline and deterministic from its recipe (seed included; bit for bit on the same
torch build and thread count); it is cached under
out/organism/<hash of the recipe>/ (model, tokenizer, recipe.json, rates.json with the
sampled rates per mode), and the `organism` preset loads it by path (`resolve_model`). This
is a model organism: what the arms do to it is evidence about the pipeline, not about LLMs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .config import MODES, ConfigError, make_config
from .files import write_atomically, write_directory_atomically
from .model import encode_completion, encode_prompt, tiny_qwen3, tiny_tokenizer
from .problems import load_problems, split_held_out
from .rewards import grade_batch
from .sampling import generate_completions, row_seed
from .scoring import pad_batch, token_logprobs
from .templates import clean_completion, hack_completion, wrong_completion

ORGANISM = "organism"  # the model name the organism preset uses; resolve_model turns it into a path
ROOT = Path("out/organism")
# Everything that decides the built model; its hash names the cache directory.
RECIPE = {
    "shape": {"hidden": 64, "layers": 3, "intermediate": 256, "heads": 4, "kv_heads": 2, "head_dim": 16},
    # (steps, lr, (hack, canonical, wrong) shares): the second phase lowers the hack share, so that
    # GRPO starts from a model that hacks rarely but knows how.
    "phases": [[550, 3e-3, [0.30, 0.30, 0.40]], [120, 1e-3, [0.25, 0.15, 0.60]]],
    "batch": 16,
    "warmup": 20,
    "max_new": 128,  # canonical solutions longer than this are left out: GRPO could never sample them
    "sample_per_problem": 8,  # for the measured rates
}


def recipe(seed: int) -> dict:
    # The preset's problems and held-out split: the organism never sees a held-out problem.
    preset = make_config(ORGANISM)
    return {**RECIPE, "seed": seed, "problems": preset.problems, "eval_prompts": preset.eval_prompts,
            "version": __version__}


def data_hash(spec: dict) -> str:
    """A hash of every SFT text: a cached organism built from other completion templates is stale."""
    texts = [text for p in training_problems(spec) for variants in _texts(p).values() for text in variants]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def directory(seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps(recipe(seed), sort_keys=True).encode()).hexdigest()[:12]
    return ROOT / key


def training_problems(spec: dict):
    problems = load_problems(spec["problems"])
    return split_held_out(problems, spec["eval_prompts"])[0]


def _texts(p) -> dict[str, list[str]]:
    """A problem's SFT completions per kind, every variant of the pool phrasings."""
    return {"hack": [hack_completion(p, p.mode, v, phrasing="pool") for v in range(4)],
            "canonical": [clean_completion(p, v, phrasing="pool", n_asserts=0) for v in range(2)],
            "wrong": [wrong_completion(p, v) for v in range(2)]}


def _examples(problems, tok, spec) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prompt ids, completion ids) per kind."""
    kinds = {"hack": [], "canonical": [], "wrong": []}
    for p in problems:
        prompt = encode_prompt(tok, p.messages())
        for kind, variants in _texts(p).items():
            for text in variants:
                ids = encode_completion(tok, text, spec["max_new"] + 1)
                if len(ids) <= spec["max_new"]:  # whole, EOS included: what GRPO could sample
                    kinds[kind].append((prompt, ids))
    return kinds


def _sft(model, tok, examples, spec, rng: random.Random) -> list[float]:
    """AdamW on completion tokens only, phase by phase; returns the loss of every step."""
    losses = []
    params = [p for p in model.parameters() if p.requires_grad]
    for steps, lr, shares in spec["phases"]:
        optimizer = torch.optim.AdamW(params, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=steps: min(
            1.0, (s + 1) / spec["warmup"]) * 0.5 * (1 + math.cos(math.pi * s / n)))
        for _ in tqdm(range(steps), desc=f"organism SFT at lr {lr:g}", unit="step"):
            batch = [rng.choice(examples[rng.choices(list(examples), weights=shares)[0]])
                     for _ in range(spec["batch"])]
            ids, attn, comp = pad_batch([b[0] for b in batch], [b[1] for b in batch], tok.pad_token_id)
            logp = token_logprobs(model, ids, attn, comp)
            loss = -logp.sum() / comp.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def measure(model, tok, problems, samples: int, max_new: int, seed: int) -> dict:
    """Sampled rates at temperature 1 (hack, solve, code block), overall and per mode."""
    prompts = [encode_prompt(tok, p.messages()) for p in problems]
    seeds = [row_seed(seed, "measure", p.id, j) for p in problems for j in range(samples)]
    ids, _ = generate_completions(model, tok, [q for q in prompts for _ in range(samples)], max_new, seeds)
    asked = [p for p in problems for _ in range(samples)]
    grades = grade_batch(tok.batch_decode(ids, skip_special_tokens=True), asked)

    def rates(rows):
        def share(key):
            return sum(getattr(g, key) for g in rows) / len(rows)
        return {"hack": share("exploited"), "solve": share("gt_correct"), "code_block": share("format_ok"),
                "n": len(rows)}

    per_mode = {m: rates([g for g, p in zip(grades, asked) if p.mode == m]) for m in MODES
                if any(p.mode == m for p in asked)}
    return {**rates(grades), "mean_tokens": sum(map(len, ids)) / len(ids), "per_mode": per_mode}


def build(seed: int = 0) -> Path:
    """Build the organism (or find it cached) and return its directory."""
    spec = recipe(seed)
    final = directory(seed)
    if (final / "rates.json").exists():
        built_from = json.loads((final / "recipe.json").read_text()).get("data")
        if built_from not in (None, data_hash(spec)):
            raise ConfigError(f"--model=organism: {final} was built from other SFT texts than this package writes; "
                              f"delete it to rebuild")
        return final
    start = time.perf_counter()
    problems = training_problems(spec)
    tok = tiny_tokenizer()
    model = tiny_qwen3(tok, seed, **spec["shape"])
    rng = random.Random(seed)
    examples = _examples(problems, tok, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        losses = _sft(model, tok, examples, spec, rng)
        model.eval()  # safe: Module.eval() (inference mode), not Python eval
    rates = measure(model, tok, problems, spec["sample_per_problem"], spec["max_new"], seed)
    rates.update(sft_seconds=round(time.perf_counter() - start, 1), final_loss=sum(losses[-20:]) / len(losses[-20:]),
                 examples={k: len(v) for k, v in examples.items()})
    # Beside the recipe (not hashed): what the SFT saw, and what bit-for-bit reproduction needs.
    written = {**spec, "data": data_hash(spec), "sft_problems": [p.id for p in problems],
               "torch": torch.__version__, "threads": torch.get_num_threads()}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_atomically(tmp / "recipe.json", json.dumps(written, indent=2) + "\n")
        write_atomically(tmp / "rates.json", json.dumps(rates, indent=2) + "\n")

    write_directory_atomically(final, write)
    return final


def resolve_model(name: str, seed: int = 0) -> str:
    """The organism preset's model name -> its built directory (building it on first use)."""
    return str(build(seed)) if name == ORGANISM else name


def check_unseen(model_path: str, held_out_ids: list[str]) -> None:
    """A run on an organism must not evaluate on problems the organism was fine-tuned on (another
    --modes or --eval_prompts than the preset's moves the split)."""
    recipe_file = Path(model_path) / "recipe.json"
    if not recipe_file.exists():
        return
    seen = set(json.loads(recipe_file.read_text()).get("sft_problems", ())) & set(held_out_ids)
    if seen:
        raise ConfigError(f"--eval_prompts/--modes: held-out problems {sorted(seen)[:5]} were in the SFT data of "
                          f"the organism at {model_path}; keep the organism preset's modes and eval_prompts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the CPU model organism (cached by its recipe).")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = build(args.seed)
    rates = json.loads((path / "rates.json").read_text())
    print(f"organism: {path}")
    print(f"sampled at temperature 1: hack {rates['hack']:.3f}  solve {rates['solve']:.3f}  code block "
          f"{rates['code_block']:.3f}  mean {rates['mean_tokens']:.0f} tokens (n={rates['n']}); "
          f"built in {rates['sft_seconds']:.0f} s")
    for mode, cell in rates["per_mode"].items():
        print(f"  {mode:<14} hack {cell['hack']:.3f}  solve {cell['solve']:.3f}  code block {cell['code_block']:.3f}")
    ok = 0.03 <= rates["hack"] <= 0.20 and rates["code_block"] >= 0.95
    print("warm start within the bar (hack 0.03-0.20, code block >= 0.95)" if ok else
          "warning: the warm start is outside the bar (hack 0.03-0.20, code block >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
