"""Tiny random configs of every supported decoder family (transformers' own config classes; no weights needed)."""

from __future__ import annotations

import torch
import transformers

MODALITY_DIM = 16
VOCAB = 97
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6}

# model_type -> (config class, causal LM class, bare model class, overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralModel", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM", "Gemma2Model",
        GEMMA | {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    "gemma3_text": (
        "Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextModel",
        GEMMA | {"layer_types": ["sliding_attention", "full_attention"] * 2},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3Model", {}),
}  # fmt: skip

# How the attention of the infused layers (1, 2, 3 with 4 layers) runs on a padded prefill of SEQ_LEN tokens.
SEQ_LEN = 10
EXPECTED_ATTENTION = {
    "llama": "fused", "mistral": "fused", "qwen2": "fused", "qwen3": "fused", "phi3": "fused",
    "gemma2": "fallback: softcap",
}  # fmt: skip
# Gemma3 (window 6 < SEQ_LEN): sliding layers fall back, full-attention layers run fused
GEMMA3_ATTENTION = {1: "fused", 2: "fallback: mask is not causal + key padding", 3: "fused"}
EXPECTED_FFN = {"llama": "fused", "mistral": "fused", "qwen2": "fused", "qwen3": "fused"}  # others: scaled input


def config(model_type: str, **overrides):
    config_cls, _, _, extra = FAMILIES[model_type]
    return getattr(transformers, config_cls)(**(COMMON | extra | overrides))


def model(model_type: str, bare: bool = False, dtype=torch.float32, **overrides):
    _, causal_cls, bare_cls, _ = FAMILIES[model_type]
    torch.manual_seed(0)
    cls = getattr(transformers, bare_cls if bare else causal_cls)
    return cls(config(model_type, **overrides)).to(dtype).eval()


def padded_batch(seed: int = 0):
    """(3, SEQ_LEN) ids and mask; samples 1 and 2 are left-padded by 4 and 7."""
    ids = torch.randint(3, VOCAB, (3, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, SEQ_LEN, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def randomise(mit_model, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero infusion maps (as after training) so that MiT changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in mit_model.mit_named_parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def embedding(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, MODALITY_DIM, generator=torch.Generator().manual_seed(seed))
