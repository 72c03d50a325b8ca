"""mit.models.load_smollm2's cache of the de-quantised model: written once (safetensors, no pickle), read back as the
same weights bit for bit, the same tokenizer and chat template, left padding, eval mode, in any dtype."""

from __future__ import annotations

import json

import pytest
import torch

import mit.models
from mit.models import SMOLLM2_INSTALL


def test_a_cached_load_is_the_gguf_load_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("MIT_CACHE_DIR", str(tmp_path))
    try:
        first, first_tokenizer = mit.models.load_smollm2()  # reads the GGUF file, writes the cache
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    cache = mit.models.smollm2_cache_dir()
    assert cache.parent == tmp_path and (cache / "complete").is_file()
    stored = {p.name for p in cache.iterdir()}
    assert "model.safetensors" in stored and not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in stored)
    # no staging directory left (the lock concurrent first loads take stays)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.name, cache.name + ".lock"])
    # a checkpoint other loaders (vLLM) read as it is: its architecture recorded, no quantization record
    config = json.loads((cache / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert mit.models.smollm2_checkpoint() == cache

    second, tokenizer = mit.models.load_smollm2()
    assert not second.training and tokenizer.padding_side == "left" and tokenizer.pad_token == first_tokenizer.pad_token
    expected, got = first.state_dict(), second.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    chat = [{"role": "user", "content": "What digit is this?"}]
    expected_ids = first_tokenizer.apply_chat_template(chat, tokenize=True)
    assert tokenizer.apply_chat_template(chat, tokenize=True) == expected_ids
    batch = ["Hello", "The answer is four"]
    assert tokenizer(batch, padding=True)["input_ids"] == first_tokenizer(batch, padding=True)["input_ids"]
    ids = torch.tensor([first_tokenizer("Two and two make")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    half, _ = mit.models.load_smollm2(dtype=torch.bfloat16)
    for name, tensor in half.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_the_cache_key_follows_the_file_and_the_environment(tmp_path, monkeypatch):
    try:
        directory = mit.models.smollm2_path()
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    monkeypatch.setenv("MIT_CACHE_DIR", str(tmp_path / "a"))
    a = mit.models.smollm2_cache_dir(directory)
    monkeypatch.setenv("MIT_CACHE_DIR", str(tmp_path / "b"))
    b = mit.models.smollm2_cache_dir(directory)
    assert a.parent == tmp_path / "a" and b.parent == tmp_path / "b" and a.name == b.name
    assert a.name.startswith("smollm2-") and len(a.name) == len("smollm2-") + 16


def test_the_same_file_elsewhere_shares_the_cache_and_another_file_does_not(tmp_path, monkeypatch):
    """The key is the file's content (and the transformers version), not its path or time: a second environment (or
    a reinstall) with the same GGUF file reads the same cache; a changed file gets another one."""
    import os
    import shutil

    try:
        directory = mit.models.smollm2_path()
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    monkeypatch.setenv("MIT_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copyfile(directory / mit.models.SMOLLM2_GGUF, copy / mit.models.SMOLLM2_GGUF)
    os.utime(copy / mit.models.SMOLLM2_GGUF, ns=(1, 1))
    assert mit.models.smollm2_cache_dir(copy) == mit.models.smollm2_cache_dir(directory)
    with open(copy / mit.models.SMOLLM2_GGUF, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(copy / mit.models.SMOLLM2_GGUF, ns=(2, 2))
    assert mit.models.smollm2_cache_dir(copy) != mit.models.smollm2_cache_dir(directory)


def test_concurrent_first_loads_de_quantise_once(tmp_path, monkeypatch):
    """Loads that start together on a cold cache (pytest-xdist workers, DDP ranks): one reads the GGUF file and writes
    the cache, the others wait for it and read the cache (threads here: each opens the lock file, as processes do)."""
    import threading
    import time
    import types

    cache = tmp_path / "smollm2-test"
    calls = {"gguf": 0, "cache": 0}

    def made():
        return (types.SimpleNamespace(eval=lambda: None), types.SimpleNamespace(padding_side="right", pad_token="<p>"))

    def load_gguf(directory, dtype):
        calls["gguf"] += 1
        time.sleep(0.5)  # long enough for the other loads to find the cache missing, were they not waiting
        return made()

    def write_cache(model, tokenizer, target):
        target.mkdir()
        (target / "complete").write_text("")

    def load_pretrained(directory, dtype):
        calls["cache"] += 1
        return made()

    monkeypatch.setattr(mit.models, "smollm2_path", lambda: tmp_path)
    monkeypatch.setattr(mit.models, "smollm2_cache_dir", lambda directory=None: cache)
    monkeypatch.setattr(mit.models, "_load_gguf", load_gguf)
    monkeypatch.setattr(mit.models, "_write_cache", write_cache)
    monkeypatch.setattr(mit.models, "_load_pretrained", load_pretrained)
    threads = [threading.Thread(target=mit.models.load_smollm2) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"gguf": 1, "cache": 2}


def test_a_gguf_load_parses_the_file_once_and_leaves_gguf_as_it_was(tmp_path):
    """Inside ``_one_reader_per_file`` gguf's reader and tensor-name table are made once per file / architecture and
    shared (transformers asks for them three times and ~400 times per load); outside it gguf is untouched. (That the
    shared objects give the same weights, config and tokenizer as fresh ones was checked once, bit for bit, when this
    was written: they are read-only.)"""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_class, table = gguf.GGUFReader, gguf.get_tensor_name_map
    with mit.models._one_reader_per_file():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling: the same reader
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 2
        )
        mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name("model.layers.1.mlp.up_proj")
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is table
    assert mapped == table(gguf.MODEL_ARCH.LLAMA, 2).get_name("model.layers.1.mlp.up_proj") == "blk.1.ffn_up"
    assert np.array_equal(first.tensors[0].data, reader_class(path).tensors[0].data)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
