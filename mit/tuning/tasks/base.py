"""What every task shares: the frozen LLM and its loading, the task embedding, batching, trainable parameters.

The task embedding is the LLM's last-layer hidden state at the last real token (:func:`mit.tuning.prompts.
last_token_state`), with positions counted from each prompt's first real token so that it does not depend on padding.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...integrations import FAMILIES, is_mit_model
from ..prompts import last_token_state, position_ids, tokenize_prompts
from .registry import TaskSpec, get_task

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(model_dtype: str, mixed_precision: str) -> torch.dtype:
    """The frozen models' dtype: ``auto`` follows the mixed precision (bf16 / fp16 base weights; else fp32)."""
    if model_dtype == "auto":
        return _DTYPES.get(mixed_precision, torch.float32)
    if model_dtype not in _DTYPES:
        raise ValueError(f"model_dtype: expected 'auto' or one of {sorted(_DTYPES)}, got {model_dtype!r}")
    return _DTYPES[model_dtype]


def check_llm_path(model: str | os.PathLike) -> None:
    """ValueError unless ``model`` is ``"smollm2"`` or a directory with a ``config.json``."""
    if str(model) != "smollm2" and not (pathlib.Path(model) / "config.json").is_file():
        raise ValueError(f"--model {model}: expected a Hugging Face model directory with config.json (or 'smollm2')")


def load_llm(model: str | os.PathLike, dtype: torch.dtype = torch.float32, causal_lm: bool = False):
    """The frozen LLM as a bare transformers decoder (``AutoModel``: no LM head; a family :func:`mit.apply_mit`
    supports), or with ``causal_lm`` as ``AutoModelForCausalLM`` (with its LM head), and its tokenizer.

    ``model`` is a directory in Hugging Face format (``config.json``, weights, tokenizer files), or ``"smollm2"`` for
    the offline SmolLM2-135M-Instruct of :func:`mit.models.load_smollm2`."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if str(model) == "smollm2":
        from ...models import load_smollm2

        causal, tokenizer = load_smollm2(dtype=dtype)
        return (causal if causal_lm else causal.model), tokenizer
    check_llm_path(model)
    path = pathlib.Path(model)
    llm = (AutoModelForCausalLM if causal_lm else AutoModel).from_pretrained(path, dtype=dtype)
    model_type = getattr(llm.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"--model {path}: MiT supports model types {sorted(FAMILIES)}, got {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return llm, tokenizer


class TaskModel(nn.Module):
    """Base of the task models: holds the MiT-infused LLM (a bare decoder after ``apply_mit``, frozen) and computes
    the task embedding. Subclasses implement ``forward(batch) -> {"logits": ..., "loss": ...}``."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def task_embedding(self, batch: dict[str, Any], modality_embedding: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the last real token's last-layer state; ``modality_embedding`` (B, modality_dim).

        ValueError when ``llm`` is not an MiT model: transformers would ignore the embedding and return the frozen
        model's states."""
        if not is_mit_model(self.llm):
            raise ValueError(
                f"TaskModel.llm is a {type(self.llm).__name__} without MiT, which would ignore modality_embedding and "
                "compute the frozen model; expected a model returned by mit.apply_mit or mit.load_adapter"
            )
        out = self.llm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
            modality_embedding=modality_embedding,
            use_cache=False,
        )
        return last_token_state(out.last_hidden_state, batch["attention_mask"])

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        self.llm.eval()  # the frozen LLM never uses dropout
        return self


def pad_sequences(items: list[torch.Tensor]) -> torch.Tensor:
    """(N, T_max, ...) from N tensors (T_i, ...), zero-padded at the end."""
    length = max(x.shape[0] for x in items)
    out = items[0].new_zeros((len(items), length, *items[0].shape[1:]))
    for i, x in enumerate(items):
        out[i, : x.shape[0]] = x
    return out


def make_collate(
    task: str | TaskSpec, tokenizer, padding_side: str = "left", max_length: int | None = None
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Batch the dataset items of ``task``: the tokenised prompts, the ids, and the task's own entries."""
    spec = get_task(task) if isinstance(task, str) else task

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        text = encode_text(spec, tokenizer, items, padding_side, max_length)
        return {**text, "id": [x["id"] for x in items], **spec.collate(items)}

    return collate


def encode_text(
    spec: TaskSpec, tokenizer, items: list[dict[str, Any]], padding_side: str = "left", max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """The text entries of a batch of ``spec``'s items: its own ``encode``, or the tokenised ``"prompt"`` of each item
    (``input_ids`` and ``attention_mask``, (B, L))."""
    if spec.encode is not None:
        return spec.encode(tokenizer, items, padding_side, max_length)
    input_ids, attention_mask = tokenize_prompts(tokenizer, [x["prompt"] for x in items], padding_side, max_length)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch (also inside dicts) to ``device``; lists stay on the CPU."""

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return {k: move(v) for k, v in batch.items()}


def build_task_model(
    task: str | TaskSpec,
    llm: nn.Module,
    method_config: Any,
    *,
    encoder=None,
    dataset=None,
    heads=None,
    tokenizer=None,
) -> nn.Module:
    """Apply the task's tuning method to ``llm`` (frozen) and attach the encoder and heads of ``task``.

    ``method_config`` is the configuration of the task's method (:attr:`TaskSpec.method`: a :class:`mit.MiTConfig`
    for MiT, a :class:`mit.NeuralTuningConfig` for neural tuning); for tasks with an image encoder its sizes must be
    the encoder's (:meth:`~mit.tuning.methods.TuningMethod.fit_to_encoder`). ``llm`` is a causal LM when the task says
    ``causal_lm``; ``tokenizer`` receives the method's new tokens, if any. ``heads`` is an instance of the task's
    ``head_settings`` (default: its defaults); ``dataset`` the evaluation dataset."""
    spec = get_task(task) if isinstance(task, str) else task
    if heads is None and spec.head_settings is not None:
        heads = spec.head_settings()
    if spec.uses_image_encoder and encoder is None:
        raise ValueError(f"encoder: task {spec.name!r} needs a CLIPImageEncoder, got None")
    spec.method.check(method_config, spec.name, encoder if spec.uses_image_encoder else None)
    llm = spec.method.apply(llm, method_config, tokenizer)
    return spec.build_model(llm, method_config, encoder, dataset, heads)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (MiT maps, heads, the sequence encoder), by name, detached on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
