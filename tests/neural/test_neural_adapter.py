"""Neural-tuning adapters follow MiT's adapter contract through the same reader, validator and writer: every problem
in the files is a ValueError naming the file and the field, with the model and the tokenizer left as they were; the
config is validated again at save; save_pretrained / from_pretrained are refused; a modality_embedding (MiT's
input) given to a neural-tuning model is refused instead of ignored."""

from __future__ import annotations

import copy
import errno
import json
import pathlib
import shutil

import integration_families as fam
import pytest
import torch
from safetensors.torch import load_file, save_file

import mit
from mit.hf import adapter_files
from mit.neural import NeuralTuningConfig, apply_neural_tuning

CONFIG = NeuralTuningConfig(rank=8, start_layer=2, image_dim=12, new_tokens=["<A>", "<B>"])
IDS = [97, 98]
NEURONS = "model.layers.2.self_attn.nt_neurons.z_proj.weight"


class Tokenizer:
    """The part of a Hugging Face tokenizer the loader uses (97 base tokens)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return 97 + len(self.vocab)

    def add_tokens(self, tokens, special_tokens=False) -> None:
        for token in tokens:
            self.vocab.setdefault(token, len(self))

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]


def trained(seed: int = 0, config: NeuralTuningConfig = CONFIG):
    model = apply_neural_tuning(fam.model("llama"), copy.deepcopy(config), new_token_ids=IDS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.neural_named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = trained()
    directory = tmp_path_factory.mktemp("neural") / "adapter"
    mit.save_neural_adapter(model, directory)
    return model, directory


def snapshot(model) -> dict:
    """Everything a load could change: parameters and buffers, classes, flags, hooks, the neural config."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "hooks": [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()],
        "config": copy.deepcopy(getattr(model, "neural_config", None)),
        "ids": list(getattr(model, "nt_new_token_ids", [])),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    for key in ("modules", "grad", "hooks", "config", "ids"):
        assert before[key] == after[key], key


def edit_json(edit):
    def corrupt(directory):
        path = directory / "neural_config.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return corrupt


def edit_tensors(edit, metadata=None):
    def corrupt(directory):
        path = directory / "adapter_model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata=metadata or {"format": "pt"})

    return corrupt


def set_in(section, key, value):
    def edit(meta):
        (meta if section is None else meta[section])[key] = value

    return edit


def delete_in(section, key):
    def edit(meta):
        del (meta if section is None else meta[section])[key]

    return edit


