"""apply_mit on small random Llama models: ablation switches, LlamaModel, attention implementations, masks, errors,
adapters, and the LLaMA-2-7B parameter count (built on the meta device)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import mit
from mit.modeling import key_padding_mask

MODALITY_DIM = 16


def tiny_config(**overrides) -> LlamaConfig:
    values = {
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(cls=LlamaForCausalLM, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


def padded_batch():
    ids = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.mit_named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def test_default_layers_rule():
    assert mit.default_layers(32) == [12, 16, 20, 24, 28, 31]  # the paper's LLaMA-7B setting
    assert mit.default_layers(30) == [12, 16, 20, 24, 28, 29]
    assert mit.default_layers(4) == [1, 2, 3]
    assert mit.default_layers(1) == [0]


def test_config_json_round_trip_and_validation():
    config = mit.MiTConfig(modality_dim=768, layers=[3, 1, 3], head_rescale=False)
    assert config.layers == [1, 3]
    again = mit.MiTConfig.from_json(config.to_json())
    assert again == config and json.loads(config.to_json())["modality_dim"] == 768
    with pytest.raises(ValueError, match="modality_dim must be a positive int"):
        mit.MiTConfig(modality_dim=0)
    with pytest.raises(ValueError, match="at least one of infuse_kv and infuse_ffn"):
        mit.MiTConfig(modality_dim=8, infuse_kv=False, infuse_ffn=False)
    with pytest.raises(ValueError, match=r"unknown MiTConfig fields \['rank'\]"):
        mit.MiTConfig.from_dict({"modality_dim": 8, "rank": 4})
    with pytest.raises(ValueError, match=r"layers must be in \[0, 4\) for this model, got \[7\]"):
        mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=8, layers=[1, 7]))


@pytest.mark.parametrize(
    "switches",
    [{}, {"infuse_kv": False}, {"infuse_ffn": False}, {"head_rescale": False}],
    ids=["full", "no_kv", "no_ffn", "no_rescale"],
)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_ablations_identity_at_init_and_effect_after(switches, attn_implementation):
    base = tiny_model(attn_implementation=attn_implementation)
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM, **switches))
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    real = mask.bool()
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        assert torch.equal(model(ids, attention_mask=mask).logits, expected)
        assert (model(ids, attention_mask=mask, modality_embedding=emb).logits - expected)[real].abs().max() < 1e-5
        randomise(model)
        changed = model(ids, attention_mask=mask, modality_embedding=emb).logits
    assert (changed - expected)[real].abs().max() > 1e-3
    layers = model.model.layers
    assert isinstance(layers[3].self_attn, mit.MiTLlamaAttention) == switches.get("infuse_kv", True)
    assert isinstance(layers[3].mlp, mit.MiTLlamaMLP) == switches.get("infuse_ffn", True)
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"  # layer 0 is not in the default set for 4 layers
    has_lambda = any(n.endswith("head_logit") for n, _ in model.mit_named_parameters())
    assert has_lambda == (switches.get("infuse_kv", True) and switches.get("head_rescale", True))


def test_llama_model_without_lm_head():
    base = tiny_model(LlamaModel)
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[0, 2]))
    assert isinstance(model, mit.MiTLlamaModel)
    ids, mask = padded_batch()
    randomise(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, modality_embedding=torch.randn(3, MODALITY_DIM)).last_hidden_state
        plain = model(ids, attention_mask=mask).last_hidden_state
        expected = base(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(plain, expected) and not torch.allclose(out, expected)


def test_state_dict_keeps_base_keys():
    base = tiny_model()
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    base_keys = set(base.state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys
    extra = sorted(keys - base_keys)
    assert extra == sorted(n for n, _ in model.mit_named_parameters())
    assert "model.layers.3.self_attn.infusion.weight" in extra and "model.layers.3.mlp.ffn_infusion.bias" in extra


def test_key_padding_mask_reads_and_validates_transformers_masks():
    lq, lk = 3, 5
    pad = torch.tensor([[True] * 5, [False, False, False, True, True]])  # sample 1's query 0 sees no key
    causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    four_d = (pad[:, None, :] & causal)[:, None]
    assert torch.equal(key_padding_mask(four_d, 2, lq, lk), pad)
    additive = torch.zeros(2, 1, lq, lk).masked_fill(~four_d, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask(additive, 2, lq, lk), pad)
    assert torch.equal(key_padding_mask(pad.long(), 2, lq, lk), pad)
    assert key_padding_mask(None, 2, lq, lk) is None
    unmasked_rows = four_d.clone()
    unmasked_rows[1, 0, 0] = True  # transformers may unmask rows that see nothing: still accepted
    assert not four_d[1, 0, 0].any()
    assert torch.equal(key_padding_mask(unmasked_rows, 2, lq, lk), pad)
    packed = four_d.clone()
    packed[0, 0, 2, 0] = False  # a block-diagonal (packed) mask is not causal+padding
    wrong_row = four_d.clone()
    wrong_row[1, 0, 1, 0] = True  # a row that does see keys must match exactly
    with pytest.raises(ValueError, match="not of that form"):
        key_padding_mask(wrong_row, 2, lq, lk)
    with pytest.raises(ValueError, match="not of that form"):
        key_padding_mask(packed, 2, lq, lk)
    with pytest.raises(ValueError, match=r"expected a \(B, 1, 3, 5\) attention mask"):
        key_padding_mask(four_d[:, :, :, :4], 2, lq, lk)


def test_bad_modality_embedding_and_bad_models():
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=r"modality_embedding must have shape \(batch, modality_dim\) = \(3, 16\)"):
        model(ids, attention_mask=mask, modality_embedding=torch.randn(3, 8))
    with pytest.raises(ValueError, match="already applied"):
        mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM))
    with pytest.raises(ValueError, match=r"needs hidden_act 'silu', got 'gelu'"):
        mit.apply_mit(tiny_model(hidden_act="gelu"), mit.MiTConfig(modality_dim=MODALITY_DIM))
    with pytest.raises(ValueError, match="supports LlamaForCausalLM and LlamaModel"):
        mit.apply_mit(torch.nn.Linear(2, 2), mit.MiTConfig(modality_dim=MODALITY_DIM))
    with pytest.raises(ValueError, match=r"must be a mit\.MiTConfig"):
        mit.apply_mit(tiny_model(), {"modality_dim": 16})


def test_adapter_load_into_other_shape_fails_clearly(tmp_path):
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    mit.save_adapter(model, tmp_path)
    other = tiny_model(intermediate_size=96)
    with pytest.raises(ValueError, match=r"another shape .*intermediate_size: adapter 80 vs model 96"):
        mit.load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match=r"missing mit_config\.json"):
        mit.load_adapter(tiny_model(), tmp_path / "nowhere")


def test_gradient_reaches_every_mit_parameter():
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    out = model(ids, attention_mask=mask, modality_embedding=torch.randn(3, MODALITY_DIM), labels=ids)
    out.loss.backward()
    for name, p in model.mit_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_llama2_7b_trainable_parameters_on_meta():
    """LLaMA-2-7B (32 layers, hidden 4096, d_ff 11008, 32 heads) with the paper's layers and modality_dim 768, built
    on the meta device: no memory, exact counts."""
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    mit.apply_mit(model, mit.MiTConfig(modality_dim=768))
    trainable, total = mit.count_parameters(model)
    per_layer = (768 * 4 * 32 * 128 + 4 * 32 * 128 + 32) + (768 * 11008 + 11008)
    assert trainable == 6 * per_layer == 126_386_880
    assert total == 6_738_415_616 + trainable  # LLaMA-2-7B's 6.74 B
    assert round(100 * trainable / total, 2) == 1.84


def test_left_padded_sample_equals_sample_alone_without_explicit_positions():
    """MiT's post-rotary k_add breaks rotary's shift invariance; the MiT forward derives positions from the padding
    mask (as generate() does), so a left-padded sample computes what it computes alone."""
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, modality_embedding=emb).logits
        for i in range(3):
            real = mask[i].bool()
            alone = model(ids[i : i + 1, real], modality_embedding=emb[i : i + 1]).logits[0]
            torch.testing.assert_close(batched[i, real], alone, rtol=1e-5, atol=1e-5)
