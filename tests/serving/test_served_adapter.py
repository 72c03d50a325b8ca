"""The serving path's per-token infusion (mit.serving; no vLLM needed) against the contract and the HF integration.

A flat batch of three requests' tokens (one without an embedding) and padding: each infused token's keys / values /
MLP input equal what mit_kernels.reference computes for its own request, and every other token is untouched, bit for
bit. The adapter is the one mit.save_adapter wrote from a tiny Llama; loading it for another family or shape fails
naming the file.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

import mit
from mit.serving.served_adapter import BatchVectors, ServedAdapter, StepInfusion
from mit_kernels.reference import infuse, infusion_gate

MODALITY_DIM = 12
SHAPE = {
    "vocab_size": 97, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with non-zero MiT maps (random, as after training), saved as an adapter."""
    torch.manual_seed(0)
    model = mit.apply_mit(LlamaForCausalLM(LlamaConfig(**SHAPE)).eval(), mit.MiTConfig(modality_dim=MODALITY_DIM))
    with torch.no_grad():
        for _, p in model.mit_named_parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    directory = tmp_path_factory.mktemp("adapter")
    mit.save_adapter(model, directory)
    return model, directory


def layer_modules(model, index):
    layer = model.model.layers[index]
    return layer.self_attn.mit_kv_infusion, layer.mlp.mit_ffn_infusion


def test_loaded_adapter_gives_the_models_vectors(saved):
    model, directory = saved
    adapter = ServedAdapter.load(directory, LlamaConfig(**SHAPE))
    assert sorted(adapter.layers) == mit.default_layers(SHAPE["num_hidden_layers"])
    assert adapter.modality_dim == MODALITY_DIM
    embedding = torch.randn(MODALITY_DIM)
    vectors = adapter.request_vectors(embedding)
    for index, (kv, ffn) in vectors.items():
        kv_module, ffn_module = layer_modules(model, index)
        expected = kv_module.vectors(embedding[None], torch.float32)
        for got, want in zip(kv.unbind(0), expected):
            torch.testing.assert_close(got, want[0], rtol=0, atol=0)
        torch.testing.assert_close(ffn, ffn_module.multiplier(embedding[None], torch.float32)[0], rtol=0, atol=0)
        torch.testing.assert_close(adapter.layers[index].kv.head_logit, kv_module.head_logit, rtol=0, atol=0)


@pytest.mark.parametrize("frozen_request", [True, False])
def test_flat_batch_infuses_each_token_with_its_own_request(saved, frozen_request):
    model, directory = saved
    adapter = ServedAdapter.load(directory, LlamaConfig(**SHAPE))
    heads, dim, d_ff = SHAPE["num_key_value_heads"], SHAPE["hidden_size"] // SHAPE["num_attention_heads"], 80
    embeddings = [torch.randn(MODALITY_DIM), None if frozen_request else torch.randn(MODALITY_DIM),
                  torch.randn(MODALITY_DIM)]  # fmt: skip
    lengths = [5, 3, 1]  # a prefill chunk, another request's, a decoding step
    padding = 2 if frozen_request else 0  # (then: tokens past the last request)
    infused = [e for e in embeddings if e is not None]
    compact, row = [], 0
    for e in embeddings:
        compact.append(-1 if e is None else row)
        row += e is not None
    rows = torch.tensor([r for r, n in zip(compact, lengths) for _ in range(n)] + [-1] * padding)
    step = StepInfusion(adapter, rows, BatchVectors(adapter, [adapter.request_vectors(e) for e in infused]))
    assert (step.tokens is None) == (not frozen_request)  # all tokens infused: computed whole, no scatter
    tokens = rows.numel()
    k, v = torch.randn(tokens, heads * dim), torch.randn(tokens, heads * dim)
    x = torch.randn(tokens, d_ff)
    for index in adapter.layers:
        k_new, v_new = step.infuse_kv(index, k, v)
        x_new = step.scale_ffn(index, x)
        kv_module, ffn_module = layer_modules(model, index)
        start = 0
        for embedding, length in zip(embeddings, lengths):
            span = slice(start, start + length)
            start += length
            if embedding is None:
                assert torch.equal(k_new[span], k[span]) and torch.equal(v_new[span], v[span])
                assert torch.equal(x_new[span], x[span])
                continue
            k_mul, k_add, v_mul, v_add = kv_module.vectors(embedding[None], torch.float32)
            kt = k[span].view(length, heads, dim).transpose(0, 1)[None]  # (1, Hkv, L, D): one sample
            vt = v[span].view(length, heads, dim).transpose(0, 1)[None]
            gate = infusion_gate(vt, v_add, kv_module.head_logit)
            want_k = infuse(kt, k_mul, k_add, gate)[0].transpose(0, 1).reshape(length, -1)
            want_v = infuse(vt, v_mul, v_add, gate)[0].transpose(0, 1).reshape(length, -1)
            torch.testing.assert_close(k_new[span], want_k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v_new[span], want_v, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(k_new[span], k[span])  # the maps are not zero: the test can fail
            f = ffn_module.multiplier(embedding[None], torch.float32)
            torch.testing.assert_close(x_new[span], x[span] * (1 + f), rtol=1e-6, atol=1e-6)
        rest = slice(sum(lengths), None)
        assert (
            torch.equal(k_new[rest], k[rest])
            and torch.equal(v_new[rest], v[rest])
            and torch.equal(x_new[rest], x[rest])
        )


def test_adapter_for_another_family_or_shape_is_refused(saved):
    _, directory = saved
    qwen = Qwen2Config(**SHAPE)
    with pytest.raises(ValueError, match=r"mit_config\.json.*model_type: adapter llama vs model qwen2"):
        ServedAdapter.load(directory, qwen)
    with pytest.raises(ValueError, match=r"mit_config\.json.*hidden_size: adapter 64 vs model 128"):
        ServedAdapter.load(directory, LlamaConfig(**{**SHAPE, "hidden_size": 128}))
    with pytest.raises(ValueError, match="no MiT adapter at"):
        ServedAdapter.load(directory / "missing", LlamaConfig(**SHAPE))
