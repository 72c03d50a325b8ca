"""How a picture becomes the CLIP encoder's input: the preprocessing the encoder's weights were trained with.

:class:`ImagePreprocessing` turns a PIL image into a (3, S, S) float tensor in two views:

- :meth:`~ImagePreprocessing.crop` (classification, entailment, captioning): CLIP's evaluation preprocessing, shortest
  side to S, centred S x S crop, rescale to [0, 1], normalise;
- :meth:`~ImagePreprocessing.square` (segmentation): resized to S x S ignoring the aspect ratio (as LAVT does; the
  ground-truth mask is resized the same way, so the two stay aligned), then the same rescale and normalisation.

Where it comes from (:func:`encoder_preprocessing`):

- a transformers checkpoint directory with a ``preprocessor_config.json`` (what ``save_pretrained`` of a CLIP
  processor writes, and what a download of ``openai/clip-vit-large-patch14-336`` holds): transformers' CLIP image
  processor built from that file runs both views (its resize, crop, resampling, mean and std), the same processor
  :class:`mit.ImageEmbedder` uses at inference;
- an open_clip tower: open_clip's own evaluation transforms (``open_clip.image_transform`` with the tower's
  ``preprocess_cfg``);
- otherwise (a randomly initialised tower, or a checkpoint saved without a processor): transformers' CLIP image
  processor with its defaults (OpenAI's resize, crop, mean and std) at the tower's resolution.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .clip import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:
    from PIL import Image

PROCESSOR_FILE = "preprocessor_config.json"


class ImagePreprocessing:
    """PIL image -> (3, size, size) float32 tensor, in the two views of the module docstring.

    Args:
        size: the encoder's input resolution S.
        crop, square: the two views (PIL image -> tensor).
        mean, std: their per-channel normalisation (RGB, on [0, 1] values), for the record.
        source: where the steps come from (shown in errors and logs).
        processor: transformers' CLIP image processor behind both views, when one is.

    Build one with :meth:`from_processor` (transformers' CLIP image processor: a checkpoint's own), :meth:`openai`
    (that processor with its defaults) or :meth:`from_open_clip`.
    """

    def __init__(
        self,
        size: int,
        crop: Callable[[Image.Image], torch.Tensor],
        square: Callable[[Image.Image], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
        processor=None,
    ) -> None:
        _check_size(size)
        self.size, self.crop_view, self.square_view = size, crop, square
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.source, self.processor = source, processor

    @classmethod
    def from_processor(cls, processor, size: int, source: str) -> ImagePreprocessing:
        """Both views through transformers' CLIP image processor ``processor``: ``crop`` is the processor as
        configured (its resize, centre crop, rescale, mean and std), ``square`` the same with an S x S resize and no
        crop. ValueError naming ``source`` when its output is not ``size`` x ``size``."""
        _check_size(size)
        produced = _output_size(processor)
        if produced != (size, size):
            raise ValueError(
                f"{source}: its centre crop is {produced[0]}x{produced[1]} but the encoder takes {size}x{size} "
                "images; the processor does not belong to these weights"
            )

        def crop(image: Image.Image) -> torch.Tensor:
            return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

        def square(image: Image.Image) -> torch.Tensor:
            out = processor(
                images=image.convert("RGB"), size={"height": size, "width": size}, do_center_crop=False,
                return_tensors="pt",
            )  # fmt: skip
            return out["pixel_values"][0]

        return cls(size, crop, square, processor.image_mean, processor.image_std, source, processor)

    @classmethod
    def openai(cls, size: int, source: str = "OpenAI CLIP preprocessing") -> ImagePreprocessing:
        """transformers' CLIP image processor with its defaults (OpenAI's bicubic resize, crop, mean and std) at
        ``size``: what a tower without a ``preprocessor_config.json`` of its own gets."""
        _check_size(size)
        processor = processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls.from_processor(processor, size, source)

    @classmethod
    def from_open_clip(cls, tower: torch.nn.Module, size: int) -> ImagePreprocessing:
        """open_clip's own evaluation transforms for ``tower`` (its ``preprocess_cfg``: mean, std, interpolation,
        resize mode): ``crop`` is ``open_clip.image_transform(..., is_train=False)``, ``square`` the same with
        ``resize_mode="squash"``."""
        from .clip import import_open_clip

        _check_size(size)
        open_clip = import_open_clip()
        config = dict(getattr(tower, "preprocess_cfg", None) or {})
        mean, std = tuple(config.get("mean") or OPENAI_MEAN), tuple(config.get("std") or OPENAI_STD)
        common = {"is_train": False, "mean": mean, "std": std, "interpolation": config.get("interpolation")}
        crop = open_clip.image_transform(size, resize_mode=config.get("resize_mode") or "shortest", **common)
        square = open_clip.image_transform(size, resize_mode="squash", **common)
        return cls(size, lambda image: crop(image.convert("RGB")), lambda image: square(image.convert("RGB")), mean,
                   std, "open_clip image_transform (preprocess_cfg)")  # fmt: skip

    def crop(self, image: Image.Image) -> torch.Tensor:
        """CLIP's evaluation view: shortest side to S, centred S x S crop, normalised. (3, S, S) float32."""
        return self.crop_view(image)

    def square(self, image: Image.Image) -> torch.Tensor:
        """The segmentation view: S x S ignoring the aspect ratio, normalised. (3, S, S) float32."""
        return self.square_view(image)

    def __repr__(self) -> str:
        return f"ImagePreprocessing(size={self.size}, source={self.source!r})"


def _check_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1 (the encoder's input resolution), got {size!r}")


def _output_size(processor) -> tuple[int, int]:
    """(height, width) of what the processor produces: its centre crop, or its resize when it does not crop."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", True) else None
    crop = crop if crop is not None else processor.size
    if isinstance(crop, dict):
        if "height" in crop:
            return int(crop["height"]), int(crop["width"])
        edge = crop.get("shortest_edge")
        return int(edge), int(edge)
    return int(getattr(crop, "height", crop)), int(getattr(crop, "width", crop))


def processor_class():
    """transformers' CLIP image processor class: the PIL one where torchvision is missing (transformers >= 5.2x would
    otherwise warn and fall back to it on every load), else ``CLIPImageProcessor``."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def load_processor(directory: str | os.PathLike):
    """transformers' CLIP image processor from ``directory``'s ``preprocessor_config.json`` (the PIL implementation
    where torchvision is missing), or None when the directory has no such file."""
    path = pathlib.Path(directory)
    if not (path / PROCESSOR_FILE).is_file():
        return None
    try:
        return processor_class().from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / PROCESSOR_FILE}: cannot be loaded as a CLIP image processor ({error})") from error


def encoder_preprocessing(
    backend: str, pretrained: str | os.PathLike | None, tower: torch.nn.Module, size: int
) -> ImagePreprocessing:
    """The preprocessing of a CLIP tower built by :func:`mit.tuning.clip.build_clip_visual` (see the module
    docstring): ``tower`` is the library's own module (open_clip's ``visual``), ``size`` its input resolution."""
    if backend == "open_clip":
        return ImagePreprocessing.from_open_clip(tower, size)
    if pretrained is not None:
        processor = load_processor(pretrained)
        if processor is not None:
            return ImagePreprocessing.from_processor(processor, size, str(pathlib.Path(pretrained) / PROCESSOR_FILE))
        return ImagePreprocessing.openai(size, f"OpenAI CLIP preprocessing ({pretrained} has no {PROCESSOR_FILE})")
    return ImagePreprocessing.openai(size)
