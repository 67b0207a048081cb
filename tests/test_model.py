import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from projected_grpo import forward as forward_mod
from projected_grpo import model as model_mod
from projected_grpo import sampling as sampling_mod
from projected_grpo import scoring as scoring_mod
from projected_grpo.model import TINY_RANDOM, build_tokenizer, encode_prompt, load_model_and_tokenizer
from projected_grpo.scoring import pad_batch, token_logprobs

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Write a function that reverses a list. Tests must pass.",
    "```python\nimport sys\nsys.exit(0)\n```",
    "for i in range(10):\n    print(i * i)\n",
]
CHAT = [
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}],
    [{"role": "user", "content": "Reverse a string, please, and explain nothing."}],
]


@pytest.fixture(autouse=True)
def offline_cache(tmp_path_factory, monkeypatch):
    # One shared cache dir so every tiny-random build after the first is a cache hit, and so
    # tests never write under the repo's out/.
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny():
    return load_model_and_tokenizer(TINY_RANDOM)


def test_tiny_random_is_a_small_qwen3_built_without_the_hub(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("tiny-random must not call from_pretrained")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    model, tokenizer = load_model_and_tokenizer(TINY_RANDOM)
    c = model.config
    assert isinstance(model, Qwen3ForCausalLM) and not model.training
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (16, 2, 4)
    assert (c.num_key_value_heads, c.head_dim, c.max_position_embeddings) == (2, 8, 4096)
    assert c.vocab_size == len(tokenizer)
    assert not c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_logits_different_seed_different_logits():
    ids = torch.arange(1, 20).unsqueeze(0)
    logits = [load_model_and_tokenizer(TINY_RANDOM, seed=s)[0](ids).logits for s in (0, 0, 1)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])


