"""Shared pieces of the dataset adapters: the error type, image loading and CLIP preprocessing."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...utils.safe_pickle import UnsafePickleError, load_pickle
from ..clip import OPENAI_MEAN, OPENAI_STD


class DatasetError(ValueError):
    """A dataset file is missing or not in the expected format; the message names the file and what was expected."""


def require_file(path: str | os.PathLike, expected: str) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {path}: expected {expected}")
    return path


def read_pickle(path: str | os.PathLike, expected: str, *, tensors: bool = False, encoding: str = "ASCII") -> Any:
    """A pickled dataset file, read with :func:`mit.utils.safe_pickle.load_pickle`: containers, strings, numbers and
    numpy arrays (and torch tensors with ``tensors``) only, never code. Every failure is a :class:`DatasetError` that
    names ``path``: the refused global for a file that asks for anything else, else what was ``expected``."""
    try:
        return load_pickle(path, tensors=tensors, encoding=encoding)
    except UnsafePickleError as error:
        raise DatasetError(str(error)) from None
    except Exception as error:  # truncated or corrupt: pickle raises many types (EOFError, UnpicklingError, ...)
        raise DatasetError(f"cannot unpickle {path}: {error}; expected {expected}") from None


def first_existing_dir(candidates: list[pathlib.Path], expected: str) -> pathlib.Path:
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise DatasetError(f"missing image directory: expected {expected} at one of {[str(c) for c in candidates]}")


def load_image(path: str | os.PathLike) -> Image.Image:
    path = require_file(path, "an image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None


def resize_square(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    return image.resize((size, size), resample=resample)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation preprocessing: shortest side to ``size`` (bicubic), then a centred ``size`` x ``size`` crop."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """(3, H, W) float tensor normalised with CLIP's mean and std."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def limit_items(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return items if limit is None else items[:limit]
