"""copy_sharing_weights: new modules, the original's weight tensors."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mit
from mit.utils.shared_copy import copy_sharing_weights


def test_the_copy_has_new_modules_and_the_same_weight_tensors():
    config = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base_classes = [type(m) for m in base.modules()]
    base_implementation = base.config._attn_implementation
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        before = base(ids).logits

    model = mit.apply_mit(copy_sharing_weights(base), mit.MiTConfig(modality_dim=8))
    base_tensors = {name: t for name, t in (*base.named_parameters(), *base.named_buffers())}
    copy_tensors = {name: t for name, t in (*model.named_parameters(), *model.named_buffers()) if "mit_" not in name}
    assert base_tensors.keys() == copy_tensors.keys()
    assert all(copy_tensors[name] is tensor for name, tensor in base_tensors.items())
    # the copy's structure changed, the original's did not
    assert not any(a is b for a, b in zip(base.modules(), model.modules()))
    assert [type(m) for m in base.modules()] == base_classes and base.config._attn_implementation == base_implementation
    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)
        assert torch.equal(model(ids).logits, before)  # the copy computes the same with the same weights
        base.model.layers[0].mlp.up_proj.weight.mul_(2)  # one tensor: the change shows in both models
        assert torch.equal(model(ids).logits, base(ids).logits) and not torch.equal(base(ids).logits, before)
