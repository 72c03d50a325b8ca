"""``msa``: multimodal sentiment analysis (CMU-MOSI / MOSEI).

:class:`~mit.tuning.encoders.SequenceEncoder` pools the acoustic and facial features into the embedding that is
infused; the task embedding feeds :class:`~mit.tuning.heads.RegressionHead`; RMSE loss; MAE (selects, lower is
better), correlation and the binary / 7-class accuracies."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...utils.settings import setting, validate
from ..encoders import SequenceEncoder
from ..heads import RegressionHead
from ..losses import rmse_loss
from ..metrics import sentiment_metrics
from .base import TaskModel, pad_sequences
from .registry import DatasetSpec, TaskSpec


@dataclasses.dataclass
class SentimentHeads:
    """The settings of ``msa``'s sequence encoder and regression head (section ``heads``)."""

    seq_d_model: int = setting(128, help="sequence encoder width", metavar="N", low=1)
    seq_layers: int = setting(3, help="sequence encoder layers (paper: 3)", metavar="N", low=1)
    seq_heads: int = setting(4, help="sequence encoder attention heads", metavar="N", low=1)
    reg_hidden: int = setting(0, help="regression head hidden size (0 = one linear layer)", metavar="N", low=0)
    dropout: float = setting(0.1, help="dropout in the trainable heads", metavar="P", low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        validate(self)
        if self.seq_d_model % self.seq_heads:
            raise ValueError(
                f"seq_d_model: expected a multiple of seq_heads ({self.seq_heads}), got {self.seq_d_model}"
            )


class SentimentModel(TaskModel):
    def __init__(self, llm, encoder: SequenceEncoder, head: RegressionHead) -> None:
        super().__init__(llm)
        self.encoder, self.head = encoder, head

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``batch["features"][m]`` (B, T_m, F_m) with masks (B, T_m) -> scores (B,); loss against ``label``."""
        embedding = self.encoder(batch["features"], batch["masks"])
        t = self.task_embedding(batch, embedding.to(self.encoder.out[1].weight.dtype))
        score = self.head(t)
        out = {"logits": score}
        if "label" in batch:
            out["loss"] = rmse_loss(score, batch["label"])
        return out


def build_model(llm, mit_config, encoder, dataset, heads: SentimentHeads) -> SentimentModel:
    feature_dims = getattr(dataset, "feature_dims", None)
    if not feature_dims:
        raise ValueError(
            f"dataset: task 'msa' needs feature_dims, e.g. {{'audio': 74, 'vision': 35}}, got {feature_dims}"
        )
    sequence = SequenceEncoder(
        feature_dims, mit_config.modality_dim, heads.seq_d_model, heads.seq_layers, heads.seq_heads, heads.dropout
    )
    return SentimentModel(llm, sequence, RegressionHead(llm.config.hidden_size, heads.reg_hidden, heads.dropout))


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(items[0]["features"])
    return {
        "features": {m: pad_sequences([x["features"][m] for x in items]) for m in names},
        "masks": {m: pad_sequences([x["masks"][m] for x in items]) for m in names},
        "label": torch.tensor([x["label"] for x in items], dtype=torch.float32),
    }


def records(batch: dict[str, Any], out: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
    """(predicted score, label) per sample."""
    return list(zip(out["logits"].float().cpu().tolist(), batch["label"].cpu().tolist()))


def metrics(rows: list[tuple[float, float]]) -> dict[str, float]:
    predicted, labels = zip(*rows)
    return sentiment_metrics(list(predicted), list(labels))


def _mmsa(name: str) -> DatasetSpec:
    def build(data, split, preprocessing, limit):
        from ..data import MSADataset

        return MSADataset(data.root, split, data.feature_file, limit=limit)

    return DatasetSpec(name, ("train", "valid"), build)


SPEC = TaskSpec(
    name="msa",
    description="multimodal sentiment analysis",
    datasets=(_mmsa("mosi"), _mmsa("mosei")),
    selection_metric="mae",
    higher_is_better=False,
    uses_image_encoder=False,
    build_model=build_model,
    head_settings=SentimentHeads,
    collate=collate,
    records=records,
    metrics=metrics,
)
