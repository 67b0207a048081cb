"""The method inside TRL's GRPOTrainer (the `peer` extra): 3 steps on tiny-random, on the CPU."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

trl = pytest.importorskip("trl", reason="the TRL integration needs the peer extra: pip install -e '.[peer]'")
datasets = pytest.importorskip("datasets", reason="TRL's datasets: pip install -e '.[peer]'")

import torch  # noqa: E402
from conftest import module_workdir  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from projected_grpo import adapter, hack_basis  # noqa: E402
from projected_grpo.config import ConfigError  # noqa: E402
from projected_grpo.model import load_model_and_tokenizer  # noqa: E402
from projected_grpo.problems import builtin_problems  # noqa: E402
from projected_grpo.templates import default_pairs  # noqa: E402
from projected_grpo.trl_integration import ProjectedGRPOTrainer, prepare  # noqa: E402

STEPS, GROUP = 3, 4


@pytest.fixture(scope="module", autouse=True)
def workdir(tmp_path_factory):
    with module_workdir(tmp_path_factory, "trl") as path:
        yield path


def _reward(completions, **_):
    """Longer completions score higher: a signal tiny-random's samples vary in."""
    return [float(len(c[-1]["content"])) / 10 for c in completions]


def _parity(completions, **_):
    """A stand-in detector: flags completions of even length (the tiny model hacks nowhere)."""
    return [len(c[-1]["content"]) % 2 == 0 for c in completions]


def _model():
    return load_model_and_tokenizer("tiny-random", seed=0)


def _random_V(model, k=2, seed=0):
    rows = {name: torch.randn(k, min(linear.weight.shape), generator=torch.Generator().manual_seed(seed))
            for name, linear in adapter.targeted(model).items()}
    return {name: torch.linalg.qr(v.T).Q.T.contiguous() for name, v in rows.items()}


class Knobs(TrainerCallback):
    """Each step's delta_s before and after the optimizer, for the update's component along V."""

    def __init__(self, wrappers):
        self.wrappers, self.steps = wrappers, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = {n: w.delta_s.detach().clone() for n, w in self.wrappers.items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({n: self.before[n] - w.delta_s.detach() for n, w in self.wrappers.items()})


def _trainer_kwargs(tmp_path, model, tok, reward=_reward, callbacks=()) -> dict:
    problems = builtin_problems()[:4]
    data = datasets.Dataset.from_list([{"prompt": p.messages()} for p in problems])
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * GROUP, num_generations=GROUP,
                          max_completion_length=12, temperature=1.0, beta=0.0, loss_type="dr_grpo",
                          scale_rewards="none", learning_rate=0.05, max_steps=STEPS, use_cpu=True, bf16=False,
                          logging_steps=1, report_to="none", save_strategy="no", seed=1, weight_decay=0.0)
    return dict(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                callbacks=list(callbacks))


def _train(tmp_path, model, tok, projection=None, reward=_reward, callbacks=()):
    kwargs = _trainer_kwargs(tmp_path, model, tok, reward, callbacks)
    if projection is None:
        trainer = trl.GRPOTrainer(**kwargs)
    else:
        trainer = ProjectedGRPOTrainer(projection=projection, **kwargs)
    trainer.train()
    return trainer


def test_measure_only_trains_exactly_as_trl_with_the_same_adapter(tmp_path):
    plain_model, tok = _model()
    V = _random_V(plain_model)
    for layer in adapter.wrap(plain_model).values():  # the adapter as prepare leaves it for a non-route arm
        layer.delta_s_hack.requires_grad_(False)
    _train(tmp_path / "plain", plain_model, tok)
    model, tok = _model()
    projection = prepare(model, V=V, intervention="none", gate="no_gate")
    trainer = _train(tmp_path / "measured", model, tok, projection)
    knobs = {n: m.delta_s for n, m in model.named_modules() if isinstance(m, adapter.AdapterLayer)}
    plain = {n: m.delta_s for n, m in plain_model.named_modules() if isinstance(m, adapter.AdapterLayer)}
    assert all(knobs[n].abs().sum() > 0 for n in knobs)  # it trained
    assert all(torch.equal(knobs[n], plain[n]) for n in knobs)
    logged = [row for row in trainer.state.log_history if "cin" in row]
    assert len(logged) == STEPS and all(0 < row["cin"] <= 1 and row["cout"] == row["cin"] for row in logged)
    assert all("update_hackward" in row and "gated_frac" in row for row in logged)


def test_erase_without_a_gate_leaves_the_update_nothing_along_V(tmp_path):
    model, tok = _model()
    V = _random_V(model, k=3, seed=1)
    projection = prepare(model, V=V, intervention="erase", gate="no_gate", adam_leak="update")
    knobs = Knobs(projection.wrappers)
    trainer = _train(tmp_path, model, tok, projection, callbacks=[knobs])
    assert len(knobs.steps) == STEPS
    for step in knobs.steps:
        assert sum(float(s.norm()) for s in step.values()) > 0  # the knobs moved
        along = max(float((V[n] @ s).abs().max()) / float(s.norm()) for n, s in step.items())
        assert along < 1e-5
    assert all(row["update_hackward"] < 1e-6 for row in trainer.state.log_history if "update_hackward" in row)


class Gradients(TrainerCallback):
    """Each step's knob gradients as the optimizer takes them (after the projection's callback)."""

    def __init__(self, wrappers):
        self.wrappers, self.steps = wrappers, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: (w.delta_s.grad.clone(), None if w.delta_s_hack.grad is None else
                               w.delta_s_hack.grad.clone()) for n, w in self.wrappers.items()})