def test_seeding_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model_and_tokenizer(TINY_RANDOM, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_accepts_strings():
    model, _ = load_model_and_tokenizer(TINY_RANDOM, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_special_tokens_agree_between_tokenizer_and_model(tiny):
    model, tokenizer = tiny
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>"]) == tokenizer("<|im_start|>").input_ids


@pytest.mark.parametrize(
    "text",
    ["def f(xs):\n    return [x ** 2 for x in xs if x % 2 == 0]  # even squares\n", "héllo — 你好 🙂\n\tx"],
)
def test_round_trip(text):
    tokenizer = build_tokenizer(CORPUS, 512)
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_bpe_actually_merges():
    tokenizer = build_tokenizer(CORPUS, 512)
    assert len(tokenizer) > 256 + 3
    assert len(tokenizer(CORPUS[0]).input_ids) < len(CORPUS[0].encode())


def test_chat_template_is_chatml():
    tokenizer = build_tokenizer(CORPUS, 512)
    text = tokenizer.apply_chat_template(CHAT[0], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou write Python.<|im_end|>\n"
        "<|im_start|>user\nAdd two numbers.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_batch_is_left_padded():
    tokenizer = build_tokenizer(CORPUS, 512)
    batch = tokenizer(["x", "def add(a, b): return a + b"], padding=True, return_tensors="pt")
    short_ids, short_mask = batch.input_ids[0], batch.attention_mask[0]
    n_pad = int((short_mask == 0).sum())
    assert n_pad > 0 and short_mask[-1] == 1
    assert (short_ids[:n_pad] == tokenizer.pad_token_id).all()
    assert batch.attention_mask[1].all()


def test_tokenizer_cache_hit_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    first = build_tokenizer(CORPUS, 512)
    cached = list((tmp_path / "tokenizer").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()

    def no_training(*args):
        raise AssertionError("expected a cache hit")

    with monkeypatch.context() as m:
        m.setattr(model_mod, "_train_tokenizer", no_training)
        second = build_tokenizer(CORPUS, 512)
    assert second(CORPUS).input_ids == first(CORPUS).input_ids

    build_tokenizer(CORPUS + ["one more line of text"], 512)
    build_tokenizer(CORPUS, 600)
    assert len(list((tmp_path / "tokenizer").iterdir())) == 3  # no temp dirs left behind either


def test_generate_samples_new_tokens_from_left_padded_chat_prompts(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CHAT]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_len = batch.input_ids.shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 8
    assert torch.equal(out[:, :prompt_len], batch.input_ids)
    assert (out[:, prompt_len:] != tokenizer.pad_token_id).any()


def test_local_path_loads_through_from_pretrained(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    ids = tokenizer(CHAT[0][1]["content"], return_tensors="pt").input_ids
    # Checkpoints in the wild pad on the right or have no pad token; the loader fixes both.
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path))
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token == "<|im_end|>"
    assert loaded_tok(CHAT[0][1]["content"], return_tensors="pt").input_ids.equal(ids)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_token_logprobs_match_a_full_log_softmax(tmp_path, monkeypatch):

    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(scoring_mod, "LOGIT_CHUNK_ELEMENTS", 3 * 1536)  # force several chunks
    model, tok = model_mod.load_model_and_tokenizer("tiny-random")
    prompts = [model_mod.encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("hi", "a longer prompt")]
    completions = [model_mod.encode_completion(tok, c, 8) for c in ("abc def", "x")]
    ids, attn, comp = scoring_mod.pad_batch(prompts, completions, tok.pad_token_id)
    logp = scoring_mod.token_logprobs(model, ids, attn, comp)
    full = model(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
    expected = torch.zeros_like(logp)
    expected[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * comp[:, 1:]
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert int((logp != 0).sum()) == int(comp.sum())  # completion positions only, EOS included


def _prompt_first_gradients(scored: scoring_mod.PromptFirst, weights: torch.Tensor, knobs, column_of=None):
    """The knob gradients of sum(logprobs * weights), summed and per column (default: per row), as grpo
    takes them: through the completions, then through the prompts."""
    loss = (scored.logprobs * weights).sum()
    summed = torch.autograd.grad(loss, knobs + scored.row_cache, retain_graph=True)
    rows = [torch.autograd.grad((scored.logprobs[i] * weights[i]).sum(), knobs + scored.row_cache, retain_graph=True)
            for i in range(len(weights))]
    per_row = [torch.stack([g[n] for g in rows]) for n in range(len(knobs))]
    # A row's cotangent of the cache is in its own row.
    cache_per_row = [torch.stack([g[n][i] for i, g in enumerate(rows)]) for n in range(len(knobs), len(summed))]
    column_of = list(range(len(weights))) if column_of is None else column_of
    count = 1 + max((c for c in column_of if c is not None), default=-1)
    through_prompts = scored.prompt_grads(summed[len(knobs):], cache_per_row, column_of, knobs, count)
    in_columns = torch.zeros((count, len(weights)))
    for i, c in enumerate(column_of):
        if c is not None:
            in_columns[c, i] = 1.0
    return ([a + b for a, b in zip(summed, through_prompts[0])],
            [torch.einsum("cr,r...->c...", in_columns, a) + b for a, b in zip(per_row, through_prompts[1])])


@pytest.mark.parametrize("forward, targets", [("qwen3", "default"), ("transformers", "default"),
                                              ("qwen3", ("up_proj", "down_proj")),
                                              ("transformers", ("up_proj", "down_proj"))])
def test_a_prompt_run_once_scores_and_differentiates_as_whole_rows(tiny, forward, targets, monkeypatch):
    from projected_grpo import adapter

    model, tok = tiny
    if forward == "transformers":
        _hf_decoding(monkeypatch)
    # MLP-only knobs: the first layer's keys and values depend on no knob
    wrappers = adapter.wrap(model) if targets == "default" else adapter.wrap(model, targets)
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.normal_(0, 0.1)
    knobs = [layer.delta_s for layer in wrappers.values()]
    # Three rows share one prompt, one prompt is a single token (nothing before its last), one is alone;
    # then a one-token prompt beside a two-token one (a prefix of one column, one prompt all padding),
    # and one-token prompts only (no prefix at all).
    for prompts, completions in [([[5, 6, 7, 8], [5, 6, 7, 8], [9], [10, 11], [5, 6, 7, 8]],
                                  [[1, 2, 3], [4], [7, 8], [9, 9, 9, 9, 9], [3, 3]]),
                                 ([[9], [10, 11]], [[1, 2], [3]]),
                                 ([[9], [9], [4]], [[1, 2], [3], [5, 6, 7]])]:
        whole = token_logprobs(model, *pad_batch(prompts, completions, tok.pad_token_id))
        scored = scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id)
        torch.testing.assert_close(scored.logprobs, whole, atol=2e-6, rtol=0)  # same layout, zero off the completions
        weights = torch.randn(whole.shape)  # any loss over the tokens: the same gradients
        summed, per_row = _prompt_first_gradients(scored, weights, knobs)
        for got, expected in zip(summed, torch.autograd.grad((whole * weights).sum(), knobs)):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):  # each row's own: the row alone
            alone = token_logprobs(model, *pad_batch([prompt], [completion], tok.pad_token_id))
            expected = torch.autograd.grad((alone * weights[i, -alone.shape[1]:]).sum(), knobs)
            for got, e in zip(per_row, expected):
                torch.testing.assert_close(got[i], e, atol=1e-6, rtol=1e-4)
        # Columns that add rows (within a prompt and across prompts) and leave one out: their rows' sums.
        column_of = [None] + [i % 2 for i in range(1, len(prompts))]
        scored = scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id)
        summed_too, columns = _prompt_first_gradients(scored, weights, knobs, column_of)
        for got, expected in zip(summed_too, summed):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
        for got, rows in zip(columns, per_row):
            for c in range(got.shape[0]):
                members = [i for i, k in enumerate(column_of) if k == c]
                torch.testing.assert_close(got[c], rows[members].sum(0), atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="a prompt of no tokens"):
        scoring_mod.PromptFirst(model, [[]], [[1]], tok.pad_token_id)


def test_the_reference_prompt_cache_scores_as_a_fresh_forward_and_keeps_at_most_its_limit(tiny, monkeypatch):
    model, tok = tiny
    prompts, completions = [[5, 6, 7, 8], [5, 6, 7, 8], [10, 11]], [[1, 2, 3], [4], [9, 9]]
    cache = scoring_mod.PromptCache()
    runs = []
    real = scoring_mod._prefix_cache
    monkeypatch.setattr(scoring_mod, "_prefix_cache", lambda *a: runs.append(a[1]) or real(*a))
    with torch.no_grad():
        fresh = scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id).logprobs
        for _ in range(2):
            cached = scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id, cache).logprobs
            assert torch.equal(cached, fresh)
    assert runs == [[5, 6, 7], [10], [5, 6, 7], [10]]  # the fresh forward's two, then each prompt once
    small = scoring_mod.PromptCache(limit=cache.held - 1)
    with torch.no_grad():
        scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id, small)
    assert list(small.entries) == [(10,)] and small.held <= small.limit  # the older one left to make room
    # each entry its own storage (a view would keep the forward's whole q, k, v alive past the count)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for c in cache.entries.values() for t in c)
    tiny_cache = scoring_mod.PromptCache(limit=1)  # an entry over the limit is used, not kept, and evicts nothing
    with torch.no_grad():
        assert torch.equal(scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id, tiny_cache).logprobs,
                           fresh)
    assert tiny_cache.entries == {} and tiny_cache.held == 0
    with pytest.raises(RuntimeError, match=r"under torch\.no_grad"):
        scoring_mod.PromptFirst(model, prompts, completions, tok.pad_token_id, cache)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_recorded_sampling_logprobs_are_the_scored_ones_whatever_the_checkpoint_config(tiny, temperature, top_p):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, m) for m in CHAT]
    plain = sampling_mod.generate_completions(model, tokenizer, prompts, 12, [1, 2], temperature, top_p)
    # A checkpoint's own generation config must not reach the sampler (nor the recorded log-probs).
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 5
    ids, logprobs = sampling_mod.generate_completions(model, tokenizer, prompts, 12, [1, 2], temperature, top_p)
    assert (ids, logprobs) == plain
    input_ids, attention, completion = pad_batch(prompts, ids, tokenizer.pad_token_id)
    with torch.no_grad():
        scored = token_logprobs(model, input_ids, attention, completion)
    for i, row in enumerate(logprobs):
        assert len(row) == len(ids[i]) >= 1
        torch.testing.assert_close(scored[i, -len(row):], torch.tensor(row), atol=1e-5, rtol=0)


