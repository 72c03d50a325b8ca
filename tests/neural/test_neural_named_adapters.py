"""Named neural-tuning adapters: several adapters with their own configs on one base model, one attached at a time
(``add_adapter`` / ``set_adapter`` / ``delete_adapter``), each computing exactly what the base model with only that
adapter loaded computes; saving and loading by name; ``unload()`` after switches gives the base model back exactly."""

from __future__ import annotations

import copy
import pickle

import integration_families as fam
import pytest
import torch
from model_equality import assert_same_model

import mit
from mit.neural import (
    NeuralTuningConfig,
    apply_neural_tuning,
    load_neural_adapter,
    neural_adapters,
    save_neural_adapter,
)

FAMILY_NAMES = sorted(fam.FAMILIES)
V = fam.VOCAB
DIM_A, DIM_B, PATCHES = 8, 6, 3
CONFIG_A = NeuralTuningConfig(rank=8, start_layer=1, image_dim=DIM_A, new_tokens=["<A>", "<B>"])
CONFIG_B = NeuralTuningConfig(rank=4, start_layer=2, targets="qkv", image_dim=DIM_B, new_tokens=["<C>", "<D>", "<E>"])
IDS_A, IDS_B = [V, V + 1], [V, V + 1, V + 2]  # both grow the vocabulary, each to its own size


def images(dim: int) -> torch.Tensor:
    return torch.randn(3, PATCHES, dim, generator=torch.Generator().manual_seed(dim))


def logits(m, dim: int | None = None) -> torch.Tensor:
    ids, mask = fam.padded_batch()
    ids = ids.clone()
    if getattr(m, "nt_new_token_ids", None):  # the adapter's new tokens in the prompt
        ids[:, -2], ids[:, -1] = m.nt_new_token_ids[0], m.nt_new_token_ids[-1]
    with torch.no_grad():
        return m(ids, attention_mask=mask, image_features=None if dim is None else images(dim)).logits