def test_erase_and_route_act_on_the_gradient_the_optimizer_takes(tmp_path):
    for arm in ("erase", "route"):
        model, tok = _model()
        V = _random_V(model, k=3, seed=2)
        projection = prepare(model, V=V, intervention=arm, gate="one_sided")
        seen = Gradients(projection.wrappers)
        trainer = ProjectedGRPOTrainer(projection=projection, **_trainer_kwargs(tmp_path / arm, model, tok))
        trainer.add_callback(seen)  # after the projection: it sees what the optimizer takes
        trainer.train()
        for grads in seen.steps:
            # one_sided: no hack-ward component is left in delta_s's gradient
            assert max(float((V[n] @ g).max()) for n, (g, _) in grads.items()) < 1e-6
            # the quarantine is fed only under route, and only what was removed (along V)
            for n, (_, q) in grads.items():
                if arm == "erase":
                    assert q is None
                else:
                    assert torch.allclose(q, V[n].T @ (V[n] @ q), atol=1e-6)
        hack = [w.delta_s_hack.detach().clone() for w in projection.wrappers.values()]
        assert any(h.abs().sum() > 0 for h in hack) == (arm == "route")
        if arm == "route":  # the merged model ablates the quarantine: it is the knobs of delta_s alone
            layer = next(iter(projection.wrappers.values()))
            expected = (layer.base.weight.float() + (layer.U.float() * layer.delta_s.float()) @ layer.Vh.float())
            merged = projection.merged_model()
            assert not any(isinstance(m, adapter.AdapterLayer) for m in merged.modules())
            torch.testing.assert_close(layer.base.weight.float(), expected)
            with pytest.raises(RuntimeError, match="already merged"):
                projection.merged_model()


def test_a_live_v_is_built_from_flagged_rollouts_and_refreshed(tmp_path):
    model, tok = _model()
    projection = prepare(model, intervention="erase", refresh_every=1, live_window=1, detector=_parity,
                         tokenizer=tok, basis_k=2)
    assert not projection.basis.V
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # the V the previous step's refresh set
            seen.append({n: v.clone() for n, v in projection.basis.V.items()})

    _train(tmp_path, model, tok, projection, reward=projection.recorded_reward(_reward), callbacks=[Watch()])
    # a refresh after steps 1 and 2 (none after the last), each from that step's groups
    assert [step for step, _ in projection.refreshes] == [1, 2]
    assert not seen[0] and seen[1] and seen[2]
    assert not torch.equal(next(iter(seen[1].values())), next(iter(seen[2].values())))
    assert all(v.shape[0] <= 2 for v in seen[2].values())


def test_a_bad_configuration_is_one_clear_error():
    model, _ = _model()
    V = _random_V(model)
    name = next(iter(V))
    for kwargs, error in [
        (dict(V=V, intervention="screen"), "intervention=screen does not act on the gradient"),
        (dict(V=V, basis_path="x.safetensors"), "exactly one source of V, got V and basis_path"),
        (dict(), "exactly one source of V, got none"),
        (dict(V=V, refresh_every=5), "give detector= too"),
        (dict(refresh_every=5, detector=_parity), "needs tokenizer="),
        (dict(V=V, lr=0.1), "lr not settings a TRL run reads"),
        (dict(V={name: V[name][:, :-1]}), "it needs k x"),
        (dict(V={"nowhere": V[name]}), "not a layer the adapter wraps"),
        (dict(V={name: 2 * V[name]}), "not orthonormal"),
        (dict(V=V, gate="sideways"), "prepare: gate: 'sideways' is not one of"),
        (dict(V={}), "holds no rows"),
        (dict(basis_path="nowhere.safetensors"), "prepare: basis_path: cannot read basis file"),
    ]:
        with pytest.raises(ConfigError, match=error):
            prepare(model, **kwargs)
    assert not any(isinstance(m, adapter.AdapterLayer) for m in model.modules())  # nothing half made


def test_the_docs_script_runs_and_saves_a_plain_model(tmp_path):
    text = (Path(__file__).parents[1] / "docs" / "trl.md").read_text()
    script = re.search(r"```python\n(.*?)```", text, re.S)[1]
    env = {**os.environ, "MODEL": "tiny-random", "STEPS": "2", "MAX_NEW": "8", "OMP_NUM_THREADS": "1",
           "PROJECTED_GRPO_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = tmp_path / "out/trl-erase/model"
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists()


def test_v_from_the_packages_pairs_or_its_basis_file(tmp_path):
    model, tok = _model()
    pairs = default_pairs(problems=builtin_problems())[:6]
    projection = prepare(model, pairs=pairs, tokenizer=tok, basis_k=2)
    assert projection.basis.V and all(v.shape[0] <= 2 for v in projection.basis.V.values())
    # the same extraction saved as the package saves its cache, then read back through basis_path
    saved, (other, _) = tmp_path / "basis.safetensors", _model()
    hack_basis.save_basis(hack_basis.extract_basis(other, tok, adapter.wrap(other), pairs, 2), saved)
    loaded = prepare(_model()[0], basis_path=str(saved))
    assert loaded.basis.V.keys() == projection.basis.V.keys()
    assert all(torch.allclose(loaded.basis.V[n], projection.basis.V[n], atol=1e-5) for n in loaded.basis.V)


def test_a_live_v_without_records_or_under_vllm_is_an_error(tmp_path):
    model, tok = _model()
    projection = prepare(model, intervention="erase", refresh_every=1, detector=_parity, tokenizer=tok)
    with pytest.raises(ConfigError, match="recorded_reward"):  # the reward was not wrapped: never plain GRPO
        _train(tmp_path, model, tok, projection)
    with pytest.raises(ConfigError, match="use_vllm=True"):
        ProjectedGRPOTrainer(projection=projection, args=types.SimpleNamespace(use_vllm=True))
