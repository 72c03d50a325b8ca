"""``cls``: image-text classification (UPMC-Food101, SNLI-VE).

CLIP's global image embedding is infused; ``[image embedding ; task embedding]`` feeds
:class:`~mit.tuning.heads.ClassificationHead`; cross-entropy; accuracy (selects) and macro F1."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...utils.settings import setting, validate
from ..heads import ClassificationHead
from ..losses import classification_loss
from ..metrics import classification_metrics
from .base import TaskModel
from .registry import DatasetSpec, TaskSpec


@dataclasses.dataclass
class ClassificationHeads:
    """The head settings of ``cls`` (section ``heads``, flags ``--cls-hidden`` / ``--dropout``)."""

    cls_hidden: int = setting(512, help="classification head hidden size", metavar="N", low=1)
    dropout: float = setting(0.1, help="dropout in the trainable heads", metavar="P", low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        validate(self)


class ClassificationModel(TaskModel):
    def __init__(self, llm, encoder, head: ClassificationHead) -> None:
        super().__init__(llm)
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``batch["image"]`` (B, 3, S, S) -> logits (B, num_classes); loss against ``batch["label"]`` (B,)."""
        features = self.encoder(batch["image"])
        t = self.task_embedding(batch, features.global_embedding)
        logits = self.head(features.global_embedding, t)
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = classification_loss(logits, batch["label"])
        return out


def build_model(llm, mit_config, encoder, dataset, heads: ClassificationHeads) -> ClassificationModel:
    num_classes = getattr(dataset, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"dataset: task 'cls' needs a dataset with num_classes >= 2, got {num_classes!r}")
    head = ClassificationHead(encoder.embed_dim, llm.config.hidden_size, num_classes, heads.cls_hidden, heads.dropout)
    return ClassificationModel(llm, encoder, head)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([x["image"] for x in items]),
        "label": torch.tensor([x["label"] for x in items], dtype=torch.long),
    }


def records(batch: dict[str, Any], out: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(predicted class, label) per sample."""
    return list(zip(out["logits"].float().argmax(-1).cpu().tolist(), batch["label"].cpu().tolist()))


def metrics(rows: list[tuple[int, int]]) -> dict[str, float]:
    predicted, labels = zip(*rows)
    return classification_metrics(list(predicted), list(labels))


def _build_food101(data, split, preprocessing, limit):
    from ..data import Food101Dataset

    return Food101Dataset(data.root, split, preprocessing.size, limit=limit, preprocessing=preprocessing)


def _build_snli_ve(data, split, preprocessing, limit):
    from ..data import SNLIVEDataset

    return SNLIVEDataset(data.root, split, preprocessing.size, data.image_dir, limit=limit, preprocessing=preprocessing)


SPEC = TaskSpec(
    name="cls",
    description="image-text classification",
    datasets=(
        DatasetSpec("food101", ("train", "test"), _build_food101),
        DatasetSpec("snli-ve", ("train", "dev"), _build_snli_ve),
    ),
    selection_metric="accuracy",
    higher_is_better=True,
    uses_image_encoder=True,
    build_model=build_model,
    head_settings=ClassificationHeads,
    collate=collate,
    records=records,
    metrics=metrics,
)