def perturb(parameters, seed: int) -> None:
    """Training-like change of an adapter's parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def two_adapters(model_type: str, ids_b=IDS_B):
    """(untouched base, model with adapters "a" (active) and "b", each perturbed)."""
    base = fam.model(model_type)
    untouched = copy.deepcopy(base)
    tuned = apply_neural_tuning(base, copy.deepcopy(CONFIG_A), new_token_ids=IDS_A, adapter_name="a")
    tuned.add_adapter(copy.deepcopy(CONFIG_B), "b", new_token_ids=ids_b)
    perturb([p for _, p in tuned.neural_named_parameters()], 1)
    perturb([p for _, p in neural_adapters(tuned)["b"].named_parameters(tuned)], 2)
    return untouched, tuned


def nt_keys(model) -> set[str]:
    """The names of the model's neural-tuning parameters (a tied head's duplicate state-dict key aside)."""
    return {k for k, _ in model.named_parameters() if ".nt_" in k or k.startswith("nt_")}


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_each_adapter_computes_the_base_model_with_only_it_loaded(model_type, tmp_path):
    untouched, tuned = two_adapters(model_type)
    assert tuned.adapter_names == ["a", "b"] and tuned.active_adapter == "a" and tuned.active_adapters() == ["a"]
    params_a = [p for _, p in tuned.neural_named_parameters()]
    state_a = {k: v.clone() for k, v in tuned.state_dict().items()}
    keys_a, out_a = nt_keys(tuned), logits(tuned, DIM_A)
    named_b = dict(neural_adapters(tuned)["b"].named_parameters(tuned))
    names_b = set(named_b)
    assert not {id(p) for p in named_b.values()} & {id(p) for p in tuned.parameters()}  # b is off the module tree

    tuned.set_adapter("b")
    assert tuned.active_adapter == "b" and tuned.neural_config == CONFIG_B and tuned.nt_new_token_ids == IDS_B
    assert nt_keys(tuned) == names_b and keys_a != names_b
    assert not any("layers.1.self_attn.nt_" in k for k in tuned.state_dict())  # a's only layer
    assert {id(p) for p in named_b.values()} <= {id(p) for p in tuned.parameters()}
    assert not {id(p) for p in params_a} & {id(p) for p in tuned.parameters()}
    assert tuned.get_input_embeddings().num_embeddings == V + 3 and tuned.config.vocab_size == V + 3
    out_b = logits(tuned, DIM_B)
    save_neural_adapter(tuned, tmp_path / "b")
    fresh = load_neural_adapter(copy.deepcopy(untouched), tmp_path / "b")
    assert torch.equal(logits(fresh, DIM_B), out_b)
    fresh_state, state_b = fresh.state_dict(), tuned.state_dict()
    assert list(fresh_state) == list(state_b)
    for key, value in state_b.items():  # the rows transformers' resize initialises are the only difference
        assert (
            torch.equal(value[:V], fresh_state[key][:V])
            if value.shape[:1] == (V + 3,)
            else torch.equal(value, fresh_state[key])
        ), key
    with pytest.raises(ValueError, match="image_dim=6"):
        logits(tuned, DIM_A)  # b's projection takes its own image dim

    tuned.set_adapter("a")
    assert [p for _, p in tuned.neural_named_parameters()] == params_a
    assert all(p is q for (_, p), q in zip(tuned.neural_named_parameters(), params_a))
    assert torch.equal(logits(tuned, DIM_A), out_a)
    state = tuned.state_dict()
    assert list(state) == list(state_a) and all(torch.equal(state[k], v) for k, v in state_a.items())
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == sorted(keys_a, key=list(state).index)


def test_an_adapter_within_the_vocabulary_and_one_that_grows_it(tmp_path):
    untouched, tuned = two_adapters("llama", ids_b=[50, 51, 52])
    tuned.set_adapter("b")
    assert tuned.get_input_embeddings().num_embeddings == V and tuned.lm_head.weight.shape[0] == V
    save_neural_adapter(tuned, tmp_path / "b")
    fresh = load_neural_adapter(copy.deepcopy(untouched), tmp_path / "b", adapter_name="mine")
    assert fresh.adapter_names == ["mine"]
    assert torch.equal(logits(fresh, DIM_B), logits(tuned, DIM_B))
    state, fresh_state = tuned.state_dict(), fresh.state_dict()
    assert list(state) == list(fresh_state) and all(torch.equal(v, fresh_state[k]) for k, v in state.items())
    tuned.set_adapter("a")
    assert tuned.get_input_embeddings().num_embeddings == V + 2 and tuned.lm_head.weight.shape[0] == V + 2


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3"])  # untied, tied, fused qkv_proj
def test_unload_after_switches_gives_the_base_model_back(model_type):
    untouched, tuned = two_adapters(model_type)
    tuned.model.layers[2].self_attn.o_proj.register_forward_hook(lambda module, args, output: None)
    untouched.model.layers[2].self_attn.o_proj.register_forward_hook(lambda module, args, output: None)
    for name in ("b", "a", "b"):
        tuned.set_adapter(name)
    tuned.add_adapter(NeuralTuningConfig(rank=2, start_layer=3), "c")
    unloaded = mit.unload(tuned)
    assert_same_model(unloaded, untouched, same_modes=False)
    assert not any(k.startswith("_nt_") for k in vars(unloaded))
    assert torch.equal(logits(unloaded), logits(untouched))


def test_deepcopy_and_pickle_keep_the_adapters():
    untouched, tuned = two_adapters("qwen3")
    tuned.set_adapter("b")
    out_b = logits(tuned, DIM_B)
    tuned.set_adapter("a")
    out_a = logits(tuned, DIM_A)
    for copied in (copy.deepcopy(tuned), pickle.loads(pickle.dumps(tuned))):
        assert copied.adapter_names == ["a", "b"] and copied.active_adapter == "a"
        copied.set_adapter("b")
        assert torch.equal(logits(copied, DIM_B), out_b)
        assert torch.equal(logits(tuned, DIM_A), out_a)  # the original is untouched
        copied.set_adapter("a")
        assert torch.equal(logits(copied, DIM_A), out_a)
        copied.set_adapter("b")
        assert_same_model(copied.unload(), untouched, same_modes=False)


def test_save_an_inactive_adapter_and_load_by_name(tmp_path):
    untouched, tuned = two_adapters("mistral")
    out_a = logits(tuned, DIM_A)
    save_neural_adapter(tuned, tmp_path / "b", adapter_name="b")
    save_neural_adapter(tuned, tmp_path / "a")
    assert tuned.active_adapter == "a" and torch.equal(logits(tuned, DIM_A), out_a)
    fresh = load_neural_adapter(copy.deepcopy(untouched), tmp_path / "b")
    assert fresh.adapter_names == ["default"] and fresh.neural_config == CONFIG_B
    tuned.set_adapter("b")
    out_b = logits(tuned, DIM_B)
    assert torch.equal(logits(fresh, DIM_B), out_b)

    # a new name adds the adapter, inactive; an existing one gets the weights (configs must match)
    load_neural_adapter(fresh, tmp_path / "a", adapter_name="a")
    assert fresh.adapter_names == ["default", "a"] and fresh.active_adapter == "default"
    assert "nt_image_projection.proj.weight" in fresh.state_dict()
    assert fresh.state_dict()["nt_image_projection.proj.weight"].shape[1] == DIM_B
    fresh.set_adapter("a")
    assert torch.equal(logits(fresh, DIM_A), out_a)
    with pytest.raises(ValueError, match="adapter 'default'"):
        load_neural_adapter(fresh, tmp_path / "a", adapter_name="default")
    load_neural_adapter(fresh, tmp_path / "b", adapter_name="default")  # into the inactive adapter
    fresh.set_adapter("default")
    assert torch.equal(logits(fresh, DIM_B), out_b)


def test_add_adapter_with_a_tokenizer():
    class Tokenizer:
        def __init__(self) -> None:
            self.vocab: dict[str, int] = {}

        def get_vocab(self):
            return dict(self.vocab)

        def __len__(self) -> int:
            return V + len(self.vocab)

        def add_tokens(self, tokens, special_tokens=False):
            for token in tokens:
                self.vocab.setdefault(token, len(self))

        def convert_tokens_to_ids(self, tokens):
            return [self.vocab[t] for t in tokens]

    tokenizer = Tokenizer()
    tuned = apply_neural_tuning(fam.model("llama"), copy.deepcopy(CONFIG_A), tokenizer)
    tuned.add_adapter(copy.deepcopy(CONFIG_B), "b", tokenizer)
    assert tokenizer.vocab == {"<A>": V, "<B>": V + 1, "<C>": V + 2, "<D>": V + 3, "<E>": V + 4}
    assert tuned.get_input_embeddings().num_embeddings == V + 2  # grown when b is activated
    tuned.set_adapter("b")
    assert tuned.nt_new_token_ids == [V + 2, V + 3, V + 4] and tuned.get_input_embeddings().num_embeddings == V + 5
    logits(tuned, DIM_B)


def test_refusals():
    _, tuned = two_adapters("llama")
    with pytest.raises(ValueError, match=r"adapter_name 'a' is the active adapter"):
        tuned.delete_adapter("a")
    unknown = r"adapter_name 'x' is not an adapter of this model; its adapters: \['a', 'b'\]"
    with pytest.raises(ValueError, match=unknown):
        tuned.set_adapter("x")
    with pytest.raises(ValueError, match=r"adapter_name 'x' is not an adapter"):
        tuned.delete_adapter("x")
    with pytest.raises(ValueError, match=r"adapter_name 'b' is in use"):
        tuned.add_adapter(CONFIG_B, "b", new_token_ids=IDS_B)
    for bad in ("", "a.b", 3):
        with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
            tuned.add_adapter(CONFIG_B, bad, new_token_ids=IDS_B)
        with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
            apply_neural_tuning(fam.model("llama"), CONFIG_A, new_token_ids=IDS_A, adapter_name=bad)
    with pytest.raises(ValueError, match="adapter_name: expected"):
        tuned.add_adapter(CONFIG_B, None)
    with pytest.raises(ValueError, match="need a tokenizer"):
        tuned.add_adapter(CONFIG_B, "c")
    with pytest.raises(ValueError, match=r"adapter_name 'x' is not an adapter"):
        save_neural_adapter(tuned, "unused", adapter_name="x")
    with tuned.disable_adapter(), pytest.raises(ValueError, match="inside its disable_adapter"):
        tuned.set_adapter("b")
    assert tuned.adapter_names == ["a", "b"] and tuned.active_adapter == "a"
    tuned.set_adapter("b")
    tuned.delete_adapter("a")
    assert tuned.adapter_names == ["b"]
