"""SNLI-VE (Xie et al. 2018) as distributed: JSON-lines files over Flickr30k images.

    DATA/snli_ve_train.jsonl  DATA/snli_ve_dev.jsonl  DATA/snli_ve_test.jsonl
    DATA/flickr30k_images/<Flikr30kID>          (or DATA/Flickr30K/flickr30k_images/, DATA/images/)

Each line is a JSON object with at least ``Flikr30kID`` (sic, the image file name), ``sentence2`` (the hypothesis) and
``gold_label`` (entailment / neutral / contradiction).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from torch.utils.data import Dataset

from ..image_preprocessing import ImagePreprocessing
from ..prompts import format_prompt
from .common import (
    DatasetError,
    first_existing_dir,
    image_preprocessing,
    limit_items,
    load_image,
    require_file,
)

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
SPLITS = ("train", "dev", "test")


class SNLIVEDataset(Dataset):
    """Items: ``{"image": (3, S, S), "prompt": str, "label": int, "id": str}`` (labels in :data:`SNLI_VE_LABELS`)."""

    classes = SNLI_VE_LABELS

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 336,
        image_dir: str | os.PathLike | None = None,
        template: str = "snli_ve",
        limit: int | None = None,
        *,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        split = "dev" if split in ("val", "valid") else split
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} for SNLI-VE, got {split!r}")
        root = pathlib.Path(root)
        self.image_size, self.template = image_size, template
        self.preprocessing = image_preprocessing(image_size, preprocessing)
        path = require_file(root / f"snli_ve_{split}.jsonl", "SNLI-VE JSON lines (Flikr30kID, sentence2, gold_label)")
        self.image_dir = (
            pathlib.Path(image_dir)
            if image_dir is not None
            else first_existing_dir(
                [root / "flickr30k_images", root / "Flickr30K" / "flickr30k_images", root / "images"],
                "the Flickr30k images",
            )
        )
        index = {label: i for i, label in enumerate(SNLI_VE_LABELS)}
        samples = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, hypothesis, label = record["Flikr30kID"], record["sentence2"], record["gold_label"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DatasetError(
                        f"{path}:{line_number}: expected a JSON object with Flikr30kID, sentence2 and gold_label "
                        f"({type(error).__name__}: {error})"
                    ) from None
                if label not in index:
                    raise DatasetError(f"{path}:{line_number}: gold_label {label!r} is not one of {SNLI_VE_LABELS}")
                samples.append((str(record.get("pairID", line_number)), image, hypothesis, index[label]))
        if not samples:
            raise DatasetError(f"{path}: no samples; expected JSON lines")
        self.samples = limit_items(samples, limit)

    num_classes = len(SNLI_VE_LABELS)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample_id, image, hypothesis, label = self.samples[i]
        return {
            "image": self.preprocessing.crop(load_image(self.image_dir / image)),
            "prompt": format_prompt(self.template, text=hypothesis),
            "label": label,
            "id": sample_id,
        }
