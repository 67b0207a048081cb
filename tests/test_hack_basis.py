import json

import pytest
import torch

from projected_grpo import adapter, hack_basis
from projected_grpo.hack_basis import BasisCacheMismatch
from projected_grpo.model import encode_completion, encode_prompt, load_model_and_tokenizer
from projected_grpo.templates import default_pairs

MAX_NEW = 64


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer("tiny-random", seed=0)
    wrappers = adapter.wrap(model)
    pairs = default_pairs(modes=("run_tests", "exit_code"))[:7]
    return model, tok, wrappers, pairs


def _extract(setup, **kw):
    model, tok, wrappers, pairs = setup
    kw = {"k": 4, "max_new": MAX_NEW, **kw}
    return hack_basis.extract_basis(model, tok, wrappers, pairs, **kw)


def test_rows_are_orthonormal_and_oriented_hackward(setup):
    model, tok, wrappers, pairs = setup
    basis = _extract(setup)
    assert set(basis.V) == set(wrappers)
    D = hack_basis._pair_differences(model, tok, wrappers, pairs, [p.hack for p in pairs],
                                     [p.clean for p in pairs], MAX_NEW, "fixed", 8, False)
    for name, V in basis.V.items():
        assert V.shape == (4, wrappers[name].r)
        torch.testing.assert_close(V @ V.T, torch.eye(4), atol=1e-5, rtol=0)
        positive = (D[name] @ V.T > 0).sum(0)
        assert torch.all(positive * 2 >= len(pairs))  # most pairs point along each row
        assert torch.equal(positive, basis.votes[name])
    assert not any(layer.delta_s.grad is not None for layer in wrappers.values())  # extraction leaves no grads


def test_batched_gradients_equal_one_backward_per_completion(setup):
    model, tok, wrappers, pairs = setup
    texts, messages = [pairs[0].hack, pairs[0].clean, pairs[1].hack], [pairs[0].messages] * 2 + [pairs[1].messages]
    batched = hack_basis.completion_grads(model, tok, wrappers, messages, texts, MAX_NEW, batch_size=3)
    for i in range(3):
        single = hack_basis.completion_grads(model, tok, wrappers, messages[i:i + 1], texts[i:i + 1], MAX_NEW)
        for name in wrappers:
            torch.testing.assert_close(batched[name][i], single[name][0], rtol=1e-4, atol=1e-7)
    mean = hack_basis.completion_grads(model, tok, wrappers, messages, texts, MAX_NEW, loss_norm="mean", batch_size=3)
    lengths = torch.tensor([len(encode_completion(tok, t, None)) for t in texts], dtype=torch.float32)
    name = next(iter(wrappers))
    torch.testing.assert_close(mean[name], batched[name] * MAX_NEW / lengths[:, None], rtol=1e-4, atol=1e-7)


