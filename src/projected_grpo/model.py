"""Load the policy model and its tokenizer.

Any Hugging Face id or local path goes through `from_pretrained`. The special name `"tiny-random"`
builds a 2-layer Qwen3 with a byte-level BPE tokenizer trained on the package's own problem text,
entirely offline, so tests and smoke runs never touch the hub.
"""

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
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


# ----------------------------------------------------------------------------- batches and log-probs


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


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device="cpu"):
    """Left-pad prompt+completion rows. Returns input_ids, attention_mask, completion_mask (all B x T)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        start = width - len(p) - len(c)
        input_ids[i, start:] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, start:] = 1
        completion_mask[i, width - len(c):] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token, so a left-padded row is placed as it
    would be alone (generation and scoring both use them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


LOGIT_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB): bounds the peak whatever the vocab


def token_logprobs(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """log p(token_t | tokens_<t) at completion positions (B x T, zero elsewhere).

    The LM head runs only on positions that predict a completion token, a few rows
    at a time, with logits upcast to fp32 there, and log p = logit - logsumexp: the
    full [B, T, vocab] fp32 log-softmax is never materialised.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=positions_of(attention_mask)).last_hidden_state
    rows, cols = completion_mask[:, 1:].bool().nonzero(as_tuple=True)  # hidden at t predicts token t+1
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    logprobs[rows, cols + 1] = _chosen_logprobs(model, hidden[:, :-1][rows, cols], input_ids[:, 1:][rows, cols])
    return logprobs


def _prefix_cache(model, prefix: list[int], device) -> list[torch.Tensor]:
    """The keys and values of `prefix` run alone (cache_tensors' layout)."""
    forward, ones = _forward(model), torch.ones((1, len(prefix)), dtype=torch.long, device=device)
    forward.hidden(torch.tensor([prefix], device=device), ones, positions_of(ones), keep=None)
    return forward.cache_tensors()


class PromptCache:
    """Prompts' keys and values under weights that never change (the reference's: the base model, both
    knobs zeroed), kept from step to step: a run draws its problems again and again, and their
    prompts need not be run again. At most `limit` bytes, the least recently used out first (a large
    model keeps few or none; a run on the CPU organism keeps every prompt, about 0.2 MB each)."""

    def __init__(self, limit: int = 256 << 20):
        self.limit, self.held, self.entries = limit, 0, {}

    def get(self, prefix: list[int], make) -> list[torch.Tensor]:
        if torch.is_grad_enabled():
            raise RuntimeError("PromptCache holds keys and values without a graph: use it under torch.no_grad()")
        key = tuple(prefix)
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)  # most recently used last
            return self.entries[key]
        cache = [t.clone() for t in make()]  # its own storage: a view would keep the whole q, k, v alive
        size = sum(t.numel() * t.element_size() for t in cache)
        if size > self.limit:
            return cache
        while self.entries and self.held + size > self.limit:
            oldest = next(iter(self.entries))
            self.held -= sum(t.numel() * t.element_size() for t in self.entries.pop(oldest))
        self.entries[key] = cache
        self.held += size
        return cache


