"""apply_mit on every supported decoder family (tiny random configs): identity at zero init, exactness without an
embedding, padding, KV cache (dynamic and static), gradient checkpointing, beam expansion, and which path ran."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from integration_families import (
    EXPECTED_ATTENTION,
    EXPECTED_FFN,
    FAMILIES,
    GEMMA3_ATTENTION,
    MODALITY_DIM,
    SEQ_LEN,
    embedding,
    model,
    padded_batch,
    randomise,
)
from transformers import DynamicCache, LlamaForCausalLM

import mit

FAMILY_NAMES = sorted(FAMILIES)
# transformers 5.24 renamed the cache argument (the old keyword is deprecated); use the one this release names
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def mit_copy(base, **config):
    return mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM, **config))


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def generate(m, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None} | kwargs
    return m.generate(ids, attention_mask=mask, **kwargs)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    """(model_type, frozen base model, MiT copy with random non-zero infusion)."""
    base = model(request.param)
    infused = mit_copy(base)
    randomise(infused)
    return request.param, base, infused


def test_zero_init_reproduces_the_base_model(family):
    model_type, base, _ = family
    zero = mit_copy(base)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = zero(ids, attention_mask=mask, modality_embedding=embedding()).logits
    assert (got - expected)[real].abs().max().item() <= 1e-5, model_type
    assert torch.equal(generate(zero, ids, mask, modality_embedding=embedding()), generate(base, ids, mask))


def test_without_embedding_the_model_is_exactly_the_base(family):
    _, base, infused = family
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(infused(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)
    assert torch.equal(generate(infused, ids, mask), generate(base, ids, mask))


def test_the_infusion_changes_the_model_and_every_parameter_gets_a_gradient(family):
    _, base, infused = family
    ids, mask = padded_batch()
    out = infused(ids, attention_mask=mask, modality_embedding=embedding(), labels=ids)
    with torch.no_grad():
        plain = base(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert (out.logits.detach() - plain)[mask.bool()].abs().max() > 1e-3
    out.loss.backward()
    for name, p in infused.mit_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        p.grad = None
    assert not any(p.requires_grad for n, p in infused.named_parameters() if "mit_" not in n)


def test_left_padded_sample_equals_the_sample_alone(family):
    model_type, _, infused = family
    ids, mask = padded_batch()
    emb = embedding()
    with torch.no_grad():
        batched = infused(ids, attention_mask=mask, modality_embedding=emb).logits
    greedy = generate(infused, ids, mask, modality_embedding=emb)
    beams = generate(infused, ids, mask, modality_embedding=emb, num_beams=3)
    for i in range(3):
        real = mask[i].bool()
        alone_ids = ids[i : i + 1, real]
        alone_mask = torch.ones_like(alone_ids)
        with torch.no_grad():
            alone = infused(alone_ids, modality_embedding=emb[i : i + 1]).logits[0]
        torch.testing.assert_close(batched[i, real], alone, rtol=1e-5, atol=1e-5, msg=f"{model_type} sample {i}")
        new = generate(infused, alone_ids, alone_mask, modality_embedding=emb[i : i + 1])[0, alone_ids.shape[1] :]
        assert torch.equal(new, greedy[i, SEQ_LEN:]), (model_type, i)
        new = generate(infused, alone_ids, alone_mask, modality_embedding=emb[i : i + 1], num_beams=3)
        assert torch.equal(new[0, alone_ids.shape[1] :], beams[i, SEQ_LEN:]), (model_type, i, "beam")


def test_cached_decoding_equals_the_full_forward(family):
    """Prefill 6 tokens into a cache, then feed the other 4 one at a time: every logit equals the full forward's."""
    model_type, _, infused = family
    ids, mask = padded_batch()
    emb = embedding()
    with torch.no_grad():
        full = infused(ids, attention_mask=mask, modality_embedding=emb).logits
        cache = DynamicCache(config=infused.config)
        steps = [infused(ids[:, :6], attention_mask=mask[:, :6], modality_embedding=emb, **{CACHE_ARG: cache})]
        for t in range(6, SEQ_LEN):
            step_ids, step_mask = ids[:, t : t + 1], mask[:, : t + 1]
            steps.append(infused(step_ids, attention_mask=step_mask, modality_embedding=emb, **{CACHE_ARG: cache}))
    cached = torch.cat([s.logits for s in steps], dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-5, msg=model_type)
    uncached = generate(infused, ids, mask, modality_embedding=emb, use_cache=False)
    assert torch.equal(generate(infused, ids, mask, modality_embedding=emb), uncached)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_static_cache_generation_equals_dynamic_cache_generation(family, padded):
    """The static cache's prefill attends over all its slots: unpadded, sdpa gets no mask (Lq < Lk: it relies on its
    top-left is_causal), padded a 4-D mask over every slot. Neither is "no mask" read as bottom-right causal over the
    slots: MiT's kernel gets the slots in use, where the attention is bottom-right causal again, and the empty slots
    no row sees are left out (families whose masks are sdpa's: every call fused)."""
    model_type, _, infused = family
    ids, mask = padded_batch()
    if not padded:
        ids, mask = ids[:1], mask[:1]
    emb = embedding(ids.shape[0])
    dynamic = generate(infused, ids, mask, modality_embedding=emb)
    with torch.no_grad():
        full = infused(dynamic, attention_mask=torch.ones_like(dynamic), modality_embedding=emb)
    before = dispatch_counts(infused)
    static = generate(infused, ids, mask, modality_embedding=emb, cache_implementation="static")
    assert torch.equal(static, dynamic), model_type
    if model_type in ("llama", "qwen2", "qwen3", "phi3", "mistral"):
        for name, counts in dispatch_counts(infused).items():
            assert set(counts - before[name]) == {"fused"}, (model_type, name, counts - before[name])
    if not padded:  # the greedy tokens are the argmax of the full forward over prompt + generated tokens
        assert torch.equal(full.logits[:, SEQ_LEN - 1 : -1].argmax(-1), dynamic[:, SEQ_LEN:])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    """With the base model frozen (only the infusion maps train, as in MiT tuning) and the embedding coming from a
    trainable encoder: checkpointed layers give the infusion maps and the embedding the gradients of the plain run,
    also under reentrant checkpointing (whose recomputation sees only the tensors passed positionally)."""
    model_type, _, infused = family
    ids, mask = padded_batch()
    m = copy.deepcopy(infused)
    m.requires_grad_(False)
    params = [p.requires_grad_() for _, p in m.mit_named_parameters()]
    m.train()

    def gradients():  # backward(), not autograd.grad(): reentrant checkpointing supports only the former
        emb = embedding().requires_grad_()
        for p in params:
            p.grad = None
        loss = m(ids, attention_mask=mask, modality_embedding=emb, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad for p in params] + [emb.grad]

    loss, plain = gradients()
    assert all(g is not None and g.abs().sum() > 0 for g in plain), model_type
    kwargs = {"use_reentrant": reentrant}
    # transformers 5.24 renamed it activation_checkpointing_enable (the old name is deprecated)
    if hasattr(m, "activation_checkpointing_enable"):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert any(getattr(layer, "gradient_checkpointing", False) for layer in m.model.layers)
    loss_ckpt, checkpointed = gradients()
    assert torch.equal(loss, loss_ckpt)
    for a, b in zip(plain, checkpointed):
        assert b is not None, model_type
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=model_type)


