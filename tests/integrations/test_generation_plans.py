"""Inside ``generate`` (grad and autocast off) each infused layer's kernel arguments besides the activations (the maps'
outputs, the gate logits, the resolved function, the checked scale) are gathered once per call and reused by every
decoding step (``CallMemo.attention_plan`` / ``gate_plan``): the tokens and scores must be those of the per-step path,
bit for bit, on every family; a plan is remade whenever what it was made for changes, and never used where grad or
autocast is on."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_families import FAMILIES, MODALITY_DIM, embedding, model, padded_batch, randomise

import mit
import mit.integrations.attention as attention_module
import mit.integrations.model as model_module
from mit.integrations.attention import AttentionPlan, CallMemo, GatePlan


def _generate(net, ids, mask, emb, **kwargs):
    return net.generate(
        ids, attention_mask=mask, modality_embedding=emb, max_new_tokens=4, min_new_tokens=4, do_sample=False,
        pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


def _count_plans(monkeypatch) -> dict[str, int]:
    made = {"attention": 0, "gate": 0}

    def counting(cls, key):
        def make(*args):
            made[key] += 1
            return cls(*args)

        return make

    monkeypatch.setattr(attention_module, "AttentionPlan", counting(AttentionPlan, "attention"))
    monkeypatch.setattr(attention_module, "GatePlan", counting(GatePlan, "gate"))
    return made


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_plans_is_the_per_step_path_bit_for_bit(family, monkeypatch):
    infused = mit.apply_mit(model(family), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(infused)
    ids, mask = padded_batch()
    emb = embedding()
    made = _count_plans(monkeypatch)
    planned = _generate(infused, ids, mask, emb)
    kv = [m for m in infused.modules() if isinstance(m, mit.MiTKVInfusion)]
    fused_ffn = [m for m in infused.modules() if isinstance(m, mit.MiTFFNInfusion) and m.fused]
    # once per infused module for the whole call (the prefill makes them, three decoding steps reuse them)
    assert made == {"attention": len(kv), "gate": len(fused_ffn)}, made
    counts = {name: dict(m.dispatch_counts) for name, m in infused.named_modules() if hasattr(m, "dispatch_counts")}
    monkeypatch.setattr(model_module, "autocast_enabled", lambda: True)  # no plans kept: every step works it all out
    made.update(attention=0, gate=0)
    per_step = _generate(infused, ids, mask, emb)
    assert made == {"attention": 4 * len(kv), "gate": 4 * len(fused_ffn)}, made  # prefill + 3 steps
    assert torch.equal(planned.sequences, per_step.sequences), family
    for a, b in zip(planned.scores, per_step.scores, strict=True):
        assert torch.equal(a, b), family
    again = {name: dict(m.dispatch_counts) for name, m in infused.named_modules() if hasattr(m, "dispatch_counts")}
    # every decoding step is recorded on either path, on the same dispatch path
    assert again == {name: {path: 2 * n for path, n in c.items()} for name, c in counts.items()}, family


def test_a_plan_is_remade_when_its_embedding_dtype_or_scale_changes_and_reused_otherwise():
    infused = mit.apply_mit(model("llama"), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(infused)
    kv = next(m for m in infused.modules() if isinstance(m, mit.MiTKVInfusion))
    emb = embedding(2)
    query = torch.randn(2, 4, 1, kv.head_dim)
    memo = CallMemo(checked_embedding=emb, plans={})
    with torch.no_grad():
        first = memo.attention_plan(kv, emb, query, {"scaling": 0.25})
        assert memo.attention_plan(kv, emb, query, {"scaling": 0.25}) is first
        assert first.scale == 0.25 and first.head_logit is kv.head_logit
        for got, want in zip(first.vectors, kv.vectors(emb, torch.float32), strict=True):
            assert torch.equal(got, want) and got.is_contiguous()
        same_values = emb.clone()  # another tensor: identity is the key (its values may have changed in place)
        assert memo.attention_plan(kv, same_values, query, {"scaling": 0.25}) is not first
        other_dtype = memo.attention_plan(kv, same_values, query.double(), {"scaling": 0.25})
        assert {v.dtype for v in other_dtype.vectors} == {torch.float64}
        rescaled = memo.attention_plan(kv, same_values, query.double(), {"scaling": 0.5})
        assert rescaled is not other_dtype and rescaled.scale == 0.5
        with pytest.raises(ValueError, match="scale must be a positive float"):
            memo.attention_plan(kv, same_values, query.double(), {"scaling": -1.0})
        # an embedding the model's forward did not check is checked when its plan is made, naming the argument
        with pytest.raises(ValueError, match=r"modality_embedding must have shape \(batch, modality_dim\)"):
            memo.attention_plan(kv, torch.randn(2, MODALITY_DIM + 1), query, {"scaling": 0.25})
    unkept = CallMemo(checked_embedding=emb)  # no plans given: made for each call, never kept
    with torch.no_grad():
        assert unkept.attention_plan(kv, emb, query, {}) is not unkept.attention_plan(kv, emb, query, {})
    assert unkept.plans is None


def test_no_plans_kept_under_autocast_or_with_grad_or_outside_generate(monkeypatch):
    """Each forward there makes its layers' arguments afresh (one per infused module and forward), as before the
    plans; inside a plain generate they are made once."""
    infused = mit.apply_mit(model("llama"), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(infused)
    ids, mask = padded_batch()
    emb = embedding()
    kv = sum(isinstance(m, mit.MiTKVInfusion) for m in infused.modules())
    made = _count_plans(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _generate(infused, ids, mask, emb)  # prefill + 3 steps
    assert made["attention"] == 4 * kv
    with torch.no_grad():
        infused(ids, attention_mask=mask, modality_embedding=emb)  # a forward outside generate
    infused(ids, attention_mask=mask, modality_embedding=emb).logits.sum().backward()
    assert made["attention"] == 6 * kv
    made.update(attention=0)
    _generate(copy.deepcopy(infused), ids, mask, emb)
    assert made["attention"] == kv


def test_the_autocast_probe_without_torchs_single_probe(monkeypatch):
    assert not attention_module.autocast_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_module.autocast_enabled()
    monkeypatch.setattr(attention_module, "_any_autocast_enabled", None)  # a torch without it: one probe per type
    assert not attention_module.autocast_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_module.autocast_enabled()
    with torch.autocast("cpu", enabled=False):
        assert not attention_module.autocast_enabled()


def test_a_layer_that_always_falls_back_never_asks_for_a_kernel(monkeypatch):
    """Gemma2 (logit soft-capping) runs the exact fallback in every layer: its plans must not resolve a fused kernel,
    which a backend may refuse (an explicit backend on a device it does not run on), where the fallback runs fine."""

    def refusing(*args, **kwargs):
        raise ValueError("backend refused")

    monkeypatch.setattr(attention_module, "attention_function", refusing)
    ids, mask = padded_batch()
    emb = embedding()
    for family in ("gemma2", "llama"):
        infused = mit.apply_mit(model(family), mit.MiTConfig(modality_dim=MODALITY_DIM))
        randomise(infused)
        if family == "gemma2":
            _generate(infused, ids, mask, emb)
            assert "fallback: softcap" in infused.mit_dispatch().values()
        else:  # a layer that runs fused does ask: the refusal propagates
            with pytest.raises(ValueError, match="backend refused"):
                _generate(infused, ids, mask, emb)


def test_decoding_steps_call_the_cpu_kernels_through_their_direct_entries(monkeypatch):
    """With plans (inside generate) the resolved CPU functions are the decoding ones
    (``mit_kernels.cpu_backend.decoding_attention`` / ``decoding_ffn_gate``); every other forward keeps the torch.ops
    calls. (That both give the same tokens and scores, bit for bit, is the first test of this file.)"""
    from mit_kernels import cpu_backend
    from mit_kernels.dispatch import cpu_backend_available

    if not cpu_backend_available():
        pytest.skip("the C++ CPU kernels cannot be built here (no compiler?)")
    calls = {name: 0 for name in ("decoding_attention", "decoding_ffn_gate", "loaded_attention", "loaded_ffn_gate")}

    def counting(name):
        function = getattr(cpu_backend, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(cpu_backend, name, counting(name))
    infused = mit.apply_mit(model("llama"), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(infused)
    ids, mask = padded_batch()
    emb = embedding()
    kv = sum(isinstance(m, mit.MiTKVInfusion) for m in infused.modules())
    ffn = sum(isinstance(m, mit.MiTFFNInfusion) and m.fused for m in infused.modules())
    _generate(infused, ids, mask, emb)  # prefill + 3 decoding steps
    assert calls == {"decoding_attention": 4 * kv, "decoding_ffn_gate": 4 * ffn, "loaded_attention": 0,
                     "loaded_ffn_gate": 0}, calls  # fmt: skip
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        infused(ids, attention_mask=mask, modality_embedding=emb)  # a forward outside generate
    assert calls == {"decoding_attention": 0, "decoding_ffn_gate": 0, "loaded_attention": kv, "loaded_ffn_gate": ffn}
