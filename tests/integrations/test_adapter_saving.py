"""Saving adapters: the directory is written as one unit (a reader, or a run killed at any step, finds the previous
adapter or the new one complete, never a mix), the config is validated again first, and transformers'
save_pretrained / from_pretrained of an MiT model are refused in favour of the adapter functions."""

from __future__ import annotations

import copy
import errno
import json
import os
import pathlib
import subprocess
import sys

import integration_families as fam
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import mit
from mit.hf import adapter_files, directory_swap

CONFIG = mit.MiTConfig(modality_dim=fam.MODALITY_DIM, layers=[0, 1])
OTHER = mit.MiTConfig(modality_dim=fam.MODALITY_DIM, layers=[1], infuse_ffn=False)
KV = "model.layers.1.self_attn.mit_kv_infusion.map.weight"


def tiny():
    return fam.model("llama", num_hidden_layers=2)


def trained(config=CONFIG, seed=0):
    model = mit.apply_mit(tiny(), copy.deepcopy(config))  # the model keeps the config object: the tests change it
    fam.randomise(model, seed=seed)
    return model


def contents(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_loads_as(directory, source) -> None:
    """``directory`` loads into a fresh model as exactly ``source``'s adapter (config and every tensor, bitwise)."""
    loaded = mit.load_adapter(tiny(), directory)
    assert loaded.mit_config == source.mit_config
    got, expected = dict(loaded.mit_named_parameters()), dict(source.mit_named_parameters())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.fixture(params=["exchange", "rename aside"])
def swap(request, tmp_path, monkeypatch):
    """The two ways a new adapter directory takes the old one's place: renameat2(RENAME_EXCHANGE) (Linux; yields the
    list of its results), or the portable rename aside / rename in (yields None)."""
    if request.param == "rename aside":
        monkeypatch.setattr(directory_swap, "exchange", lambda first, second: False)
        return None
    probe = [tmp_path / ".probe-1", tmp_path / ".probe-2"]
    for directory in probe:
        directory.mkdir()
    supported = directory_swap.exchange(*probe)
    for directory in probe:
        directory.rmdir()
    if not supported:
        pytest.skip("this system or file system cannot exchange two directories (RENAME_EXCHANGE)")
    used, real = [], directory_swap.exchange

    def exchange(first, second):
        used.append(real(first, second))
        return used[-1]

    monkeypatch.setattr(directory_swap, "exchange", exchange)
    return used


def test_a_save_replaces_the_previous_adapter_whole_and_leaves_nothing_beside_it(tmp_path, swap):
    old, new = trained(CONFIG, seed=0), trained(OTHER, seed=1)
    target = tmp_path / "a"
    assert mit.save_adapter(old, target) == target
    os.chmod(target, 0o750)
    assert_loads_as(target, old)
    mit.save_adapter(new, target)
    assert_loads_as(target, new)
    assert sorted(contents(target)) == ["adapter_model.safetensors", "mit_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory, no aside
    assert target.stat().st_mode & 0o777 == 0o750  # the directory keeps its permissions
    if swap is not None:
        assert swap == [True]  # the second save swapped the directories in one step


def test_a_link_to_the_adapter_stays_a_link_to_the_new_adapter(tmp_path):
    old, new = trained(CONFIG, seed=0), trained(OTHER, seed=1)
    mit.save_adapter(old, tmp_path / "runs" / "3" / "adapter")  # missing parents are made
    (tmp_path / "latest").symlink_to(tmp_path / "runs" / "3" / "adapter", target_is_directory=True)
    mit.save_adapter(new, tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink()
    assert_loads_as(tmp_path / "latest", new)
    assert_loads_as(tmp_path / "runs" / "3" / "adapter", new)
    assert [p.name for p in (tmp_path / "runs" / "3").iterdir()] == ["adapter"]


def fail_writing_weights(monkeypatch):
    def save_file_then_fail(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files, "save_file", save_file_then_fail)


def fail_writing_config(monkeypatch):
    real = pathlib.Path.write_bytes

    def write_then_fail(self, data):
        if self.name == "mit_config.json":
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_then_fail)


@pytest.mark.parametrize("failure", [fail_writing_weights, fail_writing_config])
def test_a_failed_save_leaves_the_previous_adapter_bit_for_bit(tmp_path, monkeypatch, failure):
    old, new = trained(CONFIG, seed=0), trained(OTHER, seed=1)
    mit.save_adapter(old, tmp_path / "a")
    before = contents(tmp_path / "a")
    failure(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        mit.save_adapter(new, tmp_path / "a")
    with pytest.raises(OSError, match="No space left"):
        mit.save_adapter(new, tmp_path / "b")  # a first save that fails leaves nothing
    monkeypatch.undo()
    assert contents(tmp_path / "a") == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert_loads_as(tmp_path / "a", old)


def test_a_failed_swap_puts_the_previous_adapter_back(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE the old directory is renamed aside first; if the new one cannot then be renamed in,
    the old one is renamed back."""
    old, new = trained(CONFIG, seed=0), trained(OTHER, seed=1)
    mit.save_adapter(old, tmp_path / "a")
    before = contents(tmp_path / "a")
    real_rename = os.rename

    def rename(source, destination):
        if pathlib.Path(source).name.startswith(".a.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(source, destination)

    monkeypatch.setattr(directory_swap, "exchange", lambda first, second: False)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        mit.save_adapter(new, tmp_path / "a")
    monkeypatch.undo()
    assert contents(tmp_path / "a") == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


# A process killed at each step of a save (os._exit: no cleanup runs), and what a reader then finds at the target.
CRASH = r"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("directory_swap", sys.argv[1])
swap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(swap)
source, target, point = sys.argv[2:5]
real_rename, real_exchange, renamed = os.rename, swap.exchange, []


def exchange(first, second):
    if point != "exchanged":
        return False
    assert real_exchange(first, second)
    os._exit(17)


def rename(first, second):
    real_rename(first, second)
    renamed.append(first)
    if (point, len(renamed)) in (("aside", 1), ("renamed", 2)):
        os._exit(17)


def copy(name):
    def write(path):
        data = open(os.path.join(source, name), "rb").read()
        if point == "writing" and name == "mit_config.json":
            open(path, "wb").write(data[: len(data) // 2])
            os._exit(17)
        open(path, "wb").write(data)
    return write


swap.exchange, os.rename = exchange, rename
names = ["adapter_model.safetensors", "mit_config.json"]
swap.write_directory(target, {n: copy(n) for n in names}, lambda entry: entry in names, "MiT adapter")
"""


@pytest.mark.parametrize(
    "point, finds",
    [
        ("writing", "old"),  # killed while writing the new directory's files
        ("aside", "old"),  # killed between renaming the old directory aside and the new one in: the aside is read
        ("renamed", "new"),  # killed before the aside is deleted
        ("exchanged", "new"),  # killed after RENAME_EXCHANGE, before the old content is deleted
    ],
)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_adapter_loadable(tmp_path, point, finds):
    old, new, third = trained(CONFIG, seed=0), trained(OTHER, seed=1), trained(CONFIG, seed=2)
    target = tmp_path / "a"
    mit.save_adapter(old, target)
    mit.save_adapter(new, tmp_path / "new")
    script = [sys.executable, "-c", CRASH, directory_swap.__file__, str(tmp_path / "new"), str(target), point]
    assert subprocess.run(script, check=False).returncode == 17
    if point == "aside":
        assert not target.exists() and len(list(tmp_path.glob(".a.old-*"))) == 1
    assert_loads_as(target, old if finds == "old" else new)
    mit.save_adapter(third, target)  # the next save completes and removes what an interrupted one left aside
    assert_loads_as(target, third)
    assert not list(tmp_path.glob(".a.old-*"))


def test_several_asides_without_the_target_are_refused_by_name(tmp_path):
    mit.save_adapter(trained(), tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / ".a.old-1-0")
    mit.save_adapter(trained(), tmp_path / ".a.old-2-0")
    with pytest.raises(ValueError, match=r"several previous ones .*'\.a\.old-1-0', '\.a\.old-2-0'"):
        mit.load_adapter(tiny(), tmp_path / "a")


def test_a_reader_sees_the_old_or_the_new_adapter_never_a_mix(tmp_path, monkeypatch, swap):
    """A save that completes between the reader's reading of the config and of the tensors: the reader reads both
    files from the directory it opened; the old one being deleted, it reads the new one again, whole. (By path, it
    would combine the old config with the new tensors: another set of layers, refused as not matching.)"""
    old, new = trained(CONFIG, seed=0), trained(OTHER, seed=1)
    target = tmp_path / "a"
    mit.save_adapter(old, target)
    real, reads = directory_swap._read_all, []

    def read_then_save(fd, path):
        data = real(fd, path)
        reads.append(path.name)
        if len(reads) == 1:
            mit.save_adapter(new, target)
        return data

    monkeypatch.setattr(directory_swap, "_read_all", read_then_save)
    assert_loads_as(target, new)
    assert reads == ["mit_config.json", "mit_config.json", "adapter_model.safetensors"]  # read again, whole


def test_a_directory_holding_anything_else_is_refused_before_anything_is_written(tmp_path):
    model = trained()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"run: holds \['notes.txt'\] besides the MiT adapter"):
        mit.save_adapter(model, tmp_path / "run")
    assert contents(tmp_path / "run") == {"notes.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file: exists and is not a directory"):
        mit.save_adapter(model, tmp_path / "file")
    neural = tmp_path / "neural"  # another kind of adapter is not replaced either
    neural.mkdir()
    (neural / "neural_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds \['neural_config.json'\]"):
        mit.save_adapter(model, neural)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "neural", "run"]


def set_field(name, value):
    def change(model):
        setattr(model.mit_config, name, value)

    return change


def replace_config(model):
    model.mit_config = CONFIG.to_dict()


CHANGED_CONFIGS = {  # a change of model.mit_config after apply_mit -> what the save's ValueError says
    "modality_dim a string": (set_field("modality_dim", "16"), r"model\.mit_config is no longer valid .*modality_dim"),
    "unknown backend": (set_field("backend", "cuda"), r"model\.mit_config is no longer valid .*backend"),
    "empty layers": (set_field("layers", []), r"model\.mit_config is no longer valid .*layers"),
    "no infusion": (
        lambda m: (set_field("infuse_kv", False)(m), set_field("infuse_ffn", False)(m)), "infuse_kv, infuse_ffn"
    ),
    "not a config": (replace_config, r"model\.mit_config must be a MiTConfig, got dict"),
    "other layers": (set_field("layers", [1]), r"unexpected \['model\.layers\.0\.mlp\.mit_ffn_infusion"),
    "no head rescaling": (set_field("head_rescale", False), r"unexpected \['model\.layers\.0\.self_attn\.mit_kv"),
    "no ffn infusion": (set_field("infuse_ffn", False), r"unexpected \['model\.layers\.0\.mlp\.mit_ffn_infusion"),
    "other modality_dim": (set_field("modality_dim", 32), r"has shape \(\d+, 16\), the model expects \(\d+, 32\)"),
}  # fmt: skip


@pytest.mark.parametrize("change", list(CHANGED_CONFIGS))
def test_a_config_changed_after_apply_mit_is_refused_at_save_before_anything_is_written(tmp_path, change):
    old = trained(seed=3)
    mit.save_adapter(old, tmp_path / "a")
    before = contents(tmp_path / "a")
    model = trained()
    edit, message = CHANGED_CONFIGS[change]
    edit(model)
    with pytest.raises(ValueError, match=message) as error:
        mit.save_adapter(model, tmp_path / "a")
    assert "save_adapter" in str(error.value)
    with pytest.raises(ValueError, match=message):
        mit.save_adapter(model, tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert contents(tmp_path / "a") == before


def test_layers_given_out_of_order_after_apply_mit_are_saved_sorted(tmp_path):
    model = trained()
    model.mit_config.layers = [1, 0, 1]
    mit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "mit_config.json").read_text())["mit_config"]["layers"] == [0, 1]
    assert mit.load_adapter(tiny(), tmp_path / "a").mit_config == CONFIG


def test_a_v1_adapter_holding_two_spellings_of_a_tensor_is_refused_naming_both(tmp_path):
    source = trained()
    mit.save_adapter(source, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / "mit_config.json").read_text())
    tensors = {
        name.replace(".mit_kv_infusion.map.", ".infusion.")
        .replace(".mit_kv_infusion.head_logit", ".head_logit")
        .replace(".mit_ffn_infusion.map.", ".ffn_infusion."): tensor
        for name, tensor in load_file(str(tmp_path / "v2" / "adapter_model.safetensors")).items()
    }
    meta["format"] = "mit-adapter-v1"
    del meta["base_model"]["model_type"]
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "mit_config.json").write_text(json.dumps(meta))
    save_file(tensors, str(v1 / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert_loads_as(v1, source)  # one spelling each: loads

    old_name = "model.layers.1.self_attn.infusion.weight"
    tensors[KV] = tensors[old_name] + 1  # the same tensor, spelled the new way, with other values
    save_file(tensors, str(v1 / "adapter_model.safetensors"), metadata={"format": "pt"})
    for model in (tiny(), mit.apply_mit(tiny(), CONFIG)):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        kind = type(model)
        with pytest.raises(ValueError, match="two spellings of the tensor") as error:
            mit.load_adapter(model, v1)
        message = str(error.value)
        assert str(v1 / "adapter_model.safetensors") in message
        assert old_name in message and KV in message
        assert type(model) is kind and model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_save_pretrained_and_from_pretrained_of_an_mit_model_are_refused_pointing_to_the_adapter(tmp_path):
    for model in (mit.apply_mit(tiny(), CONFIG), mit.apply_mit(fam.model("llama", bare=True), CONFIG)):
        base = type(model)._mit_base.__name__
        with pytest.raises(ValueError, match=r"save_pretrained.*mit\.save_adapter\(model, directory\)"):
            model.save_pretrained(tmp_path / "hf")
        with pytest.raises(ValueError, match=rf"{base}\.from_pretrained\(\.\.\.\).*mit\.load_adapter"):
            type(model).from_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_base_directory_and_the_adapter_round_trip_the_mit_model_exactly(tmp_path):
    """What the refusal points to: the base model's own directory plus the adapter give the same model back."""
    base = tiny()
    attention = base.config._attn_implementation
    base.save_pretrained(tmp_path / "base")  # the plain base model saves as ever
    model = mit.apply_mit(base, CONFIG)
    fam.randomise(model)
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, modality_embedding=emb).logits
    mit.save_adapter(model, tmp_path / "adapter")
    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation=attention).eval()
    back = mit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=mask, modality_embedding=emb).logits, expected)


def test_the_task_model_refuses_a_plain_llm_given_a_modality_embedding():
    from mit.tuning.tasks.base import TaskModel

    llm = fam.model("llama", bare=True)
    task = TaskModel(llm)
    ids, mask = fam.padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match="LlamaModel without MiT, which would ignore modality_embedding"):
        task.task_embedding(batch, fam.embedding())
    mit.apply_mit(llm, CONFIG)
    assert task.task_embedding(batch, fam.embedding()).shape == (3, 64)
