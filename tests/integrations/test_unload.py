"""Reversible MiT on every supported family: ``unload()`` gives the base model back exactly (classes, state dict,
hooks, attention implementation, requires_grad, attributes, outputs bit for bit), ``disable_adapter()`` computes the
base model inside its context, and ``mit.from_pretrained`` loads a trained model in one call."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from integration_families import FAMILIES, MODALITY_DIM, embedding, model, padded_batch, randomise
from model_equality import assert_same_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mit
from mit.lifecycle import NEURAL_CONFIG_NAME

FAMILY_NAMES = sorted(FAMILIES)


def logits(m, **kwargs):
    ids, mask = padded_batch()
    with torch.no_grad():
        return m(ids, attention_mask=mask, **kwargs).logits


def greedy(m, **kwargs):
    ids, mask = padded_batch()
    return m.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs
    )


def trained(base: torch.nn.Module, **config) -> torch.nn.Module:
    infused = mit.apply_mit(base, mit.MiTConfig(modality_dim=MODALITY_DIM, **config))
    randomise(infused)
    return infused


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_unload_gives_the_base_model_back_exactly(model_type):
    base = model(model_type)
    untouched = copy.deepcopy(base)
    infused = trained(base)
    assert not torch.equal(logits(infused, modality_embedding=embedding()), logits(untouched))
    infused.generate(*padded_batch()[:1], max_new_tokens=2, modality_embedding=embedding(), pad_token_id=0)
    assert not any(p.requires_grad for n, p in infused.named_parameters() if "mit_" not in n)

    unloaded = infused.unload()

    assert unloaded is base
    assert_same_model(unloaded, untouched)
    assert ALL_ATTENTION_FUNCTIONS.get(unloaded.config._attn_implementation) is ALL_ATTENTION_FUNCTIONS.get(
        untouched.config._attn_implementation
    )
    assert torch.equal(logits(unloaded), logits(untouched))
    assert torch.equal(greedy(unloaded), greedy(untouched))
    assert "modality_embedding" not in inspect.signature(type(unloaded).forward).parameters


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_unload_of_a_bare_model_and_reapply(model_type):
    base = model(model_type, bare=True)
    untouched = copy.deepcopy(base)
    infused = trained(base, infuse_kv=True, infuse_ffn=True)
    with torch.no_grad():
        adapted = infused(*padded_batch()[:1], modality_embedding=embedding()).last_hidden_state
    mit.unload(infused)
    assert_same_model(base, untouched)
    again = trained(base)  # the same seed: the same adapted model as before
    with torch.no_grad():
        assert torch.equal(again(*padded_batch()[:1], modality_embedding=embedding()).last_hidden_state, adapted)


def test_unload_keeps_the_users_hooks_and_restores_requires_grad():
    base = model("gemma2")  # unfused MLPs: MiT's own pre-hook on down_proj sits between the user's
    down_proj = base.model.layers[1].mlp.down_proj
    calls: list[str] = []
    down_proj.register_forward_pre_hook(lambda module, args: calls.append("before"))
    base.model.embed_tokens.weight.requires_grad_(False)
    untouched = copy.deepcopy(base)
    infused = trained(base, layers=[1, 2])
    later = down_proj.register_forward_pre_hook(lambda module, args: calls.append("after"))
    assert len(down_proj._forward_pre_hooks) == 3
    mit.unload(infused)
    assert list(down_proj._forward_pre_hooks) == [min(down_proj._forward_pre_hooks), later.id]
    later.remove()
    assert_same_model(base, untouched)
    assert not base.model.embed_tokens.weight.requires_grad and base.lm_head.weight.requires_grad is False
    calls.clear()
    logits(base)
    assert calls == ["before"]


def test_unload_after_deepcopy_pickle_and_load_adapter(tmp_path):
    base = model("qwen2")
    infused = trained(copy.deepcopy(base))
    expected = logits(infused, modality_embedding=embedding())
    for copied in (copy.deepcopy(infused), torch.load(_pickled(infused, tmp_path), weights_only=False)):
        assert torch.equal(logits(copied, modality_embedding=embedding()), expected)
        assert_same_model(mit.unload(copied), base)
    mit.save_adapter(infused, tmp_path / "adapter")
    loaded = mit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(logits(loaded, modality_embedding=embedding()), expected)
    assert_same_model(loaded.unload(), base)


def _pickled(m, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(m, path)
    return path


@pytest.mark.parametrize("implementation", ["eager", None])
def test_unload_restores_the_attention_implementation(implementation):
    base = model("mistral")
    base.config._attn_implementation = implementation  # as set (or left unset) before MiT
    untouched = copy.deepcopy(base)
    infused = trained(base)
    assert infused.config._attn_implementation == "mit_eager"
    assert_same_model(infused.unload(), untouched)
    assert base.config._attn_implementation == implementation


def test_unload_keeps_an_implementation_chosen_on_the_mit_model():
    base = model("llama")
    untouched = copy.deepcopy(base)
    infused = trained(base)
    infused.set_attn_implementation("eager")
    assert infused.config._attn_implementation == "mit_eager"
    infused.unload()
    assert base.config._attn_implementation == "eager"
    untouched.set_attn_implementation("eager")
    assert torch.equal(logits(base), logits(untouched))


def test_unload_without_a_record_restores_what_it_can():
    base = model("llama")
    untouched = copy.deepcopy(base)
    infused = trained(base)
    del infused.__dict__["_mit_undo"]  # as in a model pickled by an earlier release
    infused.unload()
    assert type(base) is type(untouched)
    assert base.config._attn_implementation == untouched.config._attn_implementation
    assert not any(p.requires_grad for p in base.parameters())
    assert list(base.state_dict()) == list(untouched.state_dict())
    assert torch.equal(logits(base), logits(untouched))


def test_unload_refusals():
    base = model("llama")
    with pytest.raises(ValueError, match=r"model: unload needs a model returned by mit\.apply_mit"):
        mit.unload(base)
    infused = trained(base)
    with infused.disable_adapter(), pytest.raises(ValueError, match="inside its disable_adapter"):
        infused.unload()
    infused.unload()
    with pytest.raises(ValueError, match="model: unload needs"):
        mit.unload(base)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_disable_adapter_computes_the_base_model(model_type):
    base = model(model_type)
    infused = trained(copy.deepcopy(base))
    adapted = logits(infused, modality_embedding=embedding())
    adapted_tokens = greedy(infused, modality_embedding=embedding())
    expected, expected_tokens = logits(base), greedy(base)
    assert not torch.equal(adapted, expected)
    with mit.disable_adapter(infused):
        assert torch.equal(logits(infused), expected)
        assert torch.equal(logits(infused, modality_embedding=embedding()), expected)  # ignored, as documented
        assert torch.equal(greedy(infused, modality_embedding=embedding()), expected_tokens)
        with infused.disable_adapter():  # nested
            assert torch.equal(logits(infused, modality_embedding=embedding()), expected)
        assert infused.mit_adapter_disabled()
    assert not infused.mit_adapter_disabled()
    assert "_mit_adapter_disabled" not in vars(infused)
    assert torch.equal(logits(infused, modality_embedding=embedding()), adapted)
    assert torch.equal(greedy(infused, modality_embedding=embedding()), adapted_tokens)


def test_disable_adapter_is_restored_after_an_exception_and_refuses_plain_models():
    infused = trained(model("llama"))
    with pytest.raises(RuntimeError, match="boom"), infused.disable_adapter():
        raise RuntimeError("boom")
    assert not infused.mit_adapter_disabled()
    with pytest.raises(ValueError, match="model: disable_adapter needs"):
        mit.disable_adapter(model("llama"))
    # inside the context the embedding is not validated either (ignored)
    with infused.disable_adapter():
        infused(padded_batch()[0], modality_embedding=torch.zeros(3, MODALITY_DIM + 1))
    with pytest.raises(ValueError, match="modality_embedding"):
        infused(padded_batch()[0], modality_embedding=torch.zeros(3, MODALITY_DIM + 1))


def test_from_pretrained_with_a_model_or_a_directory(tmp_path):
    base = model("qwen3")
    base.save_pretrained(tmp_path / "base")
    infused = trained(copy.deepcopy(base))
    expected = logits(infused, modality_embedding=embedding())
    mit.save_adapter(infused, tmp_path / "adapter")

    from_instance = mit.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    from_directory = mit.from_pretrained(str(tmp_path / "base"), tmp_path / "adapter", dtype=torch.float32)
    for loaded in (from_instance, from_directory):
        assert mit.is_mit_model(loaded)
        assert loaded.mit_config == infused.mit_config
        assert torch.equal(logits(loaded.eval(), modality_embedding=embedding()), expected)
    assert type(from_directory.unload()) is type(base)


def test_from_pretrained_refusals(tmp_path):
    base = model("llama")
    with pytest.raises(ValueError, match=r"adapter_dir .* is not a directory"):
        mit.from_pretrained(base, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"adapter_dir .* holds neither"):
        mit.from_pretrained(base, tmp_path / "empty")
    mit.save_adapter(trained(copy.deepcopy(base)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="model_kwargs"):
        mit.from_pretrained(base, tmp_path / "adapter", dtype=torch.float16)
    with pytest.raises(ValueError, match="tokenizer"):
        mit.from_pretrained(base, tmp_path / "adapter", tokenizer=object())
    with pytest.raises(ValueError, match="base_or_name"):
        mit.from_pretrained(42, tmp_path / "adapter")
    (tmp_path / "adapter" / NEURAL_CONFIG_NAME).write_text("{}")
    with pytest.raises(ValueError, match="holds both"):
        mit.from_pretrained(base, tmp_path / "adapter")
    assert not mit.is_mit_model(base)


def test_neural_config_name_matches_the_neural_adapter():
    from mit.neural.adapter import CONFIG_NAME

    assert CONFIG_NAME == NEURAL_CONFIG_NAME


def test_transformers_adapter_methods_work_on_mit_models(tmp_path):
    """transformers' PEFT-mixin names (load_adapter, disable_adapters, enable_adapters) on an MiT model do the MiT
    thing, instead of failing with "PEFT is not installed"."""
    base = model("llama")
    infused = trained(copy.deepcopy(base))
    adapted, expected = logits(infused, modality_embedding=embedding()), logits(base)
    mit.save_adapter(infused, tmp_path / "adapter")

    infused.disable_adapters()
    infused.disable_adapters()  # idempotent
    assert infused.mit_adapter_disabled()
    assert torch.equal(logits(infused, modality_embedding=embedding()), expected)
    infused.enable_adapters()
    infused.enable_adapters()  # idempotent
    assert not infused.mit_adapter_disabled()
    assert torch.equal(logits(infused, modality_embedding=embedding()), adapted)

    fresh = mit.apply_mit(copy.deepcopy(base), infused.mit_config)  # zero-initialised maps
    assert not torch.allclose(logits(fresh, modality_embedding=embedding()), adapted)
    fresh.load_adapter(str(tmp_path / "adapter"))  # into the active adapter, as mit.load_adapter does
    assert torch.equal(logits(fresh, modality_embedding=embedding()), adapted)
    fresh.load_adapter(tmp_path / "adapter", adapter_name="second")  # a new, inactive adapter
    assert fresh.adapter_names == ["default", "second"]
    with pytest.raises(ValueError, match="load_adapter: revision, token not supported for MiT adapters"):
        fresh.load_adapter(tmp_path / "adapter", revision="main", token="x")
    with pytest.raises(ValueError, match="peft_model_id: expected the directory of an MiT adapter"):
        fresh.load_adapter()

    infused.disable_adapters()  # left disabled, then unloaded: the base model carries no MiT state
    unloaded = infused.unload()
    assert not any(name.startswith("_mit") for name in vars(unloaded))
    assert torch.equal(logits(unloaded), expected)
