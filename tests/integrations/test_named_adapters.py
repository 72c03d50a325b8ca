"""Several named MiT adapters on one base model, on every supported family: each adapter keeps its own config
(layers, modality dim, which maps), ``set_adapter`` switches which one the model computes with, the outputs after a
switch equal a base model holding only that adapter, parameters keep their identity across switches, and
``unload`` gives the base model back exactly after any sequence of switches."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_families import FAMILIES, MODALITY_DIM, model, padded_batch
from model_equality import assert_same_model

import mit

FAMILY_NAMES = sorted(FAMILIES)
OTHER_DIM = 24  # adapter "b" has its own modality dim


def perturb(plan_parameters, seed: int) -> None:
    """Non-zero maps, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in plan_parameters:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)


def two_adapters(model_type: str):
    """A base model with adapter "a" (all layers' default, dim MODALITY_DIM, active) and "b" (layers 0 and 2, FFN
    only on none: both maps, dim OTHER_DIM, inactive), both with non-zero maps; and the untouched base."""
    base = model(model_type)
    original = copy.deepcopy(base)
    tuned = mit.apply_mit(base, mit.MiTConfig(modality_dim=MODALITY_DIM), adapter_name="a")
    perturb(tuned.mit_named_parameters(), seed=1)
    tuned.add_adapter(mit.MiTConfig(modality_dim=OTHER_DIM, layers=[0, 2], infuse_ffn=False), "b")
    perturb(mit.integrations.model.mit_adapters(tuned)["b"].named_parameters(), seed=2)
    return tuned, original


def outputs(model_, dim: int, seed: int = 3) -> torch.Tensor:
    ids, mask = padded_batch()
    emb = torch.randn(ids.shape[0], dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model_(ids, attention_mask=mask, modality_embedding=emb).logits


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_set_adapter_computes_exactly_the_base_with_only_that_adapter(model_type, tmp_path):
    tuned, original = two_adapters(model_type)
    assert tuned.active_adapter == "a" and tuned.adapter_names == ["a", "b"] and tuned.active_adapters() == ["a"]
    a_out = outputs(tuned, MODALITY_DIM)
    a_params = {n: p for n, p in tuned.mit_named_parameters()}
    mit.save_adapter(tuned, tmp_path / "b", adapter_name="b")  # the inactive one, named as it will be when active

    tuned.set_adapter("b")
    assert tuned.active_adapter == "b" and tuned.mit_config.modality_dim == OTHER_DIM
    keys = [k for k in tuned.state_dict() if "mit_" in k]
    assert keys and all(".layers.0." in k or ".layers.2." in k for k in keys), keys  # only b's, attached
    assert not any("mit_ffn_infusion" in k for k in keys)
    b_out = outputs(tuned, OTHER_DIM)
    only_b = mit.load_adapter(copy.deepcopy(original), tmp_path / "b")
    assert torch.equal(b_out, outputs(only_b, OTHER_DIM))
    with pytest.raises(ValueError, match=rf"\(3, {OTHER_DIM}\)"):
        outputs(tuned, MODALITY_DIM)  # the active adapter's own modality dim

    mit.set_adapter(tuned, "a")
    assert torch.equal(outputs(tuned, MODALITY_DIM), a_out)
    assert all(p is a_params[n] for n, p in tuned.mit_named_parameters())  # same objects: an optimizer keeps them
    assert_same_model(mit.unload(tuned), original)


def test_switching_inside_training_keeps_each_adapters_own_weights(tmp_path):
    tuned, original = two_adapters("llama")
    optimizer = torch.optim.SGD([p for _, p in tuned.mit_named_parameters()], lr=0.5)
    ids, mask = padded_batch()
    emb = torch.randn(3, MODALITY_DIM, generator=torch.Generator().manual_seed(5))
    tuned(ids, attention_mask=mask, modality_embedding=emb).logits.square().mean().backward()
    optimizer.step()
    trained_a = {n: p.detach().clone() for n, p in tuned.mit_named_parameters()}
    tuned.set_adapter("b")
    tuned.set_adapter("a")
    assert all(torch.equal(p, trained_a[n]) for n, p in tuned.mit_named_parameters())
    mit.save_adapter(tuned, tmp_path / "a")
    again = mit.load_adapter(copy.deepcopy(original), tmp_path / "a")
    assert torch.equal(outputs(again, MODALITY_DIM), outputs(tuned, MODALITY_DIM))


def test_load_adapter_under_a_new_name_adds_it_inactive_and_leaves_the_model_on_errors(tmp_path):
    tuned, _ = two_adapters("qwen3")
    tuned.set_adapter("b")
    mit.save_adapter(tuned, tmp_path / "b")
    tuned.set_adapter("a")
    before = outputs(tuned, MODALITY_DIM)
    mit.load_adapter(tuned, tmp_path / "b", adapter_name="b2")
    assert tuned.adapter_names == ["a", "b", "b2"] and tuned.active_adapter == "a"
    assert torch.equal(outputs(tuned, MODALITY_DIM), before)
    tuned.set_adapter("b2")
    b2 = outputs(tuned, OTHER_DIM)
    tuned.set_adapter("b")
    assert torch.equal(outputs(tuned, OTHER_DIM), b2)
    with pytest.raises(ValueError, match="differs from the adapter's"):
        mit.load_adapter(tuned, tmp_path / "b", adapter_name="a")  # a's config is not b's
    assert tuned.adapter_names == ["a", "b", "b2"]


def test_adapter_name_errors_name_the_argument():
    tuned, _ = two_adapters("llama")
    with pytest.raises(ValueError, match="adapter_name 'zzz' is not an adapter of this model; its adapters"):
        tuned.set_adapter("zzz")
    with pytest.raises(ValueError, match="adapter_name 'b' is in use"):
        tuned.add_adapter(mit.MiTConfig(modality_dim=4), "b")
    for bad in ("", "x.y", 3):
        with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string without '\.'"):
            tuned.add_adapter(mit.MiTConfig(modality_dim=4), bad)
    with pytest.raises(ValueError, match="adapter_name 'a' is the active adapter"):
        tuned.delete_adapter("a")
    with pytest.raises(ValueError, match=r"config must be a mit\.MiTConfig"):
        tuned.add_adapter({"modality_dim": 4}, "c")
    tuned.delete_adapter("b")
    assert tuned.adapter_names == ["a"]
    with pytest.raises(ValueError, match=r"model: set_adapter needs a model returned by mit\.apply_mit"):
        mit.set_adapter(torch.nn.Linear(2, 2), "a")


def test_deepcopy_and_pickle_keep_every_adapter(tmp_path):
    tuned, original = two_adapters("mistral")
    tuned.set_adapter("b")
    b_out = outputs(tuned, OTHER_DIM)
    tuned.set_adapter("a")
    for clone in (copy.deepcopy(tuned), torch.load(_saved(tuned, tmp_path), weights_only=False)):
        assert clone.adapter_names == ["a", "b"] and clone.active_adapter == "a"
        clone.set_adapter("b")
        assert torch.equal(outputs(clone, OTHER_DIM), b_out)
        assert_same_model(mit.unload(clone), original)


def _saved(model_, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model_, path)  # a whole-model pickle of our own object, read back in this test only
    return path