def truncate(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def cast(dtype):
    return edit_tensors(lambda t: t.__setitem__(NEURONS, t[NEURONS].to(dtype)))


WEIGHTS, JSON = "adapter_model.safetensors", "neural_config.json"
CORRUPTIONS = {  # name -> (corrupt(directory), file it must name, message pattern naming the field)
    "no config file": (lambda d: (d / JSON).unlink(), JSON, "is missing"),
    "no weights file": (lambda d: (d / WEIGHTS).unlink(), WEIGHTS, "is missing"),
    "truncated safetensors": (truncate, WEIGHTS, "not a readable safetensors file"),
    "malformed JSON": (lambda d: (d / JSON).write_text('{"format": '), JSON, "not a readable JSON file"),
    "JSON not an object": (lambda d: (d / JSON).write_text("[1]"), JSON, "expected a JSON object, got list"),
    "no new_token_ids": (edit_json(delete_in(None, "new_token_ids")), JSON, r"missing \['new_token_ids'\]"),
    "no base_model": (edit_json(delete_in(None, "base_model")), JSON, r"missing \['base_model'\]"),
    "unknown field": (edit_json(set_in(None, "extra", 1)), JSON, r"unknown \['extra'\]"),
    "wrong format": (edit_json(set_in(None, "format", "mit-adapter-v2")), JSON, "unknown adapter format"),
    "rank zero": (edit_json(set_in("neural_config", "rank", 0)), JSON, "invalid neural_config: rank"),
    "sparsity a string": (edit_json(set_in("neural_config", "sparsity", "0.4")), JSON, "neural_config: sparsity"),
    "unknown neural_config key": (edit_json(set_in("neural_config", "width", 3)), JSON, "invalid neural_config"),
    "neural_config a list": (edit_json(set_in(None, "neural_config", [])), JSON, "neural_config must be a JSON"),
    "new_token_ids of bools": (
        edit_json(set_in(None, "new_token_ids", [True, False])), JSON, "new_token_ids: expected a list of non-neg"
    ),
    "new_token_ids too few": (edit_json(set_in(None, "new_token_ids", [97])), JSON, "new_token_ids: expected one id"),
    "new_token_ids not contiguous": (
        edit_json(set_in(None, "new_token_ids", [97, 99])), JSON, "new_token_ids: expected contiguous ids"
    ),
    "hidden_size a string": (
        edit_json(set_in("base_model", "hidden_size", "64")), JSON, "base_model.hidden_size must be a positive int"
    ),
    "no model_type": (edit_json(delete_in("base_model", "model_type")), JSON, "base_model of a mit-neural-adapter"),
    "other shape": (edit_json(set_in("base_model", "intermediate_size", 96)), JSON, "intermediate_size: adapter 96"),
    "integer tensor": (cast(torch.int32), WEIGHTS, f"tensor {NEURONS} has dtype torch.int32, expected a floating"),
    "complex tensor": (cast(torch.complex64), WEIGHTS, f"tensor {NEURONS} has dtype torch.complex64, expected a"),
    "missing tensor": (edit_tensors(lambda t: t.pop(NEURONS)), WEIGHTS, rf"missing \['{NEURONS}'\]"),
    "unknown tensor": (
        edit_tensors(lambda t: t.__setitem__("nt_other.weight", torch.zeros(2))), WEIGHTS,
        r"unexpected \['nt_other.weight'\]",
    ),
    "wrong tensor shape": (
        edit_tensors(lambda t: t.__setitem__(NEURONS, torch.zeros(3, 3))), WEIGHTS, f"tensor {NEURONS} has shape"
    ),
    "safetensors format tf": (edit_tensors(lambda t: None, {"format": "tf"}), WEIGHTS, "metadata format is 'tf'"),
}  # fmt: skip


@pytest.mark.parametrize("target", ["plain", "neural"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_neural_adapter_raises_naming_the_file_and_leaves_model_and_tokenizer(
    saved, tmp_path, corruption, target
):
    _, directory = saved
    corrupt, file_name, message = CORRUPTIONS[corruption]
    shutil.copytree(directory, tmp_path / "a")
    corrupt(tmp_path / "a")
    tokenizer = Tokenizer()
    model = fam.model("llama") if target == "plain" else apply_neural_tuning(fam.model("llama"), CONFIG, Tokenizer())
    before, vocab = snapshot(model), tokenizer.get_vocab()
    with pytest.raises(ValueError, match=message) as error:
        mit.load_neural_adapter(model, tmp_path / "a", tokenizer=tokenizer if target == "plain" else None)
    assert str(tmp_path / "a" / file_name) in str(error.value)
    assert_same(before, snapshot(model))
    assert tokenizer.get_vocab() == vocab


def test_a_valid_neural_adapter_still_loads_into_plain_and_neural_models(saved):
    source, directory = saved
    expected = dict(source.neural_named_parameters())
    tokenizer = Tokenizer()
    for model in (fam.model("llama"), apply_neural_tuning(fam.model("llama"), CONFIG, new_token_ids=IDS)):
        loaded = dict(mit.load_neural_adapter(model, directory, tokenizer=tokenizer).neural_named_parameters())
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert tokenizer.get_vocab() == {"<A>": 97, "<B>": 98}


def set_config(name, value):
    def change(model):
        setattr(model.neural_config, name, value)

    return change


CHANGED = {  # a change after apply_neural_tuning -> what the save's ValueError says
    "rank zero": (set_config("rank", 0), r"model\.neural_config is no longer valid .*rank"),
    "unknown targets": (set_config("targets", "qk"), r"model\.neural_config is no longer valid .*targets"),
    "duplicate new tokens": (set_config("new_tokens", ["<A>", "<A>"]), "new_tokens: expected distinct"),
    "not a config": (lambda m: setattr(m, "neural_config", {}), r"must be a NeuralTuningConfig, got dict"),
    "other rank": (set_config("rank", 4), r"tensor model\.layers\.2\.self_attn\.nt_neurons\.\S+ has shape"),
    "other start_layer": (set_config("start_layer", 3), r"unexpected \['model\.layers\.2\.self_attn\.nt_neurons"),
    "no image projection": (set_config("image_dim", None), r"unexpected \['nt_image_projection"),
    "token ids not contiguous": (
        lambda m: setattr(m, "nt_new_token_ids", [97, 99]), r"model\.nt_new_token_ids: expected contiguous ids"
    ),
    "one token id too many": (
        lambda m: setattr(m, "nt_new_token_ids", [97, 98, 99]), r"model\.nt_new_token_ids: expected one id per"
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGED))
def test_a_config_changed_after_apply_neural_tuning_is_refused_at_save_before_anything_is_written(
    saved, tmp_path, change
):
    _, directory = saved
    shutil.copytree(directory, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    model = trained(seed=1)
    edit, message = CHANGED[change]
    edit(model)
    for target in ("a", "b"):
        with pytest.raises(ValueError, match=message) as error:
            mit.save_neural_adapter(model, tmp_path / target)
        assert "save_neural_adapter" in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_a_failed_neural_save_leaves_the_previous_adapter_bit_for_bit(saved, tmp_path, monkeypatch):
    _, directory = saved
    shutil.copytree(directory, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def save_file_then_fail(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files, "save_file", save_file_then_fail)
    with pytest.raises(OSError, match="No space left"):
        mit.save_neural_adapter(trained(seed=1), tmp_path / "a")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    mit.save_neural_adapter(trained(seed=1), tmp_path / "a")  # and a save that succeeds replaces it
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} != before


def test_save_pretrained_and_from_pretrained_of_a_neural_model_are_refused(tmp_path):
    model = trained()
    for module in (model, model.model):  # the top-level model and its NT<Decoder>
        with pytest.raises(ValueError, match=r"save_pretrained.*mit\.save_neural_adapter\(model, directory\)"):
            module.save_pretrained(tmp_path / "hf")
        with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\.\).*mit\.load_neural_adapter"):
            type(module).from_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_modality_embedding_given_to_a_neural_model_is_refused_not_ignored():
    model = trained()
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    calls = (
        lambda: model(ids, attention_mask=mask, modality_embedding=emb),
        lambda: model.model(ids, attention_mask=mask, modality_embedding=emb),
        lambda: model.generate(ids, attention_mask=mask, modality_embedding=emb, max_new_tokens=2),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"modality_embedding was given to NT.*which has no MiT infusion"):
            call()
    assert model(ids, attention_mask=mask).logits.shape == (3, fam.SEQ_LEN, 99)  # without one: as before