def test_a_model_that_cannot_be_loaded_is_an_input_error(tmp_path):
    with pytest.raises(model_mod.ModelLoadError, match=r"--model: cannot load .*save_pretrained"):
        load_model_and_tokenizer(str(tmp_path / "no-such-model"))


def test_a_model_that_rescales_its_own_logits_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    load_model_and_tokenizer(str(tmp_path))  # as saved: loads
    model.config.final_logit_softcapping = 30.0  # Gemma's: the head's logits are squashed in forward
    model.config.save_pretrained(tmp_path)
    with pytest.raises(model_mod.ModelLoadError, match=r"final_logit_softcapping=30\.0"):
        load_model_and_tokenizer(str(tmp_path))


def test_splitmix_matches_the_reference_and_wraps_like_uint64():
    mask = (1 << 64) - 1

    def reference(x):  # splitmix64's finaliser on Python ints, mod 2**64
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    values = [0, 1, -1, 123456789, -(1 << 63), (1 << 63) - 1]
    out = sampling_mod._splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [o & mask for o in out] == [reference(v & mask) for v in values]


def test_seeded_uniforms_are_uniform_and_a_rows_own():
    u = sampling_mod.seeded_uniform(torch.tensor([3, 4]), 7, 200_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) * 12 - 1) < 0.02
    assert torch.equal(sampling_mod.seeded_uniform(torch.tensor([9, 4]), 7, 200_000)[1], u[1])  # its own seed only
    assert not torch.equal(sampling_mod.seeded_uniform(torch.tensor([4]), 8, 200_000)[0], u[1])  # and its step


