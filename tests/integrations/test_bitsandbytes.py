"""MiT on a base model quantized with bitsandbytes (4-bit NF4 and 8-bit), on CPU: bitsandbytes' CPU backend runs
both. apply_mit leaves the quantized base untouched and frozen, training moves only the MiT maps, generate takes the
embedding, and an adapter saved from one quantized model loads into another.

The tiny model's widths are multiples of 256: bitsandbytes' 4-bit CPU kernel packs the weight in blocks and refuses
other widths (``N must be divisible by block_n``, inside bitsandbytes, for a 64-wide model)."""

from __future__ import annotations

import pytest
import torch

import mit

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra; not installed here")

MODALITY_DIM = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    directory = tmp_path_factory.mktemp("bnb_base")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def quantized(directory, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()


def quantized_state(model) -> dict[str, torch.Tensor]:
    """The quantized weights (packed 4-bit / int8 tensors) of every bitsandbytes linear layer, copied."""
    return {name: module.weight.data.clone() for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}  # fmt: skip


@pytest.mark.parametrize("bits", [4, 8])
def test_mit_trains_and_generates_on_a_quantized_base(base_dir, tmp_path, bits):
    torch.manual_seed(1)
    ids = torch.randint(1, 250, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    embedding = torch.randn(2, MODALITY_DIM)
    plain = quantized(base_dir, bits).train()  # the same bitsandbytes code path as the MiT model below
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
    # train mode throughout (Llama has no dropout, so outputs are the eval ones): an eval-mode forward without
    # gradient would repack 4-bit weights for CPU inference, through which bitsandbytes computes no gradient (the
    # next test)
    model = mit.apply_mit(quantized(base_dir, bits), mit.MiTConfig(modality_dim=MODALITY_DIM)).train()
    linear = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, linear)  # still quantized
    before = quantized_state(model)
    assert before and all(not p.requires_grad for n, p in model.named_parameters() if "mit_" not in n)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, expected)  # no embedding: the base, bit for bit
        torch.testing.assert_close(model(ids, attention_mask=mask, modality_embedding=embedding).logits, expected)

    # training: only the MiT maps move, and the loss falls
    params = [p for _, p in model.mit_named_parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    target = torch.randint(0, 256, ids.shape)
    losses = []
    for _ in range(8):
        logits = model(ids, attention_mask=mask, modality_embedding=embedding).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    after = quantized_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)

    with torch.no_grad():
        adapted = model(ids, attention_mask=mask, modality_embedding=embedding).logits
        other = model(ids, attention_mask=mask, modality_embedding=torch.randn(2, MODALITY_DIM)).logits
    assert not torch.allclose(adapted, other)  # the embedding reaches the quantized model's outputs
    tokens = model.generate(ids, attention_mask=mask, modality_embedding=embedding, max_new_tokens=4,
                            do_sample=False, pad_token_id=0)  # fmt: skip
    assert tokens.shape == (2, 13)

    # an adapter saved from this model loads into another quantized base: same outputs
    mit.save_adapter(model, tmp_path / "adapter")
    loaded = mit.load_adapter(quantized(base_dir, bits).train(), tmp_path / "adapter")  # the same code path
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask, modality_embedding=embedding).logits, adapted)


def test_training_through_cpu_packed_4bit_layers_is_refused(base_dir):
    """bitsandbytes repacks a 4-bit weight for CPU inference at its first eval-mode forward without gradient (on CPUs
    with AVX512-BF16), after which no gradient flows back through it, in train mode too: MiT refuses to train then,
    naming the layer, instead of training its maps on a wrong gradient."""
    model = mit.apply_mit(quantized(base_dir, 4), mit.MiTConfig(modality_dim=MODALITY_DIM))
    ids, embedding = torch.randint(1, 250, (2, 5)), torch.randn(2, MODALITY_DIM)
    with torch.no_grad():
        model(ids, modality_embedding=embedding)  # eval mode, no gradient: bitsandbytes may repack here
    from mit.integrations.quantized import cpu_packed_4bit_layers

    packed = cpu_packed_4bit_layers(model)
    if not packed:
        pytest.skip("bitsandbytes did not repack the weights on this CPU (it does so only with AVX512-BF16)")
    model.train()
    with pytest.raises(ValueError, match=r"bitsandbytes 4-bit layers \(e\.g\. model\.layers\.0\."):
        model(ids, modality_embedding=embedding)
    with torch.no_grad():  # inference stays allowed
        model(ids, modality_embedding=embedding)
