"""apply_mit on small random Llama models: ablation switches, LlamaModel, attention implementations, masks, errors,
adapters, and the LLaMA-2-7B parameter count (built on the meta device)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import mit
from mit.integrations import key_padding_mask
from mit.integrations.attention import analyse_mask
from mit.integrations.scope import FFNBinding, bind_ffn

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
    assert hasattr(layers[3].self_attn, "mit_kv_infusion") == switches.get("infuse_kv", True)
    assert hasattr(layers[3].mlp, "mit_ffn_infusion") == switches.get("infuse_ffn", True)
    assert model.config._attn_implementation == (
        f"mit_{attn_implementation}" if switches.get("infuse_kv", True) else attn_implementation
    )
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"  # layer 0 is not in the default set for 4 layers
    has_lambda = any(n.endswith("head_logit") for n, _ in model.mit_named_parameters())
    assert has_lambda == (switches.get("infuse_kv", True) and switches.get("head_rescale", True))


def test_llama_model_without_lm_head():
    base = tiny_model(LlamaModel)
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[0, 2]))
    assert mit.is_mit_model(model) and type(model).__name__ == "MiTLlamaModel"
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
    assert "model.layers.3.self_attn.mit_kv_infusion.map.weight" in extra
    assert "model.layers.3.self_attn.mit_kv_infusion.head_logit" in extra
    assert "model.layers.3.mlp.mit_ffn_infusion.map.bias" in extra


def test_a_decoding_steps_bool_mask_is_its_key_padding_row_as_the_full_analysis_says():
    """One query row (a decoding step): the shortcut that reads nothing gives what the full analysis of the same mask
    gives (through its additive form), for padding, a sliding window's masked keys, a row that sees no key, and a
    mask broadcast over the batch."""
    gen = torch.Generator().manual_seed(0)
    for batch, mask_batch in ((3, 3), (3, 1)):
        for _ in range(20):
            row = torch.rand(mask_batch, 1, 1, 9, generator=gen) < 0.7
            row[0, 0, 0] = False if mask_batch == 1 else row[0, 0, 0]
            additive = torch.zeros(row.shape).masked_fill(~row, torch.finfo(torch.float32).min)
            got = key_padding_mask(row, batch, 1, 9)
            assert got.shape == (batch, 9) and got.dtype == torch.bool
            assert torch.equal(got, key_padding_mask(additive, batch, 1, 9))
    nothing = torch.zeros(2, 1, 1, 4, dtype=torch.bool)
    assert torch.equal(key_padding_mask(nothing, 2, 1, 4), torch.zeros(2, 4, dtype=torch.bool))


def test_key_padding_mask_reads_and_validates_transformers_masks():
    lq, lk = 3, 5
    pad = torch.tensor([[True] * 5, [False, False, False, True, True]])  # sample 1's query 0 sees no key
    causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    four_d = (pad[:, None, :] & causal)[:, None]
    assert torch.equal(key_padding_mask(four_d, 2, lq, lk), pad)
    additive = torch.zeros(2, 1, lq, lk).masked_fill(~four_d, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask(additive, 2, lq, lk), pad)
    unmasked_rows = four_d.clone()
    unmasked_rows[1, 0, 0] = True  # transformers may unmask rows that see nothing: still accepted
    assert not four_d[1, 0, 0].any()
    assert torch.equal(key_padding_mask(unmasked_rows, 2, lq, lk), pad)
    packed = four_d.clone()
    packed[0, 0, 2, 0] = False  # a block-diagonal (packed) mask is not causal+padding
    wrong_row = four_d.clone()
    wrong_row[1, 0, 1, 0] = True  # a row that does see keys must match exactly
    top_left = torch.ones(1, 1, lq, lk, dtype=torch.bool).tril()  # sdpa's is_causal over a longer static cache
    assert key_padding_mask(wrong_row, 2, lq, lk) is None  # None: not of that form (the exact fallback runs)
    assert key_padding_mask(packed, 2, lq, lk) is None
    assert key_padding_mask(top_left, 2, lq, lk) is None
    assert key_padding_mask(four_d[:, :, :, :4], 2, lq, lk) is None
    # two packed segments of 2 and 3 tokens (block-diagonal causal): the first segment's rows see no key of the
    # last row's segment, yet they see keys; they must not be skipped as "rows that see nothing"
    segment = torch.tensor([0, 0, 1, 1, 1])
    block = (segment[:, None] == segment[None, :]) & (torch.arange(5)[None, :] <= torch.arange(5)[:, None])
    assert key_padding_mask(block[None, None], 1, 5, 5) is None
    biased = additive.clone()
    biased[:, :, :, 4] -= 3.0  # an additive bias on an allowed key: not a padding mask
    assert key_padding_mask(biased, 2, lq, lk) is None


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("past", [0, 4])
def test_static_cache_prefill_masks_give_the_slots_in_use(additive, past):
    """A static cache's prefill mask spans all its slots: query i (cache position past + i) sees slots up to
    past + i and the padding allows, transformers unmasks rows that would see nothing, and no row sees the empty
    slots after past + Lq. Cut to the slots in use it is bottom-right causal + key padding: analyse_mask gives that
    (B, past + Lq) key padding mask; the same mask with a key seen beyond them, or a bias, is not of the form."""
    lq, slots = 3, 16
    used = past + lq
    pad = torch.ones(2, slots, dtype=torch.bool)
    pad[1, : past + 1] = False  # sample 1's first query row sees no key (unmasked by transformers below)
    allowed = pad[:, None, :] & (torch.arange(slots)[None, :] <= torch.arange(lq)[:, None] + past)
    allowed[~allowed.any(-1)] = True  # transformers' unmasking of rows that see nothing
    mask = allowed[:, None]
    if additive:
        mask = torch.zeros(2, 1, lq, slots).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert key_padding_mask(mask, 2, lq, slots) is None  # over all the slots: top-left, not of the form
    fused, kv_mask = analyse_mask(mask, 2, lq, slots)
    assert fused and torch.equal(kv_mask, pad[:, :used])
    seen_late = allowed.clone()
    seen_late[0, 1, used + 2] = True  # a row that sees an empty slot: not of the form
    assert analyse_mask(seen_late[:, None], 2, lq, slots) == (False, None)
    if additive:
        biased = mask.clone()
        biased[0, 0, 2, 0] = -1.0
        assert analyse_mask(biased, 2, lq, slots) == (False, None)


def test_bad_modality_embedding_and_bad_models():
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=r"modality_embedding must have shape \(batch, modality_dim\) = \(3, 16\)"):
        model(ids, attention_mask=mask, modality_embedding=torch.randn(3, 8))
    with pytest.raises(ValueError, match="already applied"):
        mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM))
    with pytest.raises(ValueError, match="expected a Hugging Face decoder model"):
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


def test_non_silu_swiglu_scales_the_down_projection_input_exactly():
    """A Llama MLP with GELU cannot use the fused SiLU gate: the infusion scales down_proj's input, which is the same
    equation, checked against an independent computation of the layer's MLP."""
    model = mit.apply_mit(tiny_model(hidden_act="gelu"), mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[3]))
    randomise(model)
    mlp = model.model.layers[3].mlp
    x, emb = torch.randn(3, 5, 64), torch.randn(3, MODALITY_DIM)
    f = mlp.mit_ffn_infusion.map(emb)
    expected = mlp.down_proj(torch.nn.functional.gelu(mlp.gate_proj(x)) * mlp.up_proj(x) * (1 + f[:, None, :]))
    previous = bind_ffn(FFNBinding(mlp.mit_ffn_infusion, emb))  # what the decoder layer does during its forward
    try:
        got = mlp(x)
    finally:
        bind_ffn(previous)
    torch.testing.assert_close(got, expected)
    assert mlp.mit_ffn_infusion.last_dispatch == "scaled down_proj input"
    assert torch.equal(mlp(x), mlp.down_proj(torch.nn.functional.gelu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_unsupported_model_type_is_named():
    from transformers import OlmoConfig, OlmoForCausalLM

    olmo = OlmoForCausalLM(OlmoConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"does not support model_type 'olmo'; supported: \['gemma2'"):
        mit.apply_mit(olmo, mit.MiTConfig(modality_dim=MODALITY_DIM))
    assert all(p.requires_grad for p in olmo.parameters())  # refused before anything changed


def test_set_attn_implementation_keeps_the_infusion_and_a_bypass_raises():
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    real = mask.bool()
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask, modality_embedding=emb).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "mit_eager"
        eager = model(ids, attention_mask=mask, modality_embedding=emb).logits
        assert set(model.mit_dispatch().values()) == {"fused"}  # eager's additive 4-D mask is read exactly too
        torch.testing.assert_close(eager[real], sdpa[real], rtol=1e-5, atol=1e-5)
        model.config._attn_implementation = "sdpa"  # behind MiT's back: the infusion would be skipped
        with pytest.raises(ValueError, match=r"attention implementation is 'sdpa', so MiT's key/value infusion"):
            model(ids, attention_mask=mask, modality_embedding=emb)
    with pytest.raises(ValueError, match="continuous batching"):
        mit.integrations.mit_implementation("paged|sdpa")


def test_packed_batches_are_refused():
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    ids = torch.randint(3, 97, (1, 8))
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two samples in one row
    with pytest.raises(ValueError, match="packed batch"):
        model(ids, position_ids=packed_positions, modality_embedding=torch.randn(1, MODALITY_DIM))


def test_adapter_round_trip_and_v1_adapters_still_load(tmp_path):
    from safetensors.torch import save_file

    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, modality_embedding=emb).logits
    mit.save_adapter(model, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / "mit_config.json").read_text())
    assert meta["format"] == "mit-adapter-v2" and meta["base_model"]["model_type"] == "llama"
    with torch.no_grad():
        again = mit.load_adapter(tiny_model(), tmp_path / "v2")(ids, attention_mask=mask, modality_embedding=emb)
    assert torch.equal(again.logits, expected)

    # release 0.1.0 wrote self_attn.infusion.*, self_attn.head_logit and mlp.ffn_infusion.*, format mit-adapter-v1
    v1_names = {".mit_kv_infusion.map.": ".infusion.", ".mit_kv_infusion.head_logit": ".head_logit",
                ".mit_ffn_infusion.map.": ".ffn_infusion."}  # fmt: skip
    tensors = {}
    for name, p in model.mit_named_parameters():
        for new, old in v1_names.items():
            name = name.replace(new, old)
        tensors[name] = p.detach().clone()
    assert "model.layers.3.self_attn.infusion.weight" in tensors and "model.layers.3.mlp.ffn_infusion.bias" in tensors
    (tmp_path / "v1").mkdir()
    save_file(tensors, str(tmp_path / "v1" / "adapter_model.safetensors"))
    meta["format"] = "mit-adapter-v1"
    del meta["base_model"]["model_type"]
    (tmp_path / "v1" / "mit_config.json").write_text(json.dumps(meta))
    with torch.no_grad():
        old = mit.load_adapter(tiny_model(), tmp_path / "v1")(ids, attention_mask=mask, modality_embedding=emb)
    assert torch.equal(old.logits, expected)
    meta["format"] = "mit-adapter-v9"
    (tmp_path / "v1" / "mit_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown adapter format 'mit-adapter-v9'"):
        mit.load_adapter(tiny_model(), tmp_path / "v1")