def test_a_completion_depends_on_its_seed_not_on_the_batch_it_shares(tiny):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, m) for m in CHAT]
    together, _ = sampling_mod.generate_completions(model, tokenizer, prompts, 16, [11, 12])
    alone, _ = sampling_mod.generate_completions(model, tokenizer, prompts[1:], 16, [12])
    assert together[1] == alone[0]  # one prompt alone: no left padding, another batch, the same draw
    other, _ = sampling_mod.generate_completions(model, tokenizer, prompts[1:], 16, [13])
    assert other[0] != alone[0]
    rng = torch.get_rng_state()
    sampling_mod.generate_completions(model, tokenizer, prompts, 4, [1, 2])
    assert torch.equal(torch.get_rng_state(), rng)  # no global stream is read


def test_the_seeded_sampler_draws_from_the_tempered_nucleus():
    # Gumbel-max with a top-p cut: frequencies over many seeds match the renormalised nucleus.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 20_000
    seeds = torch.arange(n)
    draws = sampling_mod.draw(logits.expand(n, 4), seeds, 0, temperature=1.0, top_p=0.8)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8, atol=0.015, rtol=0)
    freq = torch.bincount(sampling_mod.draw(logits.expand(n, 4), seeds, 0, temperature=2.0, top_p=1.0),
                          minlength=4).float() / n
    tempered = torch.softmax(logits[0] / 2, -1)
    torch.testing.assert_close(freq, tempered, atol=0.015, rtol=0)


