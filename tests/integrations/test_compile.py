"""torch.compile(fullgraph=True) of an MiT model with a padded batch and an embedding: one graph, the same logits
(on the real tokens: padded query rows see no key and are unspecified) and gradients as eager. Compiled, a 4-D mask
runs the exact fallback (its content cannot be read in a graph), which is exact for every mask (docs/integration.md)."""

from __future__ import annotations

import integration_families as fam
import pytest
import torch

import mit


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