def test_infusion_maps_are_computed_once_per_generate_and_never_go_stale():
    """generate() passes the same embedding every step, so the maps run once per generate; outside generate nothing is
    cached, so in-place weight changes that bump no version counter (``p.data`` writes, fused optimisers) are seen."""
    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    modules = [m for m in model.modules() if isinstance(m, (mit.MiTKVInfusion, mit.MiTFFNInfusion))]
    calls = []
    handles = [m.map.register_forward_hook(lambda *args: calls.append(1)) for m in modules]
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    model.generate(ids, modality_embedding=emb, **kwargs)
    assert len(calls) == len(modules) == 6  # once per map for the whole generate, not once per step
    for handle in handles:
        handle.remove()

    def logits(m):
        with torch.no_grad():
            return m(ids, attention_mask=mask, modality_embedding=emb).logits

    before = logits(model)
    for _, p in model.mit_named_parameters():
        p.data.normal_(0, 0.2)  # no version-counter bump
    fresh = copy.deepcopy(model)
    assert torch.equal(logits(model), logits(fresh)) and not torch.equal(logits(model), before)
    assert torch.equal(
        model.generate(ids, modality_embedding=emb, **kwargs), fresh.generate(ids, modality_embedding=emb, **kwargs)
    )
    with torch.inference_mode():  # inference tensors carry no version counter: nothing may rely on one
        inferred = model(ids, attention_mask=mask, modality_embedding=torch.randn(3, MODALITY_DIM)).logits
        generated = model.generate(ids, modality_embedding=emb.clone(), **kwargs)
    assert torch.isfinite(inferred).all() and generated.shape == (3, 15)


