"""torch.compile(fullgraph=True) of an MiT model with a padded batch and an embedding: one graph, the same logits
(on the real tokens: padded query rows see no key and are unspecified) and gradients as eager. Compiled, a 4-D mask
runs the exact fallback (its content cannot be read in a graph), which is exact for every mask, but a decoding step's
bool mask, taken as it is (docs/integration.md)."""

from __future__ import annotations

import inspect

import integration_families as fam
import pytest
import torch
from transformers import LlamaForCausalLM, StaticCache

import mit

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def mit_model(model_type: str, attn_implementation: str):
    layers = {"layer_types": ["sliding_attention", "full_attention"]} if model_type == "gemma3_text" else {}
    model = fam.model(model_type, num_hidden_layers=2, attn_implementation=attn_implementation, **layers)
    model = mit.apply_mit(model, mit.MiTConfig(modality_dim=fam.MODALITY_DIM, layers=[0, 1]))
    fam.randomise(model)
    return model


@pytest.mark.parametrize(("model_type", "attn_implementation"), [("llama", "sdpa"), ("gemma3_text", "eager")])
def test_compiled_forward_matches_eager(model_type, attn_implementation):
    torch._dynamo.reset()
    model = mit_model(model_type, attn_implementation)
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, modality_embedding=emb).logits
        frozen = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True)(ids, attention_mask=mask, modality_embedding=emb).logits
    assert not torch.allclose(eager, frozen, atol=1e-3)  # the infusion changes the model
    attention = {k: v for k, v in model.mit_dispatch().items() if "kv_infusion" in k}
    assert set(attention.values()) == {"fallback: 4-D mask under torch.compile"}, attention
    real = mask.bool()  # padded query rows see no key: unspecified (the kernel gives 0, eager attention a mean)
    torch.testing.assert_close(compiled[real], eager[real], rtol=1e-5, atol=1e-5)


def test_compiled_backward_matches_eager():
    torch._dynamo.reset()
    model = mit_model("llama", "sdpa")
    ids, mask = fam.padded_batch()
    emb = fam.embedding()

    def gradients(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(ids, attention_mask=mask, modality_embedding=emb).logits
        (logits * mask[..., None]).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.mit_named_parameters()}

    eager = gradients(model)
    compiled = gradients(torch.compile(model, fullgraph=True))
    assert eager.keys() == compiled.keys() and all(g.abs().sum() > 0 for g in eager.values())
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_decoding_step_runs_fused():
    """A decoding step compiled with a static cache (the compile-friendly one), a padded batch: its 4-D bool mask
    (one query row) is taken as it is, nothing read, so the step runs the fused kernel in the graph, with the logits
    of the eager step."""
    torch._dynamo.reset()
    model = mit_model("llama", "sdpa")
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    batch, length = ids.shape

    def prefilled_cache() -> StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=length + 4)
        with torch.no_grad():
            model(ids, attention_mask=mask, modality_embedding=emb, use_cache=True, **{CACHE_ARG: cache})
        return cache

    token = torch.full((batch, 1), 3)
    step_mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    step = {"attention_mask": step_mask, "modality_embedding": emb, "use_cache": True}
    step |= {"position_ids": step_mask.sum(-1, keepdim=True) - 1, "cache_position": torch.tensor([length])}
    with torch.no_grad():
        eager = model(token, **step, **{CACHE_ARG: prefilled_cache()}).logits
        cache = prefilled_cache()
        compiled = torch.compile(model, fullgraph=True)(token, **step, **{CACHE_ARG: cache}).logits
    attention = {k: v for k, v in model.mit_dispatch().items() if "kv_infusion" in k}
    assert set(attention.values()) == {"fused"}, attention
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
