"""MMUD (the neural-tuning authors' Multimodal Understanding Dataset) in its published format.

Read from the authors' loader (kiva12138/NeuralTuning, ``MMUD/MMUDDataLoader.py`` and ``Codes/Dataset.py``): the root
holds ``train.pkl`` / ``valid.pkl`` / ``test.pkl``, each a pickled list of 12-tuples

``(image_path, caption, enriched_text, sample_texts, sample_masks, sample_boxs, sample_height, sample_width,
sample_category, sample_category_text, caption_len, enriched_text_len)``

- ``image_path``: a (possibly Windows) path whose last component names the image in the image directory
  (``MergedImages/`` in the authors' setup; ``images/`` is also accepted, or ``--image-dir``);
- ``enriched_text``: ``"##Question: ... <SEP> ... <LCL-1> ... <LCL-2> ..."`` where ``<LCL-i>`` tags refer to object i;
- ``sample_texts``: per object, a list of short descriptions; ``sample_masks``: per object, a COCO polygon (a flat
  list of floats ``[x1, y1, x2, y2, ...]``) or, for the RefClef images, COCO RLE (a dict or a list of dicts);
- the text-to-image target of an image is ``CLIPGENFeatureUN/<image name>.pkl`` (a pickled CLIP image embedding,
  512 values in the authors' files; their loader ``torch.stack``s them, so a torch tensor; a numpy array is accepted).

Every file is read with :mod:`mit.utils.safe_pickle`: the records may hold containers, strings, numbers and numpy
arrays, the embeddings also torch tensors; a file that asks for anything else is refused without running it.

The ``*_withlength.pkl`` names of the authors' training code are accepted too. Items keep the record's fields (the
tasks' prompts are built by :mod:`mit.tuning.tasks.multitask`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..image_preprocessing import ImagePreprocessing
from .common import DatasetError, first_existing_dir, image_preprocessing, limit_items, load_image, read_pickle
from .refcoco import decode_rle, polygons_to_mask

SPLITS = ("train", "valid", "test")
FIELDS = (
    "image_path",
    "caption",
    "enriched_text",
    "sample_texts",
    "sample_masks",
    "sample_boxs",
    "sample_height",
    "sample_width",
    "sample_category",
    "sample_category_text",
    "caption_len",
    "enriched_text_len",
)
FEATURE_DIR = "CLIPGENFeatureUN"


def object_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One MMUD object mask as a (height, width) bool array: a flat COCO polygon, an RLE dict or a list of RLEs."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation)
    if isinstance(segmentation, (list, tuple)) and segmentation:
        if all(isinstance(v, (int, float)) for v in segmentation):
            return polygons_to_mask([list(segmentation)], height, width)
        if all(isinstance(v, dict) for v in segmentation):
            return np.logical_or.reduce([decode_rle(r) for r in segmentation])
        if all(isinstance(v, (list, tuple)) for v in segmentation):
            return polygons_to_mask([list(p) for p in segmentation], height, width)
    raise ValueError(
        f"expected a flat polygon [x1, y1, ...], an RLE dict or a list of RLE dicts, got {str(segmentation)[:80]}"
    )


def image_name(image_path: str) -> str:
    """The file name of an MMUD ``image_path`` (Windows or POSIX separators)."""
    return str(image_path).replace("\\", "/").split("/")[-1]


class MMUDDataset(Dataset):
    """One item per MMUD record of ``split``.

    Items: ``{"id": str, "image": (3, S, S) CLIP-normalised, "caption": str, "enriched_text": str,
    "object_texts": list[list[str]], "masks": (K, S, S) float (K objects, nearest-resized), "glb_target": (D,) float}``
    with ``S = image_size``."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 224,
        image_dir: str | os.PathLike | None = None,
        feature_dir: str | os.PathLike | None = None,
        limit: int | None = None,
        *,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)} for MMUD, got {split!r}")
        root = pathlib.Path(root)
        candidates = [root / f"{split}.pkl", root / f"{split}_withlength.pkl"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetError(f"missing MMUD split file: expected one of {[str(p) for p in candidates]}")
        records = read_pickle(path, "a list of MMUD 12-tuples")
        if not isinstance(records, list):
            raise DatasetError(f"{path}: expected a pickled list of MMUD records, got {type(records).__name__}")
        for i, record in enumerate(records):
            if not isinstance(record, (list, tuple)) or len(record) != len(FIELDS):
                raise DatasetError(
                    f"{path}: record {i} is not a {len(FIELDS)}-tuple {FIELDS}, got {type(record).__name__} of "
                    f"length {len(record) if isinstance(record, (list, tuple)) else '-'}"
                )
            if len(record[3]) != len(record[4]):
                raise DatasetError(
                    f"{path}: record {i} has {len(record[3])} sample_texts but {len(record[4])} sample_masks; "
                    "expected one per object"
                )
        self.path, self.image_size = path, image_size
        self.preprocessing = image_preprocessing(image_size, preprocessing)
        self.records = limit_items([dict(zip(FIELDS, r)) for r in records], limit)
        self.image_dir = (
            pathlib.Path(image_dir)
            if image_dir is not None
            else first_existing_dir([root / "MergedImages", root / "images"], "the MMUD images")
        )
        self.feature_dir = pathlib.Path(feature_dir) if feature_dir is not None else root / FEATURE_DIR

    def __len__(self) -> int:
        return len(self.records)

    def glb_target(self, name: str) -> torch.Tensor:
        """(D,) float32: the CLIP image embedding the ``<GLB>`` state regresses onto."""
        path = self.feature_dir / f"{name}.pkl"
        if not path.is_file():
            raise DatasetError(f"missing text-to-image target {path}: expected a pickled CLIP embedding")
        value = read_pickle(path, "a pickled CLIP embedding (a torch tensor or numpy array)", tensors=True)
        if isinstance(value, torch.Tensor):
            value = value.detach()
        try:
            target = torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DatasetError(
                f"{path}: expected a CLIP embedding (a torch tensor or numpy array of floats), got "
                f"{type(value).__name__} ({error})"
            ) from None
        if not torch.isfinite(target).all():
            raise DatasetError(f"{path}: the embedding has non-finite values")
        return target

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        name = image_name(record["image_path"])
        image = load_image(self.image_dir / name)
        height, width = int(record["sample_height"]), int(record["sample_width"])
        masks = []
        for k, segmentation in enumerate(record["sample_masks"]):
            try:
                mask = object_mask(segmentation, height, width)
            except (ValueError, KeyError, TypeError) as error:
                raise DatasetError(f"{self.path}: record {index} object {k}: unreadable mask ({error})") from None
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (self.image_size,) * 2, Image.Resampling.NEAREST
            )
            masks.append(torch.from_numpy(np.asarray(small) > 127).float())
        texts = [[t] if isinstance(t, str) else list(t) for t in record["sample_texts"]]
        return {
            "id": f"{index}:{name}",
            "image": self.preprocessing.square(image),
            "caption": str(record["caption"]),
            "enriched_text": str(record["enriched_text"]),
            "object_texts": texts,
            "masks": torch.stack(masks) if masks else torch.zeros(0, self.image_size, self.image_size),
            "glb_target": self.glb_target(name),
        }
