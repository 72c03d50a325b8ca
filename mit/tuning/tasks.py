"""The three tasks of the paper: a frozen MiT-infused LLM + a modality encoder + a task head.

- ``refseg`` (RefCOCO / RefCOCO+ / RefCOCOg): CLIP's global embedding is infused; the last token's hidden state and
  CLIP's multi-level features feed :class:`~mit.heads.SegmentationDecoder`; DICE (+ optional BCE) loss; oIoU / mIoU.
- ``cls`` (UPMC-Food101, SNLI-VE): CLIP's global embedding is infused; ``[image embedding ; task embedding]`` feeds
  :class:`~mit.heads.ClassificationHead`; cross-entropy; accuracy / F1.
- ``msa`` (CMU-MOSI / MOSEI): :class:`~mit.encoders.SequenceEncoder` pools the acoustic and facial features into the
  embedding that is infused; the task embedding feeds :class:`~mit.heads.RegressionHead`; RMSE; MAE / Corr / Acc.

The task embedding is the LLM's last-layer hidden state at the last real token (:func:`mit.prompts.last_token_state`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MiTConfig
from ..integrations import FAMILIES, apply_mit
from .encoders import CLIPImageEncoder, SequenceEncoder
from .heads import ClassificationHead, RegressionHead, SegmentationDecoder
from .losses import classification_loss, rmse_loss, segmentation_loss
from .metrics import classification_metrics, intersection_union, segmentation_metrics, sentiment_metrics
from .prompts import last_token_state, position_ids, tokenize_prompts

TASKS = ("refseg", "cls", "msa")
DATASETS = {"refseg": ("refcoco", "refcoco+", "refcocog"), "cls": ("food101", "snli-ve"), "msa": ("mosi", "mosei")}
DEFAULT_DATASET = {"refseg": "refcoco", "cls": "food101", "msa": "mosi"}
DEFAULT_SPLITS = {  # (train, eval)
    "refcoco": ("train", "val"),
    "refcoco+": ("train", "val"),
    "refcocog": ("train", "val"),
    "food101": ("train", "test"),
    "snli-ve": ("train", "dev"),
    "mosi": ("train", "valid"),
    "mosei": ("train", "valid"),
}
# the metric that decides "better" for each task, and whether higher is better
SELECTION_METRIC = {"refseg": ("oIoU", True), "cls": ("accuracy", True), "msa": ("mae", False)}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(model_dtype: str, mixed_precision: str) -> torch.dtype:
    """The frozen models' dtype: ``auto`` follows the mixed precision (bf16 / fp16 base weights; else fp32)."""
    if model_dtype == "auto":
        return _DTYPES.get(mixed_precision, torch.float32)
    if model_dtype not in _DTYPES:
        raise ValueError(f"model_dtype must be 'auto' or one of {sorted(_DTYPES)}, got {model_dtype!r}")
    return _DTYPES[model_dtype]


def check_llm_path(model: str | os.PathLike) -> None:
    """ValueError unless ``model`` is ``"smollm2"`` or a directory with a ``config.json``."""
    if str(model) != "smollm2" and not (pathlib.Path(model) / "config.json").is_file():
        raise ValueError(f"--model {model}: expected a Hugging Face model directory with config.json (or 'smollm2')")


