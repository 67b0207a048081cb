"""The benchmark: `just bench` (python -m projected_grpo.bench [--large-vocab] [--device cuda]), or
the organism step taking turns with an older commit's (`--vs COMMIT`).

Every figure is a ratio of two cases measured side by side in one process, each the
median of several runs after a warm-up: absolute seconds differ between machines,
ratios should not. The table goes to stdout and to out/bench.json. The targets are
docs/performance.md's; a miss prints MISS and stays visible.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from . import adapter, hack_basis, projection, rewards, sandbox
from .bench_runs import step_split, update_record, vs_main
from .config import make_config
from .model import encode_prompt, load_model_and_tokenizer
from .organism import resolve_model
from .problems import builtin_problems
from .scoring import pad_batch, token_logprobs
from .templates import clean_completion, default_pairs, hack_completion

LARGE_VOCAB = 151936  # Qwen3's


def bench_model(vocab: int, size: str, dtype: torch.dtype, device: str, seed: int = 0) -> Qwen3ForCausalLM:
    """A Qwen3-architecture model built offline: CPU-sized, or shaped like Qwen3-0.6B."""
    shapes = {"cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64),
              "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128)}[size]
    config = Qwen3Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=0, **shapes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).to(dtype=dtype, device=device).eval()  # safe: Module.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, device: str, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn after `warmup` runs. The cases take turns round by round,
    so drift in the machine's load hits each of them alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _randomize_knobs(wrappers, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.copy_(torch.randn(layer.r, generator=g) * scale * layer.S.mean().item())


def _plain_autograd_forward(self, x):
    # The naive hook path: y = W x + U diag(s) Vh x through ordinary autograd.
    return self.base(x) + ((x @ self.Vh.T) * self.knobs().to(x.dtype)) @ self.U.T


# ----------------------------------------------------------------------------- cases


def generation_case(base, wrapped, wrappers, device, repeats, batch=8, prompt_len=32, new=64) -> dict:
    ids = torch.randint(2, base.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                  min_new_tokens=new, pad_token_id=0, eos_token_id=1)

    @torch.no_grad()
    def run(model, context=None):
        if context is None:
            return model.generate(ids, **kwargs)
        with context(wrappers):
            return model.generate(ids, **kwargs)

    t = timed({"base": lambda: run(base), "merged": lambda: run(wrapped, adapter.merged),
               "hook": lambda: run(wrapped)}, device, repeats)
    base_tps, merged_tps, hook_tps = (batch * new / t[k] for k in ("base", "merged", "hook"))
    return {"gen_base_tok_s": base_tps, "gen_merged_tok_s": merged_tps, "gen_hook_tok_s": hook_tps,
            "gen_merged_over_base": merged_tps / base_tps, "gen_hook_over_base": hook_tps / base_tps}


def scoring_case(base, wrapped, wrappers, device, repeats, batch=8, prompt_len=64, completion_len=192) -> dict:
    vocab = base.config.vocab_size
    prompts = torch.randint(2, vocab, (batch, prompt_len)).tolist()
    completions = torch.randint(2, vocab, (batch, completion_len)).tolist()
    ids, attn, comp = pad_batch(prompts, completions, 0, device)

    def knob_pass():
        wrapped.zero_grad(set_to_none=True)
        with adapter.scoring(wrappers), adapter.per_sample_grads(wrappers):
            token_logprobs(wrapped, ids, attn, comp).sum().backward()

    def base_pass():
        # The frozen base model, gradient with respect to its input only.
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
        rows, cols = comp[:, 1:].bool().nonzero(as_tuple=True)
        logits = base.get_output_embeddings()(hidden[:, :-1][rows, cols]).float()
        (logits.gather(-1, ids[:, 1:][rows, cols, None]) - torch.logsumexp(logits, -1, keepdim=True)).sum().backward()

    def naive_pass():
        wrapped.zero_grad(set_to_none=True)
        original = adapter.AdapterLayer.forward
        adapter.AdapterLayer.forward = _plain_autograd_forward
        try:
            token_logprobs(wrapped, ids, attn, comp).sum().backward()
        finally:
            adapter.AdapterLayer.forward = original

    t = timed({"knob": knob_pass, "base": base_pass, "naive": naive_pass}, device, repeats)
    knob, frozen, naive = t["knob"], t["base"], t["naive"]
    return {"score_knob_s": knob, "score_base_s": frozen, "score_naive_s": naive,
            "score_knob_over_base": knob / frozen, "score_knob_over_naive": knob / naive}


def extraction_case(wrapped, wrappers, tok, device, n_pairs=32, max_new=128) -> dict:
    pairs = default_pairs()[:n_pairs]
    messages = [p.messages for p in pairs for _ in range(2)]
    texts = [t for p in pairs for t in (p.hack, p.clean)]

    def run(batch_size):
        return hack_basis.completion_grads(wrapped, tok, wrappers, messages, texts, max_new, batch_size=batch_size)

    t = timed({"batched": lambda: run(16), "single": lambda: run(1)}, device, repeats=1, warmup=0)
    batched, single = t["batched"], t["single"]
    return {"extract_batched_s": batched, "extract_per_completion_s": single, "extract_speedup": single / batched}


def grading_case(repeats) -> dict:
    """Completions graded per second on the built-in problems (a clean and a hacked answer each):
    through the fork server and spawning a fresh interpreter per completion, taking turns."""
    problems = builtin_problems()
    texts = [t for p in problems for t in (clean_completion(p), hack_completion(p, p.mode))]
    graded = [p for p in problems for _ in range(2)]

    def grade(grader, workers=None):
        def run():
            sandbox.use_grader(grader)
            rewards.grade_batch(texts, graded, workers=workers)
        return run

    try:
        t = timed({"fork": grade("fork"), "fork_1": grade("fork", 1), "spawn": grade("spawn")}, "cpu", repeats)
    finally:
        sandbox.use_grader("fork")
    rate = {k: len(texts) / v for k, v in t.items()}
    return {"grade_parallel_per_s": rate["fork"], "grade_1_worker_per_s": rate["fork_1"],
            "grade_spawn_per_s": rate["spawn"], "grade_fork_over_spawn": rate["fork"] / rate["spawn"],
            "grade_parallel_over_1": rate["fork"] / rate["fork_1"], "grade_workers": os.cpu_count() or 1,
            "landlock_abi": sandbox.run("pass").landlock_abi}


def smoke_step_case() -> dict:
    split = step_split("smoke", 8)
    return {f"smoke_{k}": v for k, v in split.items()} | {"project_over_step": split["split_project"]}


def matmul_peak_case(device: str, dtype: torch.dtype, repeats: int) -> dict:
    """The machine's matmul throughput (GFLOP/s): at a large square shape, and at the organism's own
    shapes (a scoring micro-batch's MLP, a decoded token's), the most the step's arithmetic could get."""
    shapes = {"large": (2048, 2048, 2048), "organism_score": (2400, 64, 256), "organism_decode": (32, 64, 256)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        calls = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP a timing, so a small shape is not all call overhead

        def products(a=a, b=b, calls=calls):
            return [a @ b for _ in range(calls)]

        out[f"matmul_gflops_{name}"] = 2 * m * k * n * calls / timed({name: products}, device, repeats)[name] / 1e9
    return out


def step_flops(config, prompt: float, completion: float, prompts: int, group: int, knobs: tuple[int, int],
               reference: bool) -> dict[str, float]:
    """FLOPs of one GRPO step counted from the model's shapes (a multiply-add is 2), for `prompts` x
    `group` rows of mean `prompt` + `completion` tokens: generation (each distinct prompt prefilled
    once, every row decoded token by token) and scoring as `grpo.backward_rollouts` runs it (as when
    a group's rows are of one kind in one micro-batch): a forward with each group's prompt run once,
    backward through the completions twice (the loss, each row's log-likelihood) and through each
    prompt once for the loss and once for each of its rows, and the reference forward (when
    beta > 0). A prompt scored before its completions runs only the last layer's q, k and v
    projections. `knobs` is (Vh x, Uᵀ dy) multiply-adds a token, a layer, in the forward and in the
    backward passes with the knobs. Padding, norms and the sampler are left out: an estimate of the
    arithmetic the step cannot avoid, not of what it runs."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linear = d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size  # multiply-adds a token, a layer
    attend = 2 * q  # multiply-adds a token, a layer, per position attended (q k and p v)
    rows = prompts * group

    def prompt_pass(times: int, extra: int, attention: int) -> float:
        """Through the prompts `times` each; `extra` multiply-adds a token, a layer beside the
        weights; `attention` 1 forward, 2 backward."""
        return times * (prompt * ((layers - 1) * (linear + extra) + d * (q + 2 * kv))
                        + attention * (layers - 1) * attend * prompt * prompt / 2)

    def completion_pass(extra: int, attention: int) -> float:
        """Through every row's completion, over its prompt's keys and values."""
        return rows * (completion * (layers * (linear + extra) + d * vocab)
                       + attention * layers * attend * completion * (prompt + completion / 2))

    prefill = prompts * layers * (linear * prompt + attend * prompt * prompt / 2)
    decode = rows * completion * (layers * linear + d * vocab + layers * attend * (prompt + completion / 2))
    forward = prompt_pass(prompts, knobs[0], 1) + completion_pass(knobs[0], 1)
    backward = prompt_pass(prompts * (1 + group), knobs[1], 2) + 2 * completion_pass(knobs[1], 2)
    ref = prompt_pass(prompts, 0, 1) + completion_pass(0, 1) if reference else 0.0
    return {"generate": 2 * (prefill + decode), "score": 2 * (forward + backward + ref)}


def organism_step_case(repeats: int) -> dict:
    """The organism's step (4 prompts x 8 rollouts, 128 new tokens, the KL reference pass) with each
    grader, its split, and its distance from the machine's limit: the FLOPs the step cannot avoid
    against what the machine's matmuls do in its time."""
    out = {}
    for grader in ("spawn", "fork"):
        split = step_split("organism", 12, f"--grader={grader}", "--eval_prompts=6", "--eval_samples=1")
        out |= {f"organism_{grader}_{k}": v for k, v in split.items()}
    out["organism_grade_share"] = out["organism_fork_split_grade"]
    cfg = make_config("organism")
    model, tok = load_model_and_tokenizer(resolve_model(cfg.model))
    prompt = statistics.mean(len(encode_prompt(tok, p.messages())) for p in builtin_problems())
    targets = [w for n, w in model.named_modules()
               if isinstance(w, torch.nn.Linear) and n.rsplit(".", 1)[-1] in adapter.DEFAULT_TARGETS]
    rank = [min(w.in_features, w.out_features) for w in targets]
    knobs = (sum(r * w.in_features for r, w in zip(rank, targets)) // model.config.num_hidden_layers,
             sum(r * w.out_features for r, w in zip(rank, targets)) // model.config.num_hidden_layers)
    flops = step_flops(model.config, prompt, out["organism_fork_completion_tokens"], cfg.prompts_per_step,
                       cfg.group, knobs, cfg.beta > 0)
    out |= matmul_peak_case("cpu", torch.float32, repeats)
    peak = max(v for k, v in out.items() if k.startswith("matmul_gflops")) * 1e9
    seconds = out["organism_fork_step_s"]
    return out | {"organism_prompt_tokens": prompt, "organism_gflop_generate": flops["generate"] / 1e9,
                  "organism_gflop_score": flops["score"] / 1e9, "organism_utilisation":
                  (flops["generate"] + flops["score"]) / (seconds * peak),
                  **{f"organism_utilisation_{part}": flops[part] / (seconds * out[f"organism_fork_split_{part}"] * peak)
                     for part in ("generate", "score")}}


_MEMORY_PROBE = r"""
import os, sys, threading, torch
from projected_grpo.bench import bench_model
from projected_grpo.scoring import token_logprobs

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

batch, length, vocab = 8, 512, int(sys.argv[1])
model = bench_model(vocab, "cpu", torch.float32, "cpu")
for p in model.parameters():
    p.requires_grad_(False)
model.get_decoder().layers[-1].mlp.down_proj.weight.requires_grad_(True)  # so the hidden states need grad
ids = torch.randint(2, vocab, (batch, length + 1))
attn, comp = torch.ones_like(ids), torch.ones_like(ids)
comp[:, 0] = 0
before, peak, done = resident(), [0], threading.Event()

def sample():  # the high-water mark of resident memory while the pass runs
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        done.wait(0.0005)

watcher = threading.Thread(target=sample)
watcher.start()
token_logprobs(model, ids, attn, comp).sum().backward()
done.set()
watcher.join()
print(max(peak[0], resident()) - before)
"""


def memory_case() -> dict:
    """Peak resident memory of a log-prob forward+backward at 8 x 512 completion tokens,
    vocab 151936, in a fresh process, against one fp32 [8, 512, 151936] tensor."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(LARGE_VOCAB)], check=True, capture_output=True,
                         text=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    full = 8 * 512 * LARGE_VOCAB * 4
    return {"logprob_peak_bytes": peak, "logprob_full_fp32_bytes": full, "logprob_peak_over_full": peak / full}


def projection_micro(wrappers, basis, repeats) -> dict:
    for layer in wrappers.values():
        layer.delta_s.grad = torch.randn_like(layer.delta_s)
    seconds = timed({"project": lambda: projection.project_all(wrappers, basis, erase=True)}, "cpu", repeats)
    return {"project_all_ms": seconds["project"] * 1000}


TARGETS = {  # key: (comparison, bound, what it is)
    "gen_merged_over_base": (">=", 0.95, "generation tok/s, merged knobs / base model"),
    "gen_hook_over_base": ("report", None, "generation tok/s, naive hook path / base model"),
    "score_knob_over_base": ("<=", 2.2, "scoring fwd+bwd with per-sequence knob grads / frozen base, input grads"),
    "score_knob_over_naive": ("<=", 0.8, "same pass / naive hook path through plain autograd"),
    "extract_speedup": (">=", 5.0, "basis extraction, 32 pairs: per-completion backward / batched"),
    "project_over_step": ("<=", 0.01, "projection + cin/cout / whole smoke training step"),
    "grade_parallel_per_s": (">=", 150.0, "grading, completions/s, fork server, one worker per core"),
    "grade_parallel_over_1": (">=", 1.6, "grading, parallel / single worker"),
    "grade_fork_over_spawn": ("report", None, "grading, fork server / a fresh interpreter per completion"),
    "organism_grade_share": ("<=", 0.15, "grading / the organism's whole training step (fork server)"),
    "organism_utilisation": ("report", None, "organism step: FLOPs from its shapes / (step time x the matmul peak)"),
    "logprob_peak_over_full": ("<=", 0.25, "log-prob peak memory / one fp32 [8, 512, 151936] tensor"),
}


def verdict(key: str, value: float) -> str:
    op, bound, _ = TARGETS[key]
    if op == "report":
        return "reported"
    ok = value >= bound if op == ">=" else value <= bound
    return f"{'ok' if ok else 'MISS'} ({op} {bound})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-vocab", action="store_true", help=f"speed cases with vocab {LARGE_VOCAB}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("cpu", "0.6b"), default=None,
                        help="model shape (default: cpu on CPU, 0.6b on a GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--vs", metavar="COMMIT", help="instead of the cases: the organism step, taking turns "
                        "with COMMIT's code (alone, --arm, --seeds, --steps; the other flags do not apply)")
    parser.add_argument("--arm", default="--intervention=none",
                        help="--vs: the training flags both codes run with, in one string (default vanilla), e.g. "
                             "'--intervention=erase --pairs=live --refresh_every=5' (COMMIT must know them)")
    parser.add_argument("--seeds", default="1,2,3", help="--vs: the seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=30,
                        help="--vs: each run's steps (the preset's schedule fitted to them, the same for both codes)")
    args = parser.parse_args(argv)
    if args.vs:
        return vs_main(args)
    size = args.size or ("0.6b" if args.device.startswith("cuda") else "cpu")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    vocab = LARGE_VOCAB if args.large_vocab else 8192
    torch.manual_seed(0)

    base = bench_model(vocab, size, dtype, args.device)
    wrapped = copy.deepcopy(base)
    wrappers = adapter.wrap(wrapped)
    _randomize_knobs(wrappers)
    _, tok = load_model_and_tokenizer("tiny-random")  # real text for extraction; ids fit any vocab >= its own

    figures: dict[str, float] = {}
    steps = [("generation", lambda: generation_case(base, wrapped, wrappers, args.device, args.repeats)),
             ("scoring", lambda: scoring_case(base, wrapped, wrappers, args.device, args.repeats)),
             ("extraction", lambda: extraction_case(wrapped, wrappers, tok, args.device)),
             ("grading", lambda: grading_case(max(1, args.repeats // 2))),
             ("smoke step", smoke_step_case),
             ("organism step", lambda: organism_step_case(args.repeats)),
             ("memory", memory_case)]
    for name, case in steps:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        figures.update(case())
    basis = {n: torch.linalg.qr(torch.randn(w.r, 8))[0].T.contiguous() for n, w in wrappers.items()}
    figures.update(projection_micro(wrappers, basis, args.repeats))

    machine = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
               or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "dtype": str(dtype),
               "model": f"{size} (vocab {vocab})", "python": platform.python_version()}
    lines = [f"machine: {machine}", "", "| figure | value | target |", "|---|---|---|"]
    for key, (_, _, what) in TARGETS.items():
        lines.append(f"| {what} | {figures[key]:.3f} | {verdict(key, figures[key])} |")
    lines += ["", "| raw | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in figures.items() if k not in TARGETS]
    print("\n".join(lines))
    update_record(args.out, {"machine": machine, "figures": figures,
                             "verdicts": {k: verdict(k, figures[k]) for k in TARGETS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