def test_a_text_longer_than_max_new_is_scored_to_its_end(setup, monkeypatch):
    model, tok, wrappers, pairs = setup
    roomy_max_new = 4096
    text, messages = pairs[0].clean, [pairs[0].messages]
    assert len(encode_completion(tok, text, None)) > MAX_NEW
    whole = hack_basis.completion_grads(model, tok, wrappers, messages, [text], MAX_NEW)
    roomy = hack_basis.completion_grads(model, tok, wrappers, messages, [text], roomy_max_new)
    # max_new only normalises ("fixed"): the same tokens are scored whatever it is.
    for name in wrappers:
        torch.testing.assert_close(whole[name] * MAX_NEW, roomy[name] * roomy_max_new, rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(hack_basis, "encode_completion", lambda tok, text, _: encode_completion(tok, text, MAX_NEW))
    cut = hack_basis.completion_grads(model, tok, wrappers, messages, [text], MAX_NEW)
    assert not any(torch.allclose(whole[name], cut[name], rtol=1e-3, atol=1e-6) for name in wrappers)


def test_a_text_too_long_for_the_context_is_an_error_naming_its_pair(setup):
    model, tok, _, pairs = setup
    totals = [len(encode_prompt(tok, p.messages)) + len(encode_completion(tok, text, None))
              for p in pairs for text in (p.hack, p.clean)]
    model.config.max_position_embeddings = max(totals) - 1  # only the longest text no longer fits
    longest = pairs[totals.index(max(totals)) // 2]
    with pytest.raises(hack_basis.TextTooLong, match=rf"pair \d+ \({longest.problem_id}, {longest.mode}\): prompt and "
                       rf"completion are \d+ \+ \d+ tokens, over the model's context of {max(totals) - 1}"):
        _extract(setup)


def test_tau_drops_weak_axes_and_postprocess_applies_the_global_floor(setup):
    full = _extract(setup)
    strict = _extract(setup, tau=0.5)
    for name, V in strict.V.items():
        assert torch.all(strict.S[name] / strict.spectrum[name][0] >= 0.5)
        assert V.shape[0] <= full.V[name].shape[0]
    sliced = hack_basis.postprocess(full, k_use=2)
    assert all(v.shape[0] == 2 for v in sliced.V.values())
    floored = hack_basis.postprocess(full, drop_bottom_frac=0.5)
    pooled = torch.cat(list(full.S.values()))
    floor = torch.quantile(pooled.double(), 0.5).item()
    assert sum(floored.rows().values()) == int((pooled.double() >= floor).sum())
    assert all(torch.all(floored.S[n].double() >= floor) for n in floored.V)
    almost_all = hack_basis.postprocess(full, drop_bottom_frac=0.99)
    assert 0 < len(almost_all.V) < len(full.V)  # layers with no row left are dropped


@pytest.mark.parametrize("control", ["random", "shuffled", "nonhack"])
def test_controls_have_the_real_basis_shapes(setup, control):
    real = _extract(setup, tau=0.3)
    ctrl = _extract(setup, tau=0.3, control=control, seed=3)
    assert ctrl.rows() == real.rows()
    for V in ctrl.V.values():
        torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0]), atol=1e-5, rtol=0)
    assert hack_basis.postprocess(ctrl, 3, 0.25).rows() == hack_basis.postprocess(real, 3, 0.25).rows()
    sign_tested = hack_basis.postprocess(real, min_margin=1.0)
    assert sign_tested.rows() != real.rows()  # the sign test drops some real rows here ...
    assert hack_basis.postprocess(ctrl, min_margin=1.0).rows() == sign_tested.rows()  # ... and the same control rows
    name = next(iter(real.V))
    overlap = torch.linalg.matrix_norm(real.V[name] @ ctrl.V[name].T) ** 2 / real.V[name].shape[0]
    assert overlap < 0.9


def test_cache_miss_hit_mismatch_and_bit_exact_round_trip(setup, tmp_path, caplog):
    pairs = setup[3]
    calls = []

    def extract():
        calls.append(1)
        return _extract(setup)

    request = hack_basis.basis_request("tiny", pairs, ("run_tests", "exit_code"), 4, 0.0, "fixed", "none", MAX_NEW, 0)
    path = tmp_path / "basis.safetensors"
    caplog.set_level("INFO")
    first = hack_basis.resolve_basis(path, request, extract)
    assert "cache miss" in caplog.text and path.exists() and len(calls) == 1
    second = hack_basis.resolve_basis(path, request, extract)
    assert "cache hit" in caplog.text and len(calls) == 1
    for name in first.V:
        assert torch.equal(first.V[name], second.V[name]) and torch.equal(first.S[name], second.S[name])
    assert {key: second.meta[key] for key in request} == request
    tok = setup[1]
    for side, texts in (("hack", [p.hack for p in pairs]), ("clean", [p.clean for p in pairs])):
        n = [len(encode_completion(tok, text, None)) for text in texts]
        expected = {"min": min(n), "mean": round(sum(n) / len(n), 1), "max": max(n),
                    "over_max_new": sum(x > MAX_NEW for x in n)}
        assert json.loads(second.meta[f"tokens_{side}"]) == expected
    assert json.loads(second.meta["tokens_clean"])["over_max_new"] > 0  # some texts are longer than MAX_NEW here
    with pytest.raises(BasisCacheMismatch, match=r"k: cached '4' vs requested '8'.*reextract"):
        hack_basis.resolve_basis(path, {**request, "k": "8"}, extract)
    hack_basis.resolve_basis(path, {**request, "k": "8"}, extract, reextract=True)
    assert len(calls) == 2 and hack_basis.load_basis(path).meta["k"] == "8"
    path.write_bytes(path.read_bytes()[:200])  # a cut-off write
    with pytest.raises(hack_basis.BasisFileError, match=r"cannot read basis file.*--reextract_basis=true"):
        hack_basis.resolve_basis(path, request, extract)


