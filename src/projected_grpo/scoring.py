"""Scoring completions: batches, per-token log-probs, and `PromptFirst`, which runs each distinct prompt
once and its completions after it, keeping the prompt's states for the backward (`PromptCache` keeps a
frozen model's across steps). Checked against transformers' own forward in tests/test_model.py.

Module order: above model (it scores what model loads); grpo, hack_basis and monitor import it.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .forward import forward_for


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
    forward, ones = forward_for(model), torch.ones((1, len(prefix)), dtype=torch.long, device=device)
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
        self.of_row, first = distinct([tuple(p) for p in prompts])
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
        forward = forward_for(model)
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


def distinct(keys: list) -> tuple[list[int], list[int]]:
    """Each row's index among the distinct keys (in the order they first appear), and the first row
    holding each."""
    slot, of_row, first = {}, [], []
    for i, key in enumerate(keys):
        if key not in slot:
            slot[key] = len(first)
            first.append(i)
        of_row.append(slot[key])
    return of_row, first


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
