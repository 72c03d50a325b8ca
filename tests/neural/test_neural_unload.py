"""Reversible neural tuning on every supported family: ``unload()`` gives the base model back exactly (classes, state
dict, hooks, config, requires_grad, attributes, outputs bit for bit), also when new tokens grew the vocabulary;
``disable_adapter()`` computes the base model inside its context; ``mit.from_pretrained`` loads a neural adapter."""

from __future__ import annotations

import copy

import integration_families as fam
import pytest
import torch
from model_equality import assert_same_model
from transformers import AutoModelForCausalLM

import mit
from mit.neural import NeuralTuningConfig, apply_neural_tuning

FAMILY_NAMES = sorted(fam.FAMILIES)
IMAGE_DIM, PATCHES = 8, 3


def config(**overrides) -> NeuralTuningConfig:
    return NeuralTuningConfig(
        **({"rank": 8, "start_layer": 1, "image_dim": IMAGE_DIM, "new_tokens": ["<A>", "<B>"]} | overrides)
    )


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, PATCHES, IMAGE_DIM, generator=torch.Generator().manual_seed(2))


def logits(m, **kwargs) -> torch.Tensor:
    ids, mask = fam.padded_batch()
    with torch.no_grad():
        return m(ids, attention_mask=mask, **kwargs).logits


def greedy(m, **kwargs) -> torch.Tensor:
    ids, mask = fam.padded_batch()
    return m.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs
    )


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
@pytest.mark.parametrize("new_token_ids", [[fam.VOCAB, fam.VOCAB + 1], [50, 51]], ids=["grown", "in-vocab"])
def test_unload_gives_the_base_model_back_exactly(model_type, new_token_ids):
    base = fam.model(model_type)
    untouched = copy.deepcopy(base)
    tuned = apply_neural_tuning(base, config(), new_token_ids=new_token_ids)
    assert logits(tuned).shape[-1] == max(fam.VOCAB, new_token_ids[-1] + 1)
    assert not torch.equal(logits(tuned)[..., : fam.VOCAB], logits(untouched))
    tuned(fam.padded_batch()[0], image_features=images())

    unloaded = tuned.unload()

    assert unloaded is base
    assert_same_model(unloaded, untouched, same_modes=False)
    assert torch.equal(logits(unloaded), logits(untouched))
    assert torch.equal(greedy(unloaded), greedy(untouched))


def test_unload_after_deepcopy_keeps_other_hooks_and_restores_requires_grad():
    base = fam.model("phi3")  # fused qkv_proj
    qkv = base.model.layers[2].self_attn.qkv_proj
    qkv.register_forward_hook(lambda module, args, output: None)
    base.model.norm.weight.requires_grad_(False)
    untouched = copy.deepcopy(base)
    tuned = apply_neural_tuning(copy.deepcopy(base), config(targets="qkv"), new_token_ids=[fam.VOCAB, fam.VOCAB + 1])
    tuned.nt_task_head = torch.nn.Linear(4, 2)  # a task head attached by later code, as nt_*
    copied = copy.deepcopy(tuned)
    assert len(copied.model.layers[2].self_attn.qkv_proj._forward_hooks) == 2
    assert torch.equal(logits(copied), logits(tuned))
    assert_same_model(mit.unload(copied), untouched, same_modes=False)
    assert not copied.model.norm.weight.requires_grad and copied.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_disable_adapter_computes_the_base_model(model_type):
    base = fam.model(model_type)
    tuned = apply_neural_tuning(copy.deepcopy(base), config(), new_token_ids=[50, 51])
    adapted = logits(tuned, image_features=images())
    adapted_tokens = greedy(tuned)
    expected, expected_tokens = logits(base), greedy(base)
    with mit.disable_adapter(tuned):
        assert torch.equal(logits(tuned), expected)
        assert torch.equal(logits(tuned, image_features=images()), expected)  # ignored, as documented
        assert torch.equal(greedy(tuned, image_features=images()), expected_tokens)
        with tuned.disable_adapter():
            assert torch.equal(logits(tuned), expected)
        assert tuned.neural_adapter_disabled()
    assert not tuned.neural_adapter_disabled()
    assert torch.equal(logits(tuned, image_features=images()), adapted)
    assert torch.equal(greedy(tuned), adapted_tokens)
    assert all("disabled" not in vars(m) for m in tuned.modules())


def test_disable_adapter_with_a_grown_vocabulary_and_refusals():
    base = fam.model("llama")
    tuned = apply_neural_tuning(copy.deepcopy(base), config(), new_token_ids=[fam.VOCAB, fam.VOCAB + 1])
    with pytest.raises(RuntimeError, match="boom"), tuned.disable_adapter():
        assert torch.equal(logits(tuned)[..., : fam.VOCAB], logits(base))
        with pytest.raises(ValueError, match="inside its disable_adapter"):
            tuned.unload()
        raise RuntimeError("boom")
    assert not tuned.neural_adapter_disabled()
    with pytest.raises(ValueError, match="model: disable_adapter needs"):
        mit.disable_adapter(base)
    with pytest.raises(ValueError, match="model: unload needs"):
        mit.unload(base)
    with pytest.raises(ValueError, match="model: unload needs"):
        mit.neural.unload_neural(mit.apply_mit(fam.model("llama"), mit.MiTConfig(modality_dim=fam.MODALITY_DIM)))


def test_from_pretrained_loads_a_neural_adapter(tmp_path):
    base = fam.model("gemma3_text")
    base.save_pretrained(tmp_path / "base")
    tuned = apply_neural_tuning(copy.deepcopy(base), config(), new_token_ids=[fam.VOCAB, fam.VOCAB + 1])
    expected = logits(tuned, image_features=images())
    mit.save_neural_adapter(tuned, tmp_path / "adapter")
    from_directory = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for source, reference in ((copy.deepcopy(base), base), (tmp_path / "base", from_directory)):
        loaded = mit.from_pretrained(source, tmp_path / "adapter")
        assert mit.neural.is_neural_model(loaded) and loaded.nt_new_token_ids == [fam.VOCAB, fam.VOCAB + 1]
        assert torch.equal(logits(loaded, image_features=images()), expected)
        assert_same_model(loaded.unload(), reference, same_modes=False)
