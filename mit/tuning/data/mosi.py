"""CMU-MOSI / CMU-MOSEI as the feature pickles of the MMSA toolkit (Self-MM, MMIM, ... distribute these):

    DATA/aligned_50.pkl     word-aligned, 50 steps per modality
    DATA/unaligned_50.pkl   unaligned (MOSI: audio 375 x 5, vision 500 x 20; MOSEI: audio 500 x 74, vision 500 x 35)

Each is a pickled dict ``{"train" | "valid" | "test": {...}}`` whose split dicts hold ``raw_text`` (N strings),
``audio`` (N, Ta, Fa), ``vision`` (N, Tv, Fv) and ``regression_labels`` (N,) in [-3, 3]; unaligned files also have
``audio_lengths`` / ``vision_lengths``. The LLM reads ``raw_text``; the pre-extracted text features are not used.
MulT's older GloVe-only pickles have no raw text and are refused. Without lengths, a frame is real when it is not all
zeros (aligned files are zero-padded); -inf / NaN values in the acoustic features are replaced by 0. The file is read
with :mod:`mit.utils.safe_pickle` (containers, strings, numbers and numpy arrays only; anything else is refused).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..prompts import format_prompt
from .common import DatasetError, limit_items, read_pickle

SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}
FEATURE_FILES = ("unaligned_50.pkl", "aligned_50.pkl")
MODALITIES = ("audio", "vision")


def find_feature_file(root: str | os.PathLike, feature_file: str | None = None) -> pathlib.Path:
    root = pathlib.Path(root)
    if root.is_file():
        return root
    names = (feature_file,) if feature_file else FEATURE_FILES
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"missing file: expected an MMSA feature pickle {' or '.join(names)} in {root}")


class MSADataset(Dataset):
    """Items: ``{"features": {"audio": (Ta, Fa), "vision": (Tv, Fv)}, "masks": {...: (T,) bool}, "prompt": str,
    "label": float, "id": str}``. ``feature_dims`` gives each modality's feature size."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        feature_file: str | None = None,
        template: str = "msa",
        limit: int | None = None,
    ) -> None:
        if split not in SPLIT_ALIASES:
            raise ValueError(f"split must be one of {sorted(SPLIT_ALIASES)}, got {split!r}")
        key = SPLIT_ALIASES[split]
        path = find_feature_file(root, feature_file)
        self.path, self.template = path, template
        data = read_pickle(path, "MMSA's feature pickle")
        if not isinstance(data, dict) or key not in data or not isinstance(data[key], dict):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DatasetError(f"{path}: expected a dict with a {key!r} split dict, found {found}")
        part = data[key]
        if "raw_text" not in part:
            raise DatasetError(
                f"{path} [{key}]: no 'raw_text'; the LLM needs the transcripts (MMSA's aligned_50.pkl / "
                "unaligned_50.pkl have them; MulT's GloVe-only pickles do not)"
            )
        label_key = "regression_labels" if "regression_labels" in part else "labels" if "labels" in part else None
        missing = [k for k in MODALITIES if k not in part] + ([] if label_key else ["regression_labels"])
        if missing:
            raise DatasetError(
                f"{path} [{key}]: missing {missing}; expected raw_text, audio, vision, regression_labels"
            )
        texts = [str(t) for t in part["raw_text"]]
        labels = np.asarray(part[label_key], dtype=np.float32).reshape(len(texts), -1)[:, 0]
        self.features: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            array = np.asarray(part[m], dtype=np.float32)
            if array.ndim != 3 or array.shape[0] != len(texts):
                raise DatasetError(f"{path} [{key}]: {m} must be (N={len(texts)}, T, F), got {array.shape}")
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
            lengths = part.get(f"{m}_lengths")
            if lengths is not None:
                lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
                mask = np.arange(array.shape[1])[None, :] < lengths[:, None]
            else:
                mask = np.abs(array).sum(-1) > 0
            mask[~mask.any(axis=1), 0] = True  # at least one frame per sample
            self.features[m], self.masks[m] = array, mask
        ids = [str(i) for i in part.get("id", range(len(texts)))]
        self.samples = limit_items(list(range(len(texts))), limit)
        self.texts, self.labels, self.ids = texts, labels, ids

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: int(a.shape[-1]) for m, a in self.features.items()}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.samples[i]
        return {
            "features": {m: torch.from_numpy(self.features[m][j]) for m in MODALITIES},
            "masks": {m: torch.from_numpy(self.masks[m][j]) for m in MODALITIES},
            "prompt": format_prompt(self.template, text=self.texts[j]),
            "label": float(self.labels[j]),
            "id": self.ids[j],
        }
