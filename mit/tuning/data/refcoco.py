"""RefCOCO, RefCOCO+ and RefCOCOg (G-Ref) in the layout of the ``refer`` toolkit (Yu et al. 2016; LAVT, CRIS).

    DATA/refcoco/refs(unc).p        DATA/refcoco/instances.json
    DATA/refcoco+/refs(unc).p       DATA/refcoco+/instances.json
    DATA/refcocog/refs(umd).p       DATA/refcocog/instances.json      (refs(google).p for the Google split)
    DATA/images/train2014/COCO_train2014_000000xxxxxx.jpg             (or refer's DATA/images/mscoco/images/train2014)

``refs(*).p`` is a pickled list of refs ``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", ...}]}``;
``instances.json`` holds COCO's ``images`` and ``annotations`` (polygon or RLE ``segmentation``). Every sentence of
every ref of the split is one sample. Masks are rasterised without pycocotools (polygons with PIL, RLE decoded here).
The refs are read with :mod:`mit.utils.safe_pickle` (containers, strings, numbers, numpy arrays; nothing else).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..image_preprocessing import ImagePreprocessing
from ..prompts import format_prompt
from .common import (
    DatasetError,
    first_existing_dir,
    image_preprocessing,
    limit_items,
    load_image,
    read_pickle,
    require_file,
)

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` into a (height, width) bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:
            draw.polygon([(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _rle_counts_from_string(text: str) -> list[int]:
    """COCO's compressed RLE string (pycocotools' ``rleFrString``) -> run lengths."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE ``{"size": [h, w], "counts": list or compressed string}`` -> (h, w) bool mask (column-major runs)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _rle_counts_from_string(counts)
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in counts:
        if value:
            flat[position : position + run] = True
        position += run
        value = not value
    return flat.reshape(width, height).T


def annotation_mask(annotation: dict[str, Any], height: int, width: int) -> np.ndarray:
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict):
        return decode_rle(segmentation)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


class RefCOCODataset(Dataset):
    """One sample per (ref, sentence) of ``split``.

    Items: ``{"image": (3, S, S) CLIP-normalised, "mask": (S, S) float, "orig_mask": (h, w) bool, "prompt": str,
    "id": str}`` with ``S = image_size``; images are resized to a square ignoring aspect (as LAVT does) and the
    original-resolution mask is kept for evaluation."""

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str = "refcoco",
        split: str = "train",
        split_by: str | None = None,
        image_size: int = 336,
        image_dir: str | os.PathLike | None = None,
        template: str = "refseg",
        limit: int | None = None,
        *,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {dataset!r}")
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        if (dataset, split_by) not in SPLITS:
            raise ValueError(
                f"split_by {split_by!r} is not published for {dataset}; expected one of "
                f"{[s for d, s in SPLITS if d == dataset]}"
            )
        if split not in SPLITS[dataset, split_by]:
            raise ValueError(
                f"split must be one of {SPLITS[dataset, split_by]} for {dataset} ({split_by}), got {split!r}"
            )
        root = pathlib.Path(root)
        self.image_size, self.template = image_size, template
        self.preprocessing = image_preprocessing(image_size, preprocessing)
        refs_path = require_file(
            root / dataset / f"refs({split_by}).p", f"the {dataset} refs pickle of the refer toolkit"
        )
        instances_path = require_file(root / dataset / "instances.json", "COCO-format instances of the refer toolkit")
        self.image_dir = (
            pathlib.Path(image_dir)
            if image_dir is not None
            else first_existing_dir(
                [
                    root / "images" / "train2014",
                    root / "images" / "mscoco" / "images" / "train2014",
                    root / "train2014",
                ],
                "the COCO train2014 images",
            )
        )
        refs = read_pickle(refs_path, "a list of refer refs", encoding="latin1")  # refer's are Python 2 pickles
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise DatasetError(f"{refs_path}: expected a pickled list of ref dicts, got {type(refs).__name__}")
        try:
            instances = json.loads(instances_path.read_text())
            self.images = {int(im["id"]): im for im in instances["images"]}
            self.annotations = {int(a["id"]): a for a in instances["annotations"]}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(
                f"{instances_path}: expected COCO JSON with 'images' (id, file_name, height, width) and "
                f"'annotations' (id, segmentation); {type(error).__name__}: {error}"
            ) from None
        samples = []
        for ref in refs:
            try:
                if ref["split"] != split:
                    continue
                ann_id, image_id = int(ref["ann_id"]), int(ref["image_id"])
                sentences = [s["sent"] for s in ref["sentences"]]
            except (KeyError, TypeError) as error:
                raise DatasetError(
                    f"{refs_path}: ref {ref.get('ref_id')} lacks {error}; expected keys ann_id, image_id, split, "
                    "sentences[].sent"
                ) from None
            if ann_id not in self.annotations or image_id not in self.images:
                raise DatasetError(
                    f"{instances_path}: no annotation {ann_id} / image {image_id} of ref {ref.get('ref_id')}"
                )
            for j, sentence in enumerate(sentences):
                samples.append((f"{ref.get('ref_id')}-{j}", image_id, ann_id, sentence))
        self.samples = limit_items(samples, limit)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, image_id, ann_id, sentence = self.samples[index]
        info = self.images[image_id]
        image = load_image(self.image_dir / info["file_name"])
        height, width = int(info["height"]), int(info["width"])
        try:
            mask = annotation_mask(self.annotations[ann_id], height, width)
        except (KeyError, ValueError, TypeError) as error:
            raise DatasetError(f"instances.json: annotation {ann_id} has an unreadable segmentation: {error}") from None
        if image.size != (width, height):
            raise DatasetError(
                f"{self.image_dir / info['file_name']} is {image.size[0]}x{image.size[1]}, instances.json says "
                f"{width}x{height}"
            )
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.image_size,) * 2, Image.Resampling.NEAREST)
        return {
            "image": self.preprocessing.square(image),
            "mask": torch.from_numpy(np.asarray(small) > 127).float(),
            "orig_mask": torch.from_numpy(mask),
            "prompt": format_prompt(self.template, description=sentence),
            "id": sample_id,
        }
