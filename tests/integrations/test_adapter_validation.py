"""load_adapter validates both files and everything they imply before it touches the model: every corruption raises a
ValueError naming the file, and the model is left exactly as it was; a failed save_adapter leaves the previous adapter.
More on saving: test_adapter_saving.py."""

from __future__ import annotations

import errno
import json
import shutil

import integration_families as fam
import pytest
import torch
from safetensors.torch import load_file, save_file

import mit
from mit.hf import adapter_files

CONFIG = mit.MiTConfig(modality_dim=fam.MODALITY_DIM, layers=[0, 1])
KV = "model.layers.1.self_attn.mit_kv_infusion.map.weight"


def tiny():
    return fam.model("llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = mit.apply_mit(tiny(), CONFIG)
    fam.randomise(model)
    directory = tmp_path_factory.mktemp("adapter")
    mit.save_adapter(model, directory)
    return model, directory


def snapshot(model):
    """Everything load_adapter could change: parameters and buffers, classes, flags, modules, hooks, config."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "hooks": [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()],
        "attn": model.config._attn_implementation,
        "mit_config": getattr(model, "mit_config", None),
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    for key in ("modules", "grad", "hooks", "attn", "mit_config"):
        assert before[key] == after[key], key


def edit_json(edit):
    def corrupt(directory):
        path = directory / "mit_config.json"
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


def truncate(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def set_in(section, key, value):
    def edit(meta):
        (meta if section is None else meta[section])[key] = value

    return edit


def delete_in(section, key):
    def edit(meta):
        del (meta if section is None else meta[section])[key]

    return edit


CORRUPTIONS = {  # name -> (corrupt(directory), file it must name, message pattern)
    "truncated safetensors": (truncate, "adapter_model.safetensors", "not a readable safetensors file"),
    "malformed JSON": (
        lambda d: (d / "mit_config.json").write_text('{"format": "mit-adapter-v2", '),
        "mit_config.json", "not a readable JSON file",
    ),
    "JSON not an object": (lambda d: (d / "mit_config.json").write_text("[1]"), "mit_config.json", "a JSON object"),
    "no base_model": (edit_json(delete_in(None, "base_model")), "mit_config.json", r"missing \['base_model'\]"),
    "no format": (edit_json(delete_in(None, "format")), "mit_config.json", r"missing \['format'\]"),
    "unknown field": (edit_json(set_in(None, "extra", 1)), "mit_config.json", r"unknown \['extra'\]"),
    "wrong format": (edit_json(set_in(None, "format", "mit-adapter-v9")), "mit_config.json", "unknown adapter format"),
    "format not a string": (edit_json(set_in(None, "format", 2)), "mit_config.json", "unknown adapter format 2"),
    "no modality_dim": (edit_json(delete_in("mit_config", "modality_dim")), "mit_config.json", "missing required"),
    "modality_dim a string": (
        edit_json(set_in("mit_config", "modality_dim", "16")), "mit_config.json", "modality_dim: expected an"
    ),
    "layers of floats": (edit_json(set_in("mit_config", "layers", [0.5])), "mit_config.json", "layers: expected"),
    "infuse_kv an int": (edit_json(set_in("mit_config", "infuse_kv", 1)), "mit_config.json", "infuse_kv: expected"),
    "unknown backend": (edit_json(set_in("mit_config", "backend", "cuda")), "mit_config.json", "backend: expected"),
    "mit_config a list": (edit_json(set_in(None, "mit_config", [])), "mit_config.json", "mit_config must be a JSON"),
    "hidden_size a string": (
        edit_json(set_in("base_model", "hidden_size", "64")), "mit_config.json", "hidden_size must be a positive int"
    ),
    "no model_type in v2": (
        edit_json(delete_in("base_model", "model_type")), "mit_config.json", "base_model of a mit-adapter-v2"
    ),
    "other model_type": (
        edit_json(set_in("base_model", "model_type", "mistral")), "mit_config.json",
        "model_type: adapter mistral vs model llama",
    ),
    "other shape": (
        edit_json(set_in("base_model", "intermediate_size", 96)), "mit_config.json", "intermediate_size: adapter 96"
    ),
    "config implying other layers": (
        edit_json(set_in("mit_config", "layers", [1])), "adapter_model.safetensors", r"unexpected \['model.layers.0"
    ),
    "wrong tensor shape": (
        edit_tensors(lambda t: t.__setitem__(KV, torch.zeros(t[KV].shape[0] + 1, t[KV].shape[1]))),
        "adapter_model.safetensors", f"tensor {KV} has shape",
    ),
    "missing tensor": (edit_tensors(lambda t: t.pop(KV)), "adapter_model.safetensors", rf"missing \['{KV}'\]"),
    "extra tensor": (
        edit_tensors(lambda t: t.__setitem__("model.layers.0.mlp.extra", torch.zeros(2))),
        "adapter_model.safetensors", r"unexpected \['model.layers.0.mlp.extra'\]",
    ),
    "integer tensor": (
        edit_tensors(lambda t: t.__setitem__(KV, t[KV].to(torch.int32))), "adapter_model.safetensors",
        "expected a floating-point dtype",
    ),
    "complex tensor": (
        edit_tensors(lambda t: t.__setitem__(KV, t[KV].to(torch.complex64))), "adapter_model.safetensors",
        f"tensor {KV} has dtype torch.complex64, expected a floating-point dtype",
    ),
    "no weights file": (
        lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "is missing"
    ),
    "safetensors format tf": (
        edit_tensors(lambda t: None, {"format": "tf"}), "adapter_model.safetensors", "metadata format is 'tf'"
    ),
}  # fmt: skip


@pytest.mark.parametrize("target", ["plain", "mit"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_adapter_raises_naming_the_file_and_leaves_the_model_as_it_was(saved, tmp_path, corruption, target):
    _, directory = saved
    corrupt, file_name, message = CORRUPTIONS[corruption]
    shutil.copytree(directory, tmp_path / "a")
    corrupt(tmp_path / "a")
    model = tiny() if target == "plain" else mit.apply_mit(tiny(), CONFIG)
    if corruption == "config implying other layers" and target == "mit":
        file_name, message = "mit_config.json", "differs from the adapter's"  # an MiT model's config must match
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        mit.load_adapter(model, tmp_path / "a")
    assert str(tmp_path / "a" / file_name) in str(error.value)
    assert_same(before, snapshot(model))


def test_a_valid_adapter_loads_into_plain_and_mit_models(saved):
    source, directory = saved
    expected = dict(source.mit_named_parameters())
    for model in (tiny(), mit.apply_mit(tiny(), CONFIG)):
        loaded = dict(mit.load_adapter(model, directory).mit_named_parameters())
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        assert all(p.requires_grad for p in loaded.values())
        assert not any(p.requires_grad for n, p in model.named_parameters() if n not in loaded)


def test_a_failed_save_leaves_the_previous_adapter_and_no_temporary_directory(saved, tmp_path, monkeypatch):
    source, directory = saved
    shutil.copytree(directory, tmp_path / "a")
    old = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        mit.save_adapter(source, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
