import pytest
import torch

from projected_grpo import adapter, bench
from projected_grpo.model import load_model_and_tokenizer


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    return model, tok


def _batch(tok, texts=("def f(x):\n    return x", "class Solution:\n    pass\n# héllo")):
    return tok(list(texts), return_tensors="pt", padding=True)


def _randomize(wrappers, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.copy_(torch.randn(layer.r, generator=g) * scale)
            layer.delta_s_hack.copy_(torch.randn(layer.r, generator=g) * scale)


def test_wrap_targets_every_projection_and_freezes_the_rest(tiny):
    model, _ = tiny
    wrappers = adapter.wrap(model)
    assert len(wrappers) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in wrappers for k in ("delta_s", "delta_s_hack")}
    layer = wrappers["model.layers.0.self_attn.q_proj"]
    W = layer.base.weight
    assert layer.r == min(W.shape)
    assert layer.U.shape == (W.shape[0], layer.r) and layer.Vh.shape == (layer.r, W.shape[1])
    assert torch.allclose(layer.U @ torch.diag(layer.S) @ layer.Vh, W, atol=1e-5)
    assert not layer.delta_s.any() and not layer.delta_s_hack.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_knobs_are_bit_identical(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer("tiny-random", dtype=dtype)
    batch = _batch(tok)
    with torch.no_grad():
        base_logits = model(**batch).logits
        base_tokens = model.generate(**batch, do_sample=False, max_new_tokens=12, top_k=0, top_p=1.0,
                                     temperature=1.0, pad_token_id=tok.pad_token_id)
    adapter.wrap(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)
        assert torch.equal(model.generate(**batch, do_sample=False, max_new_tokens=12, top_k=0, top_p=1.0,
                                          temperature=1.0, pad_token_id=tok.pad_token_id), base_tokens)
    assert torch.equal(model(**batch).logits, base_logits)  # the grad path too


def test_merged_generation_matches_hook_path_and_restores_w(tiny):
    model, tok = tiny
    wrappers = adapter.wrap(model)
    _randomize(wrappers, scale=0.3)
    weights = {n: layer.base.weight.clone() for n, layer in wrappers.items()}
    batch = _batch(tok)
    kwargs = {"do_sample": False, "max_new_tokens": 16, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                  "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        hook_logits = model(**batch).logits
        hook = model.generate(**batch, **kwargs)
        with adapter.merged(wrappers):
            assert torch.allclose(model(**batch).logits, hook_logits, atol=1e-5)
            merged = model.generate(**batch, **kwargs)
    assert torch.equal(merged, hook)
    assert all(torch.equal(layer.base.weight, weights[n]) for n, layer in wrappers.items())
    with pytest.raises(RuntimeError, match="boom"), adapter.merged(wrappers):
        raise RuntimeError("boom")
    assert all(layer._merged_weight is None for layer in wrappers.values())


def _loss(model, batch):
    logits = model(**batch).logits.float()
    # Per-sequence losses that differ, so each sequence's gradient differs.
    return (logits.log_softmax(-1)[..., 0] * batch["attention_mask"]).sum()


def test_per_sequence_grads_sum_to_autograd_and_match_single_backward(tiny, monkeypatch):
    model, tok = tiny
    wrappers = adapter.wrap(model)
    _randomize(wrappers, scale=0.1)
    batch = _batch(tok, ("def f(x):\n    return x", "x = 1", "print('all tests passed')"))
    with adapter.per_sample_grads(wrappers):
        _loss(model, batch).backward()
    for layer in wrappers.values():
        gs = layer.grad_sample
        assert gs.shape == (3, layer.r)
        torch.testing.assert_close(gs.sum(0), layer.delta_s.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.delta_s_hack.grad, layer.delta_s.grad)
    per_sample = {n: layer.grad_sample.clone() for n, layer in wrappers.items()}
    with monkeypatch.context() as patch:  # ordinary autograd through the naive formula agrees
        patch.setattr(adapter.AdapterLayer, "forward", bench._plain_autograd_forward)
        model.zero_grad()
        _loss(model, batch).backward()
        for n, layer in wrappers.items():
            torch.testing.assert_close(per_sample[n].sum(0), layer.delta_s.grad, rtol=1e-5, atol=1e-8)
    for i in range(3):
        model.zero_grad()
        single = {k: v[i:i + 1] for k, v in batch.items()}
        _loss(model, single).backward()
        for n, layer in wrappers.items():
            # Padding differs alone vs in the batch; the math does not.
            torch.testing.assert_close(per_sample[n][i], layer.delta_s.grad, rtol=1e-4, atol=1e-6)


def test_zeroed_and_ablate_quarantine_restore_state(tiny):
    model, tok = tiny
    wrappers = adapter.wrap(model)
    _randomize(wrappers)
    before = adapter.knob_state(wrappers)
    batch = _batch(tok)
    with torch.no_grad():
        with adapter.zeroed(wrappers):
            assert all(not layer.knobs().any() for layer in wrappers.values())
            ref = model(**batch).logits
        with adapter.ablate_quarantine(wrappers):
            assert all(not layer.delta_s_hack.any() and layer.delta_s.any() for layer in wrappers.values())
    after = adapter.knob_state(wrappers)
    assert all(torch.equal(before[k], after[k]) for k in before)
    base, _ = load_model_and_tokenizer("tiny-random", seed=0)
    with torch.no_grad():
        assert torch.equal(ref, base(**batch).logits)


def test_knob_save_load_round_trip_and_mismatch(tiny, tmp_path):
    model, _ = tiny
    wrappers = adapter.wrap(model)
    _randomize(wrappers)
    path = tmp_path / "knobs.safetensors"
    saved = adapter.knob_state(wrappers)
    adapter.save_tensors(saved, path)
    with torch.no_grad():
        for layer in wrappers.values():
            layer.delta_s.zero_()
    adapter.load_knobs(wrappers, path)
    assert all(torch.equal(saved[k], v) for k, v in adapter.knob_state(wrappers).items())
    fewer = dict(list(wrappers.items())[:3])
    with pytest.raises(ValueError, match="does not match the model"):
        adapter.load_knobs(fewer, path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read knob file"):
        adapter.load_knobs(wrappers, path)


def test_svd_cache_hit_and_corrupt_file_rebuilt(tmp_path):
    W = torch.randn(12, 8)
    U, S, Vh = adapter.thin_svd(W, tmp_path)
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 1 and U.shape == (12, 8) and Vh.shape == (8, 8)
    U2, S2, Vh2 = adapter.thin_svd(W, tmp_path)
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(Vh, Vh2)
    files[0].write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="corrupt"):
        U3, _, _ = adapter.thin_svd(W, tmp_path)
    assert torch.equal(U3, U)
    assert adapter.thin_svd(W, tmp_path)[0].shape == (12, 8)  # rebuilt file now loads


def test_merged_scoring_gives_the_same_per_sequence_grads(tiny):
    model, tok = tiny
    wrappers = adapter.wrap(model)
    _randomize(wrappers, scale=0.1)
    batch = _batch(tok, ("def f(x):\n    return x", "x = 1"))
    with adapter.per_sample_grads(wrappers):
        _loss(model, batch).backward()
    plain = {n: layer.grad_sample.clone() for n, layer in wrappers.items()}
    model.zero_grad()
    with adapter.merged(wrappers), adapter.per_sample_grads(wrappers):
        _loss(model, batch).backward()
        with torch.no_grad(), adapter.zeroed(wrappers):  # the reference inside a merged block is the base model
            base, _ = load_model_and_tokenizer("tiny-random", seed=0)
            assert torch.equal(model(**batch).logits, base(**batch).logits)
    for n, layer in wrappers.items():
        torch.testing.assert_close(layer.grad_sample, plain[n], rtol=1e-4, atol=1e-7)


def test_scoring_merges_only_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path))
    for dtype, merges in ((torch.float32, True), (torch.bfloat16, False)):
        model, _ = load_model_and_tokenizer("tiny-random", dtype=dtype)
        wrappers = adapter.wrap(model)
        _randomize(wrappers, scale=1e-3)
        with adapter.scoring(wrappers):
            assert all((layer._merged_weight is not None) == merges for layer in wrappers.values())
