"""Sampling: seeded draws (each row's stream from its own seed, whatever the batch), a lean Qwen3 forward
for decoding, and `generate_completions`, the KV-cache decode loop that prefills a shared prompt once and
drops a row as it stops. The lean forward is checked against transformers' own in tests/test_model.py.

Module order: above model; grpo imports it.
"""

import hashlib

import torch
import torch.utils.checkpoint

from .forward import forward_for, next_logits
from .scoring import distinct, pad_batch, positions_of


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
    shared, first = distinct([tuple(p) for p in prompts])  # each row's prompt among those prefilled
    first = torch.tensor(first, device=device)
    decoding = forward_for(model, capacity=input_ids.shape[1] + max_new)
    logits = next_logits(decoding, input_ids[first], attention_mask[first], positions_of(attention_mask[first]))
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
        logits = next_logits(decoding, token[:, None], attention_mask, next_position[:, None])
        next_position = next_position + 1
    if on_finished:
        for row in range(len(prompts)):
            if not ids[row] or ids[row][-1] not in stop:
                on_finished(row, ids[row])
    return ids, logprobs