def load_llm(model: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The frozen LLM as a bare transformers decoder (``AutoModel``: no LM head; a family :func:`mit.apply_mit`
    supports) and its tokenizer.

    ``model`` is a directory in Hugging Face format (``config.json``, weights, tokenizer files), or ``"smollm2"`` for
    the offline SmolLM2-135M-Instruct of :func:`mit.models.load_smollm2`."""
    from transformers import AutoModel, AutoTokenizer

    if str(model) == "smollm2":
        from ..models import load_smollm2

        causal, tokenizer = load_smollm2(dtype=dtype)
        return causal.model, tokenizer
    check_llm_path(model)
    path = pathlib.Path(model)
    llm = AutoModel.from_pretrained(path, dtype=dtype)
    model_type = getattr(llm.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"--model {path}: MiT supports model types {sorted(FAMILIES)}, got {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return llm, tokenizer


class TaskModel(nn.Module):
    """Base: holds the MiT-infused LLM (a bare decoder model after ``apply_mit``) and computes the task embedding
    (positions counted from each prompt's first real token, so the result does not depend on padding; see
    :func:`mit.prompts.position_ids`)."""

    task: str

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def task_embedding(self, batch: dict[str, Any], modality_embedding: torch.Tensor) -> torch.Tensor:
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


class RefSegModel(TaskModel):
    task = "refseg"

    def __init__(self, llm, encoder: CLIPImageEncoder, decoder: SegmentationDecoder, bce_weight: float = 0.0):
        super().__init__(llm)
        self.encoder, self.decoder, self.bce_weight = encoder, decoder, bce_weight

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        features = self.encoder(images)
        t = self.task_embedding(batch, features.global_embedding)
        logits = self.decoder(t, features.levels, images.shape[-2:])
        out = {"logits": logits}
        if "mask" in batch:
            out["loss"] = segmentation_loss(logits, batch["mask"], self.bce_weight)
        return out


class ClassificationModel(TaskModel):
    task = "cls"

    def __init__(self, llm, encoder: CLIPImageEncoder, head: ClassificationHead) -> None:
        super().__init__(llm)
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features = self.encoder(batch["image"])
        t = self.task_embedding(batch, features.global_embedding)
        logits = self.head(features.global_embedding, t)
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = classification_loss(logits, batch["label"])
        return out


class SentimentModel(TaskModel):
    task = "msa"

    def __init__(self, llm, encoder: SequenceEncoder, head: RegressionHead) -> None:
        super().__init__(llm)
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        embedding = self.encoder(batch["features"], batch["masks"])
        t = self.task_embedding(batch, embedding.to(self.encoder.out[1].weight.dtype))
        score = self.head(t)
        out = {"logits": score}
        if "label" in batch:
            out["loss"] = rmse_loss(score, batch["label"])
        return out


def _pad_sequences(items: list[torch.Tensor]) -> torch.Tensor:
    length = max(x.shape[0] for x in items)
    out = items[0].new_zeros((len(items), length, *items[0].shape[1:]))
    for i, x in enumerate(items):
        out[i, : x.shape[0]] = x
    return out


def make_collate(
    task: str, tokenizer, padding_side: str = "left", max_length: int | None = None
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Batch the dataset items of ``task`` and tokenise their prompts."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = tokenize_prompts(tokenizer, [x["prompt"] for x in items], padding_side, max_length)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "id": [x["id"] for x in items],
        }
        if task in ("refseg", "cls"):
            batch["image"] = torch.stack([x["image"] for x in items])
        if task == "refseg":
            batch["mask"] = torch.stack([x["mask"] for x in items])
            batch["orig_mask"] = [x["orig_mask"] for x in items]
        elif task == "cls":
            batch["label"] = torch.tensor([x["label"] for x in items], dtype=torch.long)
        else:
            names = list(items[0]["features"])
            batch["features"] = {m: _pad_sequences([x["features"][m] for x in items]) for m in names}
            batch["masks"] = {m: _pad_sequences([x["masks"][m] for x in items]) for m in names}
            batch["label"] = torch.tensor([x["label"] for x in items], dtype=torch.float32)
        return batch

    return collate


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch (also inside dicts) to ``device``; lists stay on the CPU."""

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return {k: move(v) for k, v in batch.items()}


def evaluation_records(task: str, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> list[tuple]:
    """Per-sample records that :func:`compute_metrics` turns into the task's metrics.

    refseg: (intersection, union) at the original image resolution (logits resized bilinearly, threshold 0);
    cls: (predicted class, label); msa: (predicted score, label)."""
    logits = out["logits"].float()
    if task == "refseg":
        records = []
        for i, target in enumerate(batch["orig_mask"]):
            resized = F.interpolate(logits[i][None, None], size=target.shape, mode="bilinear", align_corners=False)
            inter, union = intersection_union(resized[0, 0].cpu() > 0, target.cpu())
            records.append((int(inter), int(union)))
        return records
    if task == "cls":
        return list(zip(logits.argmax(-1).cpu().tolist(), batch["label"].cpu().tolist()))
    return list(zip(logits.cpu().tolist(), batch["label"].cpu().tolist()))


def compute_metrics(task: str, records: list[tuple]) -> dict[str, float]:
    if not records:
        raise ValueError("no evaluation records (is the evaluation split empty?)")
    first, second = zip(*records)
    if task == "refseg":
        return segmentation_metrics(list(first), list(second))
    if task == "cls":
        return classification_metrics(list(first), list(second))
    return sentiment_metrics(list(first), list(second))


def build_task_model(
    task: str,
    llm: nn.Module,
    mit_config: MiTConfig,
    *,
    encoder: CLIPImageEncoder | None = None,
    num_classes: int | None = None,
    feature_dims: dict[str, int] | None = None,
    seq_d_model: int = 128,
    seq_layers: int = 3,
    seq_heads: int = 4,
    decoder_hidden: int = 256,
    cls_hidden: int = 512,
    reg_hidden: int = 0,
    dropout: float = 0.1,
    bce_weight: float = 0.0,
) -> TaskModel:
    """Apply MiT to ``llm`` (a LlamaModel; frozen) and attach the encoder and head of ``task``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task in ("refseg", "cls") and encoder is None:
        raise ValueError(f"task {task!r} needs a CLIPImageEncoder (encoder=None given)")
    if task in ("refseg", "cls") and mit_config.modality_dim != encoder.embed_dim:
        raise ValueError(
            f"MiTConfig.modality_dim ({mit_config.modality_dim}) must equal the CLIP embedding size "
            f"({encoder.embed_dim})"
        )
    llm = apply_mit(llm, mit_config)
    hidden = llm.config.hidden_size
    if task == "refseg":
        decoder = SegmentationDecoder(hidden, encoder.width, len(encoder.feature_layers), decoder_hidden)
        return RefSegModel(llm, encoder, decoder, bce_weight)
    if task == "cls":
        if num_classes is None:
            raise ValueError("task 'cls' needs num_classes")
        return ClassificationModel(
            llm, encoder, ClassificationHead(encoder.embed_dim, hidden, num_classes, cls_hidden, dropout)
        )
    if not feature_dims:
        raise ValueError("task 'msa' needs feature_dims, e.g. {'audio': 74, 'vision': 35}")
    sequence = SequenceEncoder(feature_dims, mit_config.modality_dim, seq_d_model, seq_layers, seq_heads, dropout)
    return SentimentModel(llm, sequence, RegressionHead(hidden, reg_hidden, dropout))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (MiT maps, heads, the sequence encoder), by name, detached on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