def test_beams_and_return_sequences_expand_the_embedding_per_sample(family):
    """Two samples with different embeddings: each sample's num_return_sequences beams equal its beams alone."""
    model_type, _, infused = family
    ids, mask = padded_batch()
    emb = embedding()
    kwargs = {"num_beams": 3, "num_return_sequences": 2}
    batched = generate(infused, ids, mask, modality_embedding=emb, **kwargs)
    assert batched.shape[0] == 6
    for i in range(3):
        alone = generate(infused, ids[i : i + 1], mask[i : i + 1], modality_embedding=emb[i : i + 1], **kwargs)
        assert torch.equal(batched[2 * i : 2 * i + 2], alone), (model_type, i)
    other = generate(infused, ids, mask, modality_embedding=emb.flip(0), **kwargs)
    assert not torch.equal(other, batched), "the embedding must matter"


def test_which_layers_ran_fused_is_observable(family):
    model_type, _, infused = family
    ids, mask = padded_batch()
    with torch.no_grad():
        infused(ids, attention_mask=mask, modality_embedding=embedding())
    dispatch = infused.mit_dispatch()
    for layer in (1, 2, 3):
        attention = dispatch[f"model.layers.{layer}.self_attn.mit_kv_infusion"]
        expected = GEMMA3_ATTENTION[layer] if model_type == "gemma3_text" else EXPECTED_ATTENTION[model_type]
        assert attention == expected, (model_type, layer)
        ffn = dispatch[f"model.layers.{layer}.mlp.mit_ffn_infusion"]
        assert ffn == EXPECTED_FFN.get(model_type, "scaled down_proj input"), (model_type, layer)
    if model_type in ("llama", "qwen2", "qwen3", "phi3", "mistral"):
        # a static-cache prefill without padding (sdpa's top-left is_causal over the slots) runs fused over the slots
        # in use, and so do its decode steps
        static = mit_copy(model(model_type))
        generate(static, ids[:1], mask[:1], modality_embedding=embedding(1), max_new_tokens=3,
                 cache_implementation="static")  # fmt: skip
        for name, counts in dispatch_counts(static).items():
            assert dict(counts) == {"fused": 3}, (model_type, name)


def dispatch_counts(model) -> dict:
    """Calls per path of every MiTKVInfusion of ``model``, a copy."""
    return {n: m.dispatch_counts.copy() for n, m in model.named_modules() if isinstance(m, mit.MiTKVInfusion)}


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_bare_model_forward(model_type):
    base = model(model_type, bare=True)
    infused = mit_copy(base, layers=[0, 2])
    randomise(infused)
    ids, mask = padded_batch()
    with torch.no_grad():
        plain = infused(ids, attention_mask=mask).last_hidden_state
        expected = base(ids, attention_mask=mask).last_hidden_state
        out = infused(ids, attention_mask=mask, modality_embedding=embedding()).last_hidden_state
    assert torch.equal(plain, expected)
    assert (out - expected)[mask.bool()].abs().max() > 1e-3
    assert type(infused).__name__ == f"MiT{type(base).__name__}"