def test_shared_prompts_are_prefilled_once_and_each_row_leaves_the_batch_when_it_stops(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # EOS's logit a large multiple of another token's: rows stop early, at random steps
        model.lm_head.weight[eos] = 40 * model.lm_head.weight[7]
    model.generation_config.eos_token_id = [eos, 9]  # a second stop id, as chat checkpoints have
    prompts = [encode_prompt(tokenizer, m) for m in CHAT for _ in range(6)]  # two groups of six rows
    seeds = list(range(12))
    calls = []  # rows in each decoder call (each embeds its new tokens once): the prefill's, then one per token
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    handed = {}  # row: (its ids when handed on, decoder calls made by then)
    ids, logprobs = sampling_mod.generate_completions(
        model, tokenizer, prompts, 6, seeds, on_finished=lambda i, row: handed.setdefault(i, (list(row), len(calls))))
    hook.remove()
    for row in ids:  # up to and including the first stop token, or max_new tokens
        assert all(t not in (eos, 9) for t in row[:-1]) and (row[-1] in (eos, 9) or len(row) == 6)
    assert {i: row for i, (row, _) in handed.items()} == dict(enumerate(ids))  # every row once, its final ids
    early = {i for i, row in enumerate(ids) if row[-1] in (eos, 9) and len(row) < 6}
    assert early and len(early) < 12  # both kinds happen, so both paths are checked
    assert all((handed[i][1] < len(calls)) is (i in early) for i in range(12))  # stopped rows handed on at once
    assert calls[0] == 2 and calls[1] == 12  # each distinct prompt prefilled once
    assert calls[1:] == sorted(calls[1:], reverse=True) and calls[-1] < 12  # stopped rows leave the batch
    for i, prompt in enumerate(prompts):  # alone (no sharing, nothing leaving): the same draw, the same log-probs
        alone, alone_logprobs = sampling_mod.generate_completions(model, tokenizer, [prompt], 6, [seeds[i]])
        assert alone[0] == ids[i]
        torch.testing.assert_close(torch.tensor(alone_logprobs[0]), torch.tensor(logprobs[i]), atol=1e-5, rtol=0)


def _hf_decoding(monkeypatch):
    """Sample and score through transformers' own forward and DynamicCache instead of the Qwen3 one."""
    monkeypatch.setattr(forward_mod._Qwen3Forward, "fits", staticmethod(lambda model: False))


@pytest.mark.parametrize("top_p, fold", [(1.0, False), (0.9, False), (1.0, True)])
def test_the_qwen3_decoder_samples_what_transformers_forward_samples(tiny, monkeypatch, top_p, fold):
    from projected_grpo import adapter

    model, tokenizer = tiny
    if fold:  # a decoded token's query heads folded per kv head, as on CUDA; 4 query heads a kv head, so
        # that a fold grouping heads by kv_heads instead would not pass by chance (tiny-random has 2 and 2)
        monkeypatch.setattr(forward_mod, "_FOLD_ONE_QUERY_ON", ("cpu",))
        model = model_mod.tiny_qwen3(tokenizer, 0, heads=8, kv_heads=2).eval()
    wrappers = adapter.wrap(model, cache_dir=None)
    torch.manual_seed(0)
    for layer in wrappers.values():  # knobs away from zero: the merged weights differ from W
        layer.delta_s.data.normal_(0, 0.3)
    prompts = [encode_prompt(tokenizer, m) for m in CHAT for _ in range(3)]  # two lengths, shared prompts
    assert forward_mod._Qwen3Forward.fits(model)
    with adapter.merged(wrappers):
        lean = sampling_mod.generate_completions(model, tokenizer, prompts, 24, list(range(6)), 1.0, top_p)
        _hf_decoding(monkeypatch)
        reference = sampling_mod.generate_completions(model, tokenizer, prompts, 24, list(range(6)), 1.0, top_p)
    assert lean[0] == reference[0]  # the same tokens
    for ours, theirs in zip(lean[1], reference[1]):  # the same per-token log-probs, to float tolerance
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=2e-5, rtol=0)


def _full_sort_draw(logits, seeds, step, temperature, top_p):
    """The sampler before the nucleus was looked for among candidates: sort every row, noise on every column."""
    logits = logits.float() / temperature
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs
    logits = logits.scatter(-1, order, sorted_logits.masked_fill(before >= top_p, -torch.inf))
    u = sampling_mod.seeded_uniform(seeds, step, logits.shape[-1])
    return (logits - torch.log(-torch.log(u)).float()).argmax(-1)


@pytest.mark.parametrize("scale", [6.0, 0.01, "both"])  # peaked: the nucleus among the candidates; flat: past them
def test_the_nucleus_found_among_candidates_draws_what_a_full_sort_draws(scale):
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([6.0, 0.01]).repeat(128)[:, None] if scale == "both" else scale
    logits = torch.randn(256, 1536, generator=generator) * scales
    seeds = torch.arange(256) * 7919
    for step in range(4):
        ours = sampling_mod.draw(logits, seeds, step, 0.8, 0.95)
        assert torch.equal(ours, _full_sort_draw(logits, seeds, step, 0.8, 0.95))


def test_uniforms_at_given_columns_are_those_columns_of_the_full_draw():
    seeds = torch.tensor([3, -5])
    full = sampling_mod.seeded_uniform(seeds, 11, 100)
    columns = torch.tensor([[0, 99, 42], [7, 7, 1]])
    assert torch.equal(sampling_mod.seeded_uniform(seeds, 11, columns), full.gather(-1, columns))
