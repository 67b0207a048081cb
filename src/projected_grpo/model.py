"""Load the policy model and its tokenizer.

Any Hugging Face id or local path goes through `from_pretrained`. The special name `"tiny-random"`
builds a 2-layer Qwen3 with a byte-level BPE tokenizer trained on the package's own problem text,
entirely offline, so tests and smoke runs never touch the hub.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.utils.checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .config import InputError
from .files import write_directory_atomically

TINY_RANDOM = "tiny-random"


class ModelLoadError(InputError):
    """A model name that is neither a loadable directory nor a hub id."""

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 1536
# Bump when the trained tokenizer's recipe changes, so stale caches are not reused.
_TOKENIZER_FORMAT = 1


# Config fields by which some architectures rescale the head's logits inside their own forward
# (Gemma's soft-capping, Cohere's and Granite's scales), with their neutral values. Sampling and
# scoring call the decoder and the head directly, so such a model would be trained on logits
# that are not its own: refused at load rather than silently wrong.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def load_model_and_tokenizer(
    name: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu", seed: int = 0
):
    """Return `(model, tokenizer)` in eval mode on `device`; the tokenizer pads on the left."""
    if name == TINY_RANDOM:
        tokenizer = tiny_tokenizer()
        model = tiny_qwen3(tokenizer, seed).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:  # no such directory, no such hub id, no network for one
            raise ModelLoadError(f"--model: cannot load {name!r} ({str(e).splitlines()[0]}); give a directory "
                                 f"saved with save_pretrained, a hub id, or {TINY_RANDOM}") from None
        tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        for field, neutral in _LOGIT_TRANSFORMS.items():
            if getattr(model.config, field, neutral) not in (None, neutral):
                raise ModelLoadError(f"--model: {name!r} rescales its logits ({field}="
                                     f"{getattr(model.config, field)}), which the package's sampler and scorer "
                                     f"do not apply; use a model without it")
    return model.to(device).eval(), tokenizer  # safe: Module.eval() (inference mode), not Python eval


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The offline byte-level BPE tokenizer of tiny-random (and the organism), trained on the package's text."""
    return build_tokenizer(_problem_corpus(), TINY_VOCAB_SIZE)


def tiny_qwen3(tokenizer: PreTrainedTokenizerFast, seed: int, hidden: int = 16, layers: int = 2,
               intermediate: int = 32, heads: int = 4, kv_heads: int = 2, head_dim: int = 8) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 of the given shape (default: tiny-random's), deterministic from the seed."""
    pad_id = tokenizer.pad_token_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        bos_token_id=pad_id,  # Qwen's own convention; the tokenizer never prepends it
    )
    # Weights come from the global RNG during construction; fork it so seeding here leaves the
    # caller's random stream untouched. Built on CPU so a seed means the same weights on any device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with Qwen chat tokens; cached on disk by content hash."""
    key = hashlib.sha256(
        json.dumps([_TOKENIZER_FORMAT, vocab_size, SPECIAL_TOKENS, corpus]).encode()
    ).hexdigest()[:16]
    path = Path(os.environ.get("PROJECTED_GRPO_CACHE", "out/cache")) / "tokenizer" / key
    if not (path / "tokenizer.json").exists():
        write_directory_atomically(path, lambda tmp: _train_tokenizer(corpus, vocab_size).save(
            str(tmp / "tokenizer.json")))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(path / "tokenizer.json")),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=["<|im_start|>"],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Seeding with all 256 byte symbols makes any string encodable, not just the corpus's bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _problem_corpus() -> list[str]:
    # Imported here so loading a hub model does not depend on the problem set.
    from projected_grpo.problems import builtin_problems
    from projected_grpo.templates import default_pairs, wrong_completion

    problems = builtin_problems()
    corpus = [message["content"] for problem in problems for message in problem.messages()]
    corpus += [text for pair in default_pairs() for text in (pair.hack, pair.clean)]
    corpus += [wrong_completion(problem) for problem in problems]
    return corpus


# ----------------------------------------------------------------------------- prompts and completions as ids


def encode_prompt(tokenizer, messages) -> list[int]:
    """Token ids of the chat prompt, ending where the assistant's completion begins."""
    # Qwen3 templates open a <think> block unless told not to; the budget is for code, and the
    # pair and teacher completions have no think block either. Other templates ignore the flag.
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer, text: str, max_new: int | None) -> list[int]:
    """Completion ids ending in EOS, cut to max_new tokens as generation would cut them (None: whole)."""
    return (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_new]
