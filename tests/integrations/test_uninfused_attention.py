"""The attention modules of layers without key/value infusion call the base implementation directly (their config
reads its name, live), on every supported family: MiT's attention function runs only in the infused layers, the
outputs are those of the detour through MiT's function bit for bit, and the name follows ``set_attn_implementation``,
adapter switches, ``unload``, copies and pickles."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from integration_families import FAMILIES, MODALITY_DIM, embedding, model, padded_batch, randomise
from transformers.modeling_utils import AttentionInterface

import mit
from mit.integrations.attention import KV_INFUSION_NAME, base_implementation, is_mit_implementation
from mit.integrations.attention_config import UninfusedAttentionConfig, unroute_attention

FAMILY_NAMES = sorted(FAMILIES)


def infused(model_type: str, **config) -> torch.nn.Module:
    tuned = mit.apply_mit(model(model_type), mit.MiTConfig(modality_dim=MODALITY_DIM, **config))
    randomise(tuned)
    return tuned


@contextlib.contextmanager
def counting_mit_calls(name: str):
    """Counts the calls of the MiT attention function registered as ``name``, per attention module."""
    mapping = AttentionInterface._global_mapping
    original = mapping[name]
    calls: list[torch.nn.Module] = []

    def counted(module, *args, **kwargs):
        calls.append(module)
        return original(module, *args, **kwargs)

    mapping[name] = counted
    try:
        yield calls
    finally:
        mapping[name] = original


def logits(m, **kwargs) -> torch.Tensor:
    ids, mask = padded_batch()
    with torch.no_grad():
        return m(ids, attention_mask=mask, modality_embedding=embedding(), **kwargs).logits


def implementations(m) -> list[str]:
    return [layer.self_attn.config._attn_implementation for layer in m.model.layers]


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_only_the_infused_layers_reach_mit_attention_and_the_outputs_are_the_detours(model_type):
    tuned = infused(model_type, layers=[1, 3])
    name = tuned.config._attn_implementation
    assert is_mit_implementation(name)
    assert implementations(tuned) == [base_implementation(name), name, base_implementation(name), name]
    with counting_mit_calls(name) as calls:
        fast = logits(tuned)
        tuned.generate(*padded_batch()[:1], max_new_tokens=3, modality_embedding=embedding(), pad_token_id=0)
    attentions = [layer.self_attn for layer in tuned.model.layers]
    assert {id(module) for module in calls} == {id(attentions[1]), id(attentions[3])}
    assert len(calls) == 2 * 4  # the forward, then generate's prefill and two decoding steps

    unroute_attention(tuned.modules())  # every layer through MiT's function again (the layers without MiT pass on)
    assert implementations(tuned) == [name] * 4
    with counting_mit_calls(name) as calls:
        assert torch.equal(logits(tuned), fast)
    assert len(calls) == 4


def test_the_name_follows_set_attn_implementation_and_writes_reach_the_models_config():
    tuned = infused("llama", layers=[2])
    view = tuned.model.layers[0].self_attn.config
    assert isinstance(view, UninfusedAttentionConfig)
    assert object.__getattribute__(view, "_mit_wrapped_config") is tuned.config
    expected = logits(tuned)
    tuned.set_attn_implementation("eager")
    assert tuned.config._attn_implementation == "mit_eager"
    assert implementations(tuned) == ["eager", "eager", "mit_eager", "eager"]
    real = padded_batch()[1].bool()  # (padding rows differ: eager and sdpa fill the rows that see no key apart)
    torch.testing.assert_close(logits(tuned)[real], expected[real], rtol=1e-5, atol=1e-5)  # rounding apart

    assert view.hidden_size == tuned.config.hidden_size  # reads are the config's, writes and deletes reach it
    view.mit_probe = 3
    assert tuned.config.mit_probe == 3
    del view.mit_probe
    assert not hasattr(tuned.config, "mit_probe")
    with pytest.raises(AttributeError):
        view.no_such_attribute  # noqa: B018


def test_adapter_switches_and_unload_move_the_views():
    tuned = infused("qwen2", layers=[1])
    assert isinstance(tuned.model.layers[2].self_attn.config, UninfusedAttentionConfig)
    tuned.add_adapter(mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[2]), "other")
    tuned.set_adapter("other")
    name = tuned.config._attn_implementation
    base = base_implementation(name)
    assert implementations(tuned) == [base, base, name, base]
    assert tuned.model.layers[2].self_attn.config is tuned.config  # its own config back
    tuned.add_adapter(mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[0], infuse_kv=False), "ffn_only")
    tuned.set_adapter("ffn_only")  # no layer infuses K/V: every attention module calls the base function
    with counting_mit_calls(name) as calls:
        logits(tuned)
    assert calls == []
    tuned.unload()
    for layer in tuned.model.layers:
        assert layer.self_attn.config is tuned.config
        assert KV_INFUSION_NAME not in layer.self_attn._modules


def test_copies_and_pickles_view_their_own_models_config():
    tuned = infused("mistral", layers=[3])
    expected = logits(tuned)
    for clone in (copy.deepcopy(tuned), pickle.loads(pickle.dumps(tuned))):
        view = clone.model.layers[0].self_attn.config
        assert isinstance(view, UninfusedAttentionConfig)
        assert object.__getattribute__(view, "_mit_wrapped_config") is clone.config
        assert torch.equal(logits(clone), expected)
        clone.set_attn_implementation("eager")
        assert implementations(clone)[0] == "eager"
        assert implementations(tuned)[0] == "sdpa"


def test_the_view_reads_the_stored_name_only_where_the_property_is_transformers_own():
    """The view reads the name from the config's instance dict (no pass through transformers' ``__getattribute__``
    overrides) when the config's class reads it with transformers' own property; a class with a property of its own is
    read through that property. Either way the name is the property's, live."""
    from transformers import LlamaConfig

    from mit.integrations.attention_config import _stored_name_dict

    tuned = infused("llama", layers=[2])
    view = tuned.model.layers[0].self_attn.config
    assert object.__getattribute__(view, "_mit_stored_in") is object.__getattribute__(tuned.config, "__dict__")
    for name in ("eager", "sdpa"):
        tuned.set_attn_implementation(name)
        assert tuned.config._attn_implementation == "mit_" + name and view._attn_implementation == name

    class OwnProperty(LlamaConfig):
        @property
        def _attn_implementation(self):
            return "mit_flavour"

        @_attn_implementation.setter
        def _attn_implementation(self, value):
            pass

    own = OwnProperty(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32)
    assert _stored_name_dict(own) is None and _stored_name_dict(object()) is None
    assert UninfusedAttentionConfig(own)._attn_implementation == "flavour"
    plain = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=32)
    plain._attn_implementation = "mit_eager"
    del plain.__dict__["_attn_implementation_internal"]  # stored elsewhere (another release): the property is read
    view = UninfusedAttentionConfig(plain)
    assert object.__getattribute__(view, "_mit_stored_in") is None
    assert view._attn_implementation is None  # (what reading the property gives now)
    plain._attn_implementation = "mit_sdpa"
    assert view._attn_implementation == "sdpa"
