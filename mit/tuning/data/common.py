"""Shared pieces of the dataset adapters: the error type, file and image loading, the image preprocessing."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from PIL import Image

from ...utils.safe_pickle import UnsafePickleError, load_pickle
from ..image_preprocessing import ImagePreprocessing


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


def image_preprocessing(image_size: int, preprocessing: ImagePreprocessing | None) -> ImagePreprocessing:
    """A dataset's preprocessing: the encoder's (``preprocessing``, whose size must be ``image_size``), or OpenAI's CLIP
    preprocessing at ``image_size`` when None."""
    if preprocessing is None:
        return ImagePreprocessing.openai(image_size)
    if not isinstance(preprocessing, ImagePreprocessing):
        raise ValueError(f"preprocessing: expected an ImagePreprocessing or None, got {type(preprocessing).__name__}")
    if preprocessing.size != image_size:
        raise ValueError(
            f"preprocessing: its size is {preprocessing.size} ({preprocessing.source}) but image_size is {image_size}"
        )
    return preprocessing


def limit_items(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return items if limit is None else items[:limit]