def test_kernel_backends_are_resolved_once_per_generate_and_once_per_forward(monkeypatch):
    """Every decoding step of one generate() shares the backends resolved at its first step (one resolution per
    generate, for any number of new tokens); every forward outside generate resolves its own, and a fresh generate
    resolves again. The result is the same either way."""
    import mit.integrations.attention as attention_module

    model = mit.apply_mit(tiny_model(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    resolved: list[str] = []
    for name in ("attention_function", "ffn_gate_function"):
        original = getattr(attention_module, name)
        monkeypatch.setattr(
            attention_module, name, lambda *a, _f=original, _n=name, **k: resolved.append(_n) or _f(*a, **k)
        )
    kwargs = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        short = model.generate(ids, modality_embedding=emb, max_new_tokens=2, min_new_tokens=2, **kwargs)
        assert sorted(resolved) == ["attention_function", "ffn_gate_function"]
        resolved.clear()
        long = model.generate(ids, modality_embedding=emb, max_new_tokens=7, min_new_tokens=7, **kwargs)
        assert sorted(resolved) == ["attention_function", "ffn_gate_function"]  # not 7 times each
        resolved.clear()
        for _ in range(2):
            model(ids, attention_mask=mask, modality_embedding=emb)
        assert sorted(resolved) == ["attention_function"] * 2 + ["ffn_gate_function"] * 2
    assert torch.equal(long[:, : short.shape[1]], short)
    assert set(model.mit_dispatch().values()) == {"fused"}


def test_a_whole_pickled_model_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of an MiT model: a new process makes the MiT classes and the attention function again."""
    import subprocess
    import sys

    model = mit.apply_mit(tiny_model(attn_implementation="eager"), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(model)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, modality_embedding=emb).logits
    torch.save({"model": model, "ids": ids, "mask": mask, "emb": emb, "expected": expected}, tmp_path / "whole.pt")
    script = (
        "import torch\n"
        f"d = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)\n"
        "m = d['model']\n"
        "assert type(m).__name__ == 'MiTLlamaForCausalLM' and m.config._attn_implementation == 'mit_eager'\n"
        "with torch.no_grad():\n"
        "    out = m(d['ids'], attention_mask=d['mask'], modality_embedding=d['emb']).logits\n"
        "assert torch.equal(out, d['expected']), (out - d['expected']).abs().max()\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
