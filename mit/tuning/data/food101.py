"""UPMC-Food101 (Wang et al. 2015) as distributed: recipe titles in CSV files and images per class.

    DATA/texts/train_titles.csv     rows: image_name,text,label   (no header; e.g. apple_pie_0.jpg,"...",apple_pie)
    DATA/texts/test_titles.csv
    DATA/images/train/<label>/<image_name>
    DATA/images/test/<label>/<image_name>

The classes are the sorted labels of ``train_titles.csv`` (101), so train and test share ids.
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Any

from torch.utils.data import Dataset

from ..image_preprocessing import ImagePreprocessing
from ..prompts import format_prompt
from .common import DatasetError, image_preprocessing, limit_items, load_image, require_file

SPLITS = ("train", "test")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_titles(path: pathlib.Path) -> list[tuple[str, str, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise DatasetError(f"{path}:{line_number}: expected 3 columns image_name,text,label, got {len(row)}")
            if line_number == 1 and not row[0].lower().endswith(_IMAGE_EXTENSIONS):
                continue  # a header row
            rows.append((row[0], row[1], row[2]))
    if not rows:
        raise DatasetError(f"{path}: no rows; expected image_name,text,label lines")
    return rows


class Food101Dataset(Dataset):
    """Items: ``{"image": (3, S, S), "prompt": str, "label": int, "id": str}``; ``classes`` lists the label names."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 336,
        template: str = "food101",
        limit: int | None = None,
        *,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} for UPMC-Food101, got {split!r}")
        root = pathlib.Path(root)
        self.image_size, self.template = image_size, template
        self.preprocessing = image_preprocessing(image_size, preprocessing)
        expected = "UPMC-Food101 titles CSV (image_name,text,label)"
        rows = read_titles(require_file(root / "texts" / f"{split}_titles.csv", expected))
        train_csv = root / "texts" / "train_titles.csv"
        label_rows = rows if split == "train" or not train_csv.is_file() else read_titles(train_csv)
        self.classes = sorted({label for _, _, label in label_rows})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({label for _, _, label in rows} - set(index))
        if unknown:
            raise DatasetError(f"{root / 'texts' / f'{split}_titles.csv'}: labels {unknown[:5]} are not in {train_csv}")
        self.image_dir = root / "images" / split
        if not self.image_dir.is_dir():
            raise DatasetError(f"missing image directory {self.image_dir}: expected images/{split}/<label>/<image>")
        self.samples = limit_items([(name, text, index[label], label) for name, text, label in rows], limit)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, text, label, label_name = self.samples[i]
        image = load_image(self.image_dir / label_name / name)
        return {
            "image": self.preprocessing.crop(image),
            "prompt": format_prompt(self.template, text=text),
            "label": label,
            "id": name,
        }