class PromptFirst:
    """token_logprobs of the rows prompt + completion (`logprobs`, laid out as pad_batch lays them
    out), each distinct prompt run once. A prompt less its last token goes through the decoder alone;
    each row's last prompt token and completion run over a copy of its prompt's keys and values.

    A GRPO group's rows share a prompt that is most of each row, so the prompt's forward, the bulk
    of a pass over whole rows, runs once for the group. With gradients the copies are leaves
    (`row_cache`): a backward from `logprobs` stops there, and `prompt_grads` carries their
    gradients on through each prompt's forward, both summed over its rows (what a loss needs) and
    summed over the rows of each column asked for (a rollout's own gradient, a group's weighted
    sum), in one batched backward per prompt. With `features_at` a layer index, `features` holds each
    row's output of that layer averaged over its completion's tokens (what a probe reads)."""

    def __init__(self, model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                 prompt_cache: PromptCache | None = None, features_at: int | None = None):
        if not all(prompts):
            raise ValueError("a prompt of no tokens: a completion must follow at least one prompt token")
        device = next(model.parameters()).device
        self.of_row, first = _distinct([tuple(p) for p in prompts])
        prefixes = [prompts[i][:-1] for i in first]
        prefix_mask = pad_batch(prefixes, [[] for _ in first], pad_id, device)[1]
        # Each prompt's forward runs over its own tokens, unpadded; its keys and values (rows, kv_heads,
        # length, d) are zero-padded on the left to the longest prefix where rows take copies (the
        # mask hides the pads). A one-token prompt has no prefix and no forward. Under fixed weights
        # (`prompt_cache`: the reference's) a prompt seen at an earlier step is not run again.
        self.prompt_caches = []  # each distinct prompt's keys and values, in the graph of its forward ([]: none)
        for prefix in prefixes:
            if not prefix:
                self.prompt_caches.append([])
            elif prompt_cache is None:
                self.prompt_caches.append(_prefix_cache(model, prefix, device))
            else:
                self.prompt_caches.append(prompt_cache.get(prefix, lambda p=prefix: _prefix_cache(model, p, device)))
        width = prefix_mask.shape[1]
        like = next((c for c in self.prompt_caches if c), [])
        empty = [t[:, :, :0] for t in like]  # a one-token prompt's keys and values: none, padded to zeros
        padded = [[F.pad(t.detach(), (0, 0, width - t.shape[2], 0)) for t in (cache or empty)]
                  for cache in self.prompt_caches]
        self.row_cache = [torch.cat(copies).requires_grad_(torch.is_grad_enabled())
                          for copies in zip(*(padded[j] for j in self.of_row))]
        suffixes = [p[-1:] + c for p, c in zip(prompts, completions)]
        suffix_ids = torch.full((len(suffixes), max(map(len, suffixes))), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros_like(suffix_ids)
        for i, suffix in enumerate(suffixes):  # right-padded: every pad after the row's real tokens
            suffix_ids[i, :len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            suffix_mask[i, :len(suffix)] = 1
        suffix_ids, suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
        attention_mask = torch.cat([prefix_mask[self.of_row], suffix_mask], dim=1)
        positions = positions_of(attention_mask)[:, width:]
        forward = _forward(model)
        forward.capture = features_at
        if self.row_cache:
            forward.load_cache(self.row_cache)
        hidden = forward.hidden(suffix_ids, attention_mask, positions, keep=slice(None))
        if features_at is not None:  # each row's layer output at its completion's tokens, averaged (fp32)
            on_completion = suffix_mask[:, 1:, None].float()
            self.features = (forward.captured[:, 1:].float() * on_completion).sum(1) / on_completion.sum(1).clamp(min=1)
        row, col = suffix_mask[:, 1:].bool().nonzero(as_tuple=True)  # suffix token col predicts completion token col
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        lengths = torch.tensor([len(c) for c in completions], device=device)
        self.logprobs = torch.zeros((len(prompts), width), dtype=torch.float32, device=device)
        self.logprobs[row, width - lengths[row] + col] = _chosen_logprobs(model, hidden[:, :-1][row, col],
                                                                          suffix_ids[:, 1:][row, col])

    def prompt_grads(self, summed: list[torch.Tensor], weighted: list[torch.Tensor] | None,
                     column_of: list[int | None], params: list[torch.Tensor],
                     columns: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gradients of `params` through the prompts' forwards: their sum over every row (one
        tensor per param), and `columns` sums of rows (columns x the param's shape): column c adds
        the rows i with column_of[i] == c. `summed` and `weighted` are two cotangents of row_cache,
        one tensor per row_cache tensor, the first added over all rows and the second over each
        column's rows (None: no column). Each prompt's forward is differentiated once for its rows'
        sum and each column its rows reach: one batched backward."""
        total = [torch.zeros_like(p) for p in params]
        by_column = [p.new_zeros((columns, *p.shape)) for p in params]
        for j, cache in enumerate(self.prompt_caches):
            rows = [i for i, k in enumerate(self.of_row) if k == j]
            # a cache tensor no param reaches (adapters only past that layer's keys and values) has no graph
            reached = [n for n, t in enumerate(cache) if t.requires_grad]
            if not reached:
                continue
            mine = sorted({column_of[i] for i in rows} - {None})
            members = [[i for i in rows if column_of[i] == c] for c in mine]
            cotangents = [torch.stack([summed[n][rows].sum(0, keepdim=True)] +
                                      [weighted[n][m].sum(0, keepdim=True) for m in members])
                          [..., -cache[n].shape[2]:, :] for n in reached]  # the prompt's own columns, not the pads
            grads = torch.autograd.grad([cache[n] for n in reached], params,
                                        cotangents if mine else [c[0] for c in cotangents],
                                        is_grads_batched=bool(mine), allow_unused=True)
            for p, g in enumerate(grads):
                if g is None:  # a param the prompt never reached (the last layer past its keys and values)
                    continue
                total[p] += g[0] if mine else g
                if mine:
                    by_column[p][mine] += g[1:]
        return total, by_column


def _distinct(keys: list) -> tuple[list[int], list[int]]:
    """Each row's index among the distinct keys (in the order they first appear), and the first row
    holding each."""
    slot, of_row, first = {}, [], []
    for i, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(first)
            first.append(i)
        of_row.append(slot[key])
    return of_row, first


def _cache_kwarg(model, cache) -> dict:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns).
    name = "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"
    return {name: cache}


def _chosen_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[i] | hidden[i]) for rows of hidden states: the LM head a few rows at a time, its
    logits upcast to fp32 there, log p = logit - logsumexp, so no [rows, vocab] fp32 log-softmax
    of them all is ever held."""
    head = model.get_output_embeddings()
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])

    def chosen(h, i):
        logits = head(h).float()
        return logits.gather(-1, i[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, i = hidden[start:start + chunk], ids[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad and hidden.shape[0] > chunk:
            # Recompute the chunk's logits in backward instead of keeping every chunk's
            # [rows, vocab] fp32 logits alive until then.
            out.append(torch.utils.checkpoint.checkpoint(chosen, h, i, use_reentrant=False))
        else:
            out.append(chosen(h, i))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the model's own: chat models end a turn on one, base models on another."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


def row_seed(*parts) -> int:
    """A sampling seed for one completion, from what identifies it (run seed, step, problem id,
    index in its group): the same row gets the same seed whichever batch, rank or device draws it."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: splitmix64's increment


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    """A logical right shift of int64 (torch's is arithmetic: mask off the sign bits it drags in)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplies wrap): a counter-based generator,
    one draw per input, the same on every device."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ _shift_right(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ _shift_right(x, 31)


def seeded_uniform(seeds: torch.Tensor, step: int, columns: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64, a pure function of (seed, step, column): one row per seed, over
    columns 0..n-1 (an int) or over the given columns (a tensor of one row per seed), so the noise of
    a few tokens costs a few draws and equals theirs among all n."""
    if isinstance(columns, int):
        columns = torch.arange(columns, device=seeds.device)
    offset = (step * _GOLDEN + (1 << 63)) % (1 << 64) - (1 << 63)  # wrapped to int64 as torch would
    key = _splitmix64(seeds + offset)
    bits = _splitmix64(key[:, None] + columns * _GOLDEN)
    return (_shift_right(bits, 11).double() + 0.5) / 2.0 ** 53  # the top 53 bits


NUCLEUS_CANDIDATES = 16  # tokens ranked by topk per row; a row whose nucleus holds more is sorted whole
# (the organism's 0.95 nucleus is one token in nine rows of ten and past 16 in one of 200)


def draw(logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature: float, top_p: float) -> torch.Tensor:
    """Each row's token from softmax(logits / temperature), cut to the top-p nucleus, by the
    Gumbel-max trick with noise from `seeded_uniform`: a row's draw depends only on its seed,
    the step and its own logits, never on the batch it shares, so a completion is the same
    whether one process samples the whole step or a rank samples its share.

    Each row's nucleus is found among its NUCLEUS_CANDIDATES most likely tokens when it ends there
    (the rows whose nucleus reaches past them are sorted whole), and only the nucleus draws noise:
    the token is the one a full sort and noise on every column would pick, at a fraction of the work."""
    logits = logits.float() / temperature
    if top_p >= 1.0:
        return _gumbel_max(logits, None, seeds, step)
    top, columns = logits.topk(min(NUCLEUS_CANDIDATES, logits.shape[-1]), dim=-1)
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
    before = probs.cumsum(-1) - probs  # the mass ranked above each token
    token = _gumbel_max(top.masked_fill(before >= top_p, -torch.inf), columns, seeds, step)
    past = (before[:, -1] < top_p).nonzero().flatten()  # rows whose nucleus may reach past the candidates
    if len(past):
        top, columns = logits[past].sort(dim=-1, descending=True)
        probs = top.softmax(-1)
        before = probs.cumsum(-1) - probs
        token[past] = _gumbel_max(top.masked_fill(before >= top_p, -torch.inf), columns, seeds[past], step)
    return token


def _gumbel_max(logits: torch.Tensor, columns: torch.Tensor | None, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """argmax of logits + Gumbel noise, the noise of each token id drawn at its column (`columns`:
    the token id of each logit, None: the logits are the whole vocabulary in order)."""
    u = seeded_uniform(seeds, step, logits.shape[-1] if columns is None else columns)
    choice = (logits - torch.log(-torch.log(u)).float()).argmax(-1)
    return choice if columns is None else columns.gather(-1, choice[:, None]).squeeze(-1)


class _Decoding:
    """Any causal LM's decoder over a DynamicCache, called as `_Qwen3Forward` is: `hidden` takes the
    new tokens, extends the cache and returns the final hidden states at `keep`; `select(rows)`
    keeps those rows; `cache_tensors` and `load_cache` read and set the cache as tensors (every
    layer's keys, then every layer's values). The decoder is called as token_logprobs calls it, so
    sampling and scoring compute the same logits."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.capture, self.captured = None, None  # a layer whose output `hidden` keeps (as _Qwen3Forward)

    def hidden(self, input_ids, attention_mask, positions, keep: slice | None) -> torch.Tensor | None:
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                       use_cache=True, output_hidden_states=self.capture is not None,
                                       **_cache_kwarg(self.model, self.cache))
        if self.capture is not None:
            self.captured = out.hidden_states[self.capture + 1]
        return None if keep is None else out.last_hidden_state[:, keep]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def cache_tensors(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.cache.layers] + [layer.values for layer in self.cache.layers]

    def load_cache(self, tensors: list[torch.Tensor]) -> None:
        half = len(tensors) // 2
        self.cache = DynamicCache(zip(tensors[:half], tensors[half:]), config=self.model.config)


def _forward(model, capacity: int | None = None):
    """The lean Qwen3 forward where it fits the model, transformers' own otherwise (`capacity`: sampling)."""
    return _Qwen3Forward(model, capacity) if _Qwen3Forward.fits(model) else _Decoding(model)


def _next_logits(forward, input_ids, attention_mask, positions) -> torch.Tensor:
    """The fp32 logits after each row's last new token, the cache extended by the new tokens."""
    last = forward.hidden(input_ids, attention_mask, positions, slice(-1, None))[:, -1]
    return forward.model.get_output_embeddings()(last).float()


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """Qwen3RMSNorm's formula (fp32 inside, the weight after the cast back) as one fused op."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


def _weight(linear) -> torch.Tensor:
    """What a projection multiplies by: an adapter layer's merged W' (sampling runs under
    adapter.merged), a plain Linear's weight."""
    return linear.weight if isinstance(linear, torch.nn.Linear) else linear.merged_weight_held()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _fused(weight: torch.Tensor):
    return lambda x: F.linear(x, weight)


def _modules(*linears):
    return lambda x: torch.cat([linear(x) for linear in linears], dim=-1)


# Devices on which a decoded token's attention (with a mask) folds each kv head's query heads into
# query rows of that head, so SDPA is asked no GQA: on CUDA a mask with GQA leaves only the math
# kernel, which copies the keys and values per query head (not measured: no GPU). On CPU GQA is the
# faster of the two (docs/performance.md).
_FOLD_ONE_QUERY_ON = ("cuda",)


class _Qwen3Forward:
    """Qwen3's decoder as sampling and scoring run it: the formulas of transformers' Qwen3 forward
    over a KV cache held here, without the work that forward does on every call (mask and cache
    objects, output capture, argument checks; at the organism's size most of a decoded token), and
    with the last layer's attention and MLP run only where an output is wanted: at a prompt's last
    token when sampling, nowhere for a prompt scored before its completions (they read only its
    keys and values; its q projection still runs, in one call with them).

    Sampling (a `capacity`, the most tokens a row will hold; no gradient): q, k, v in one matmul and
    gate, up in another, from the merged weights (the fused weights are copies: on a 4B model in
    bf16 about 5 GB while sampling), and a KV cache allocated once and written in place, so nothing
    is copied as the sequence grows. Scoring (no capacity): the
    projections called as modules, so the adapter's knob gradients and captures work, and each
    call's keys and values appended to the cache (autograd cannot differentiate a buffer written
    in place after it was read)."""

    def __init__(self, model, capacity: int | None = None):
        self.model, self.decoder, self.config, self.capacity = model, model.get_decoder(), model.config, capacity
        layers = [(layer.self_attn, layer.mlp) for layer in self.decoder.layers]
        if capacity is None:
            self.qkv = [_modules(a.q_proj, a.k_proj, a.v_proj) for a, _ in layers]
            self.gate_up = [_modules(m.gate_proj, m.up_proj) for _, m in layers]
            self.out = [(a.o_proj, m.down_proj) for a, m in layers]
        else:
            self.qkv = [_fused(torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])) for a, _ in layers]
            self.gate_up = [_fused(torch.cat([_weight(m.gate_proj), _weight(m.up_proj)])) for _, m in layers]
            self.out = [(_fused(_weight(a.o_proj)), _fused(_weight(m.down_proj))) for a, m in layers]
        heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.qk_norm = [torch.cat([a.q_norm.weight.expand(heads, -1), a.k_norm.weight.expand(kv_heads, -1)])
                        for a, _ in layers]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self.capture, self.captured = None, None  # a layer whose output (the residual stream after it) is kept

    @staticmethod
    def fits(model) -> bool:
        config = model.config
        return (config.model_type == "qwen3" and not config.attention_bias
                and all(t == "full_attention" for t in config.layer_types))

    def hidden(self, input_ids, attention_mask, positions, keep: slice | None) -> torch.Tensor | None:
        """The final (normed) hidden states of the new tokens at `keep` (None: the call only extends
        the cache); attention_mask covers the cache and the new tokens."""
        config, (rows, new) = self.config, input_ids.shape
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        x = self.decoder.embed_tokens(input_ids)
        cos, sin = (t[:, None] for t in self.decoder.rotary_emb(x, positions))
        start, end = self.length, self.length + new
        mask = attention_mask[:, None, None, :end].bool()
        causal = start == 0 and bool(mask.all())
        if new > 1 or start == 0:  # causal among the new tokens; a left pad attends to itself (none gives NaN)
            tril = torch.ones(new, end, dtype=torch.bool, device=x.device).tril(start)
            mask = (mask & tril) | torch.eye(new, end, dtype=torch.bool, device=x.device).roll(start, 1)
        # The mask as an additive bias, made once for every layer (SDPA converts a bool mask on each call,
        # and one decoded token's attention is mostly such overhead); SDPA's causal kernel instead when
        # the mask is that and no more (new tokens from the first column, no padding).
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, -torch.inf)
        last = len(self.decoder.layers) - 1
        for i, layer in enumerate(self.decoder.layers):
            qkv = self.qkv[i](_rms(x, layer.input_layernorm)).view(rows, new, -1, head_dim)
            # q_norm and k_norm (one eps, per head) in one call, then one rotation for both
            qk = F.rms_norm(qkv[:, :, :-kv_heads].float(), (head_dim,), eps=config.rms_norm_eps).to(x.dtype)
            qk = _rotate((qk * self.qk_norm[i]).transpose(1, 2), cos, sin)
            keys, values = self._extend(i, qk[:, heads:], qkv[:, :, -kv_heads:].transpose(1, 2), start, end)
            if i == last and keep != slice(None):  # past the last keys and values, only the kept outputs matter
                if keep is None:
                    break
                x, qk, bias, causal = x[:, keep], qk[:, :, keep], bias[:, :, keep], False
            q = qk[:, :heads]
            if q.shape[2] == 1 and not causal and x.device.type in _FOLD_ONE_QUERY_ON:
                q = q.reshape(rows, kv_heads, -1, head_dim)  # each kv head's query heads as its query rows
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if causal else bias, is_causal=causal,
                                               scale=layer.self_attn.scaling, enable_gqa=q.shape[1] != kv_heads)
            x = x + self.out[i][0](o.reshape(rows, heads, -1, head_dim).transpose(1, 2).reshape(rows, x.shape[1], -1))
            gate, up = self.gate_up[i](_rms(x, layer.post_attention_layernorm)).chunk(2, dim=-1)
            x = x + self.out[i][1](layer.mlp.act_fn(gate) * up)
            if i == self.capture:
                self.captured = x
        self.length = end
        return None if keep is None else _rms(x, self.decoder.norm)

    def _extend(self, i: int, keys: torch.Tensor, values: torch.Tensor, start: int, end: int):
        """Layer i's cache with the new keys and values (rows, kv_heads, new, d) at columns start..end."""
        if self.capacity is None:  # scoring: appended, a new tensor each call
            if start == 0:
                self.keys.append(keys)
                self.values.append(values)
            else:
                self.keys[i] = torch.cat([self.keys[i], keys], dim=2)
                self.values[i] = torch.cat([self.values[i], values], dim=2)
            return self.keys[i], self.values[i]
        if start == 0:
            self.keys.append(keys.new_zeros((*keys.shape[:2], self.capacity, keys.shape[-1])))
            self.values.append(values.new_zeros((*values.shape[:2], self.capacity, values.shape[-1])))
        self.keys[i][:, :, start:end] = keys
        self.values[i][:, :, start:end] = values
        return self.keys[i][:, :, :end], self.values[i][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def cache_tensors(self) -> list[torch.Tensor]:
        """Every layer's keys, then every layer's values (rows, kv_heads, length, d): scoring's cache."""
        return self.keys + self.values

    def load_cache(self, tensors: list[torch.Tensor]) -> None:
        """Score over these keys and values (as cache_tensors lays them out) from here on."""
        half = len(tensors) // 2
        self.keys, self.values, self.length = list(tensors[:half]), list(tensors[half:]), tensors[0].shape[2]


@torch.inference_mode()
def generate_completions(model, tokenizer, prompts: list[list[int]], max_new: int, seeds: list[int],
                         temperature: float = 1.0, top_p: float = 1.0,
                         on_finished=None) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one completion per prompt, row i seeded by seeds[i] (`row_seed`), with a KV cache.

    Returns the token ids (up to and including the first stop token, or max_new of them) and,
    per token, its log-prob under the weights that sampled it: log-softmax of the fp32 logits at
    temperature 1 with no nucleus cut, as the scoring pass computes it, so that pass can measure
    how far the policy it scores is from the one that sampled (with temperature != 1 or top_p < 1
    this compares the two passes' weights, not the tempered distribution tokens came from). The
    draw is `draw`'s: no global RNG is read or advanced.

    Each distinct prompt is prefilled once and its cache copied to the rows that share it (a
    GRPO group's rows all do: the prompt is most of each row). A row that stops leaves the batch,
    so the step's cost follows the rows still open, not the longest; `on_finished(i, ids)`, if
    given, gets it then (grading starts while the rest are sampled), and the rows cut at max_new
    at the end: once per row, with its final ids.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    input_ids, attention_mask, _ = pad_batch(prompts, [[] for _ in prompts], tokenizer.pad_token_id, device)
    stop = stop_ids(model, tokenizer)
    stop_tensor = torch.tensor(stop, dtype=torch.long, device=device)
    shared, first = _distinct([tuple(p) for p in prompts])  # each row's prompt among those prefilled
    first = torch.tensor(first, device=device)
    decoding = _forward(model, capacity=input_ids.shape[1] + max_new)
    logits = _next_logits(decoding, input_ids[first], attention_mask[first], positions_of(attention_mask[first]))
    if len(first) < len(prompts):
        rows = torch.tensor(shared, device=device)
        decoding.select(rows)
        logits = logits[rows]
    open_rows = torch.arange(len(prompts), device=device)
    row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
    next_position = attention_mask.sum(-1)
    ids, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(max_new):
        token = draw(logits, row_seeds[open_rows], step, temperature, top_p)
        chosen = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        stopped = torch.isin(token, stop_tensor)
        for row, t, logp, end in zip(open_rows.tolist(), token.tolist(), chosen.tolist(), stopped.tolist()):
            ids[row].append(t)
            logprobs[row].append(logp)
            if end and on_finished:
                on_finished(row, ids[row])
        if step == max_new - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().flatten()
            open_rows, token, next_position, attention_mask = (x[keep] for x in (open_rows, token, next_position,
                                                                                  attention_mask))
            decoding.select(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(open_rows), 1)], dim=1)
        logits = _next_logits(decoding, token[:, None], attention_mask, next_position[:, None])
        next_position = next_position + 1
    if on_finished:
        for row in range(len(prompts)):
            if not ids[row] or ids[row][-1] not in stop:
                on_finished(row, ids[row])
    return ids, logprobs
