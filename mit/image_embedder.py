"""From pictures to the modality embedding MiT infuses: a CLIP checkpoint's own preprocessing and vision tower.

    embedder = mit.ImageEmbedder.from_pretrained("clip-vit-large-patch14-336/")   # a local CLIP checkpoint
    emb = embedder(["cat.jpg", "dog.png"])                      # (2, 768): CLIP's projected image embedding
    out = model(input_ids, attention_mask=mask, modality_embedding=emb)
    emb, levels = embedder(images, feature_layers=[7, 15, 23])  # + block outputs (B, width, gh, gw), as the
                                                                # segmentation decoder takes them

The preprocessing is transformers' ``CLIPImageProcessor`` built from the checkpoint's own
``preprocessor_config.json`` (resize, centre crop, rescale, the checkpoint's mean and std), so it is whatever the
weights were trained with, not a copy of OpenAI's constants; the tower is ``CLIPVisionModelWithProjection`` (a whole
CLIP checkpoint, such as a download of ``openai/clip-vit-large-patch14-336``, or a vision tower alone: the text tower
is not loaded). Everything is local (``local_files_only``): nothing is downloaded.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from .tuning.image_preprocessing import processor_class

ImageInput = Any  # a PIL image, a path (str / os.PathLike), or an (H, W, 3) / (H, W) uint8 numpy array


def _as_pil(image: ImageInput, index: int):
    """One image as an RGB PIL image; ValueError naming ``images[index]`` for anything else."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image)
        if not path.is_file():
            raise ValueError(f"images[{index}]: {str(path)!r} is not a file")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as error:
            raise ValueError(f"images[{index}]: cannot read {str(path)!r} as an image ({error})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(
                f"images[{index}]: expected an (H, W) or (H, W, 3) uint8 array, got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    raise ValueError(
        f"images[{index}]: expected a PIL image, a path or a uint8 numpy array, got {type(image).__name__}"
    )


class ImageEmbedder:
    """A CLIP checkpoint's image processor and vision tower (with projection), frozen, in eval mode.

    Attributes: ``processor`` (transformers' CLIP image processor), ``tower`` (``CLIPVisionModelWithProjection``),
    ``embedding_dim`` (what ``MiTConfig.modality_dim`` must be), ``width`` and ``num_layers`` of the tower,
    ``grid_size`` (gh, gw) of its patch tokens."""

    def __init__(self, processor, tower: torch.nn.Module) -> None:
        from .tuning.clip import CLIPVisual  # the block outputs as the tuning framework's decoders take them

        self.processor, self.tower = processor, tower.eval().requires_grad_(False)
        self.visual = CLIPVisual(self.tower, "transformers")
        self.embedding_dim, self.width = self.visual.embed_dim, self.visual.width
        self.num_layers, self.grid_size = self.visual.num_layers, self.visual.grid_size

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ImageEmbedder:
        """Load from a local Hugging Face CLIP checkpoint directory: ``config.json`` + weights (a whole CLIP model or
        a vision tower) and the ``preprocessor_config.json`` saved with them. ValueError naming ``path`` when a file
        is missing or cannot be loaded."""
        from transformers import CLIPVisionModelWithProjection

        directory = pathlib.Path(path)
        for name in ("config.json", "preprocessor_config.json"):
            if not (directory / name).is_file():
                raise ValueError(
                    f"path: {str(directory)!r} has no {name}; expected a local Hugging Face CLIP checkpoint directory "
                    "(e.g. a download of openai/clip-vit-large-patch14-336, whose preprocessor_config.json gives the "
                    "image preprocessing its weights were trained with)"
                )
        try:
            processor = processor_class().from_pretrained(str(directory), local_files_only=True)
            tower = CLIPVisionModelWithProjection.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"path: {str(directory)!r}: cannot load the CLIP checkpoint ({error})") from error
        return cls(processor, tower.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, 3, H, W) float32: ``images`` through the checkpoint's processor (on CPU)."""
        pil = [_as_pil(image, i) for i, image in enumerate(images)]
        return self.processor(images=pil, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 32,
        feature_layers: Sequence[int] | None = None,
        progress: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The projected image embeddings (N, embedding_dim) of ``images`` (one image or a sequence), computed
        ``batch_size`` at a time, in the tower's dtype and on its device. With ``feature_layers`` (block indices,
        0-based), also each block's output with the class token removed, as (N, width, gh, gw): the multi-level
        features a segmentation decoder takes."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("images: expected at least one image, got an empty sequence")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        layers = list(feature_layers) if feature_layers is not None else []
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"feature_layers: expected block indices in [0, {self.num_layers}), got {bad}")
        starts = range(0, len(batch), batch_size)
        if progress:
            from .utils.progress import progress_bar

            starts = progress_bar(starts, desc="embedding images", unit="batch")
        embeddings, levels = [], [[] for _ in layers]
        for start in starts:
            pixels = self.pixel_values(batch[start : start + batch_size]).to(self.device, self.dtype)
            if not layers:  # no hidden states kept: they would hold every block's output for the batch
                embeddings.append(self.tower(pixel_values=pixels).image_embeds)
                continue
            embedding, blocks = self.visual(pixels, layers)
            embeddings.append(embedding)
            for slot, block in enumerate(blocks):
                levels[slot].append(block)
        embedding = torch.cat(embeddings)
        if not layers:
            return embedding
        return embedding, [torch.cat(level) for level in levels]


__all__ = ["ImageEmbedder"]
