"""``refseg``: referring image segmentation (RefCOCO / RefCOCO+ / RefCOCOg).

CLIP's global image embedding is infused; the task embedding and CLIP's multi-level features feed
:class:`~mit.tuning.heads.SegmentationDecoder`; DICE (+ optional BCE) loss; overall and mean IoU (oIoU selects)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn import functional as F

from ...utils.settings import setting, validate
from ..heads import SegmentationDecoder
from ..losses import segmentation_loss
from ..metrics import intersection_union, segmentation_metrics
from .base import TaskModel
from .registry import DatasetSpec, TaskSpec


@dataclasses.dataclass
class RefSegHeads:
    """The head settings of ``refseg`` (section ``heads``)."""

    decoder_hidden: int = setting(256, help="mask decoder channels", metavar="N", low=1)
    bce_weight: float = setting(0.0, help="weight of a BCE term added to the DICE loss (paper: 0)", metavar="W", low=0)

    def __post_init__(self) -> None:
        validate(self)


class RefSegModel(TaskModel):
    def __init__(self, llm, encoder, decoder: SegmentationDecoder, bce_weight: float = 0.0) -> None:
        super().__init__(llm)
        self.encoder, self.decoder, self.bce_weight = encoder, decoder, bce_weight

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``batch["image"]`` (B, 3, S, S) -> logits (B, S, S); loss against ``batch["mask"]`` (B, S, S)."""
        images = batch["image"]
        features = self.encoder(images)
        t = self.task_embedding(batch, features.global_embedding)
        logits = self.decoder(t, features.levels, images.shape[-2:])
        out = {"logits": logits}
        if "mask" in batch:
            out["loss"] = segmentation_loss(logits, batch["mask"], self.bce_weight)
        return out


def build_model(llm, mit_config, encoder, dataset, heads: RefSegHeads) -> RefSegModel:
    decoder = SegmentationDecoder(
        llm.config.hidden_size, encoder.width, len(encoder.feature_layers), heads.decoder_hidden
    )
    return RefSegModel(llm, encoder, decoder, heads.bce_weight)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([x["image"] for x in items]),
        "mask": torch.stack([x["mask"] for x in items]),
        "orig_mask": [x["orig_mask"] for x in items],
    }


def records(batch: dict[str, Any], out: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(intersection, union) per sample at the original image resolution (logits resized bilinearly, threshold 0)."""
    logits = out["logits"].float()
    result = []
    for i, target in enumerate(batch["orig_mask"]):
        resized = F.interpolate(logits[i][None, None], size=target.shape, mode="bilinear", align_corners=False)
        inter, union = intersection_union(resized[0, 0].cpu() > 0, target.cpu())
        result.append((int(inter), int(union)))
    return result


def metrics(rows: list[tuple[int, int]]) -> dict[str, float]:
    inter, union = zip(*rows)
    return segmentation_metrics(list(inter), list(union))


def _refcoco(name: str) -> DatasetSpec:
    def build(data, split, preprocessing, limit):
        from ..data import RefCOCODataset

        return RefCOCODataset(
            data.root, name, split, data.split_by, preprocessing.size, data.image_dir, limit=limit,
            preprocessing=preprocessing,
        )  # fmt: skip

    return DatasetSpec(name, ("train", "val"), build)


SPEC = TaskSpec(
    name="refseg",
    description="referring segmentation",
    datasets=(_refcoco("refcoco"), _refcoco("refcoco+"), _refcoco("refcocog")),
    selection_metric="oIoU",
    higher_is_better=True,
    uses_image_encoder=True,
    build_model=build_model,
    head_settings=RefSegHeads,
    collate=collate,
    records=records,
    metrics=metrics,
)
