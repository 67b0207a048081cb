"""The forward that decoding and scoring run: a lean Qwen3 forward over the model's own weights (a KV
cache of a fixed capacity, fused projections, no per-call dispatch) where the model fits it, else
transformers' forward with a cache. Checked against transformers' own forward in tests/test_model.py.

Module order: above model; scoring and sampling import it.
"""

import inspect

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import DynamicCache


def cache_kwarg(model, cache) -> dict:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns).
    name = "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"
    return {name: cache}


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
                                       **cache_kwarg(self.model, self.cache))
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


def forward_for(model, capacity: int | None = None):
    """The lean Qwen3 forward where it fits the model, transformers' own otherwise (`capacity`: sampling)."""
    return _Qwen3Forward(model, capacity) if _Qwen3Forward.fits(model) else _Decoding(model)


def next_logits(forward, input_ids, attention_mask, positions) -> torch.Tensor:
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