def test_non_finite_loss_names_the_pair(setup):
    _, _, wrappers, pairs = setup
    with torch.no_grad():
        next(iter(wrappers.values())).delta_s.fill_(float("nan"))
    pattern = r"non-finite completion loss \(nan\) for pair \d+ \(pg-\d+, \w+\)"
    with pytest.raises(FloatingPointError, match=pattern) as e:
        _extract(setup)
    named = e.value.args[0].split("pair ")[1]
    index, pid = int(named.split()[0]), named.split("(")[1].split(",")[0]
    assert pairs[index].problem_id == pid  # the name points at the right pair


def test_bad_arguments_are_rejected(setup):
    with pytest.raises(ValueError, match="control must be one of"):
        _extract(setup, control="bogus")
    with pytest.raises(ValueError, match="loss_norm must be one of"):
        _extract(setup, loss_norm="sum")
    with pytest.raises(ValueError, match="k >= 1"):
        _extract(setup, k=0)


def _mean_overlap(a, b):
    return sum(float((a.V[n] @ b.V[n].T).square().sum()) / a.V[n].shape[0] for n in a.V) / len(a.V)


def test_shuffled_control_keeps_the_values_and_loses_the_span(setup):
    # Flipping pair labels (the old control) left span(V) unchanged: under no_gate it was the real basis.
    real = _extract(setup)
    shuffled = [_extract(setup, control="shuffled", seed=s) for s in range(4)]
    random = [_extract(setup, control="random", seed=s) for s in range(4)]
    shuffled_overlap = sum(_mean_overlap(real, b) for b in shuffled) / 4
    random_overlap = sum(_mean_overlap(real, b) for b in random) / 4
    assert _mean_overlap(real, real) > 0.99
    assert shuffled_overlap <= random_overlap + 0.05 and shuffled_overlap < 0.4  # k/r = 0.25 here
    for name, V in shuffled[0].V.items():
        # The first row is only normalised by the re-orthonormalisation: it holds the real row's values.
        torch.testing.assert_close(V[0].abs().sort().values, real.V[name][0].abs().sort().values)
        assert not torch.allclose(V[0].abs(), real.V[name][0].abs())  # ... in other places


def _planted_differences(splits: list[int], n: int) -> torch.Tensor:
    """D (n x len(splits)) with orthogonal columns of decreasing norm, column j positive in splits[j]
    of its n entries: its right singular vectors are the axes, and row j's vote is splits[j] of n
    (or n - splits[j] once oriented, when that is fewer than half)."""
    generator = torch.Generator().manual_seed(0)
    columns = []
    for positive in splits:
        signs = torch.where(torch.randperm(n, generator=generator) < positive, 1.0, -1.0).double()
        column = signs.clone()
        for previous in columns:
            column -= (column @ previous) * previous
        assert torch.equal(column.sign(), signs)  # orthogonalising kept the planted split
        columns.append(column / column.norm())
    return torch.stack(columns, 1) * torch.arange(len(splits), 0, -1, dtype=torch.float64)


def test_margins_and_min_margin_drop_exactly_the_rows_whose_vote_is_within_chance():
    n = 16  # under a fair coin, for - against has sd sqrt(16) = 4
    D = {"a": _planted_differences([14, 11, 9], n), "b": _planted_differences([10, 7], n)}
    basis = hack_basis.basis_from_differences(D, k=4, tau=0.0)
    # |for - against| / 4: a 3.0, 1.5, 0.5; b 1.0, 0.5 (7 for, so oriented the other way: 9 for).
    assert basis.margins() == {"a": [(14, 2), (11, 5), (9, 7)], "b": [(10, 6), (9, 7)]}
    assert "14:2 (3.0) 11:5 (1.5) 9:7 (0.5)" in basis.summary()
    assert hack_basis.postprocess(basis).margins() == basis.margins()  # 0 keeps every row
    kept = hack_basis.postprocess(basis, min_margin=1.0)
    assert kept.margins() == {"a": [(14, 2), (11, 5)], "b": [(10, 6)]}
    torch.testing.assert_close(kept.V["a"], basis.V["a"][:2])
    assert hack_basis.postprocess(basis, min_margin=1.5).margins() == {"a": [(14, 2), (11, 5)]}  # b left empty
    assert hack_basis.postprocess(basis, k_use=1, min_margin=1.0).margins() == {"a": [(14, 2)], "b": [(10, 6)]}
    with pytest.raises(ValueError, match="min_margin must be >= 0"):
        hack_basis.postprocess(basis, min_margin=-1.0)
