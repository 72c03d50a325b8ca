"""The four digit tasks' data: captions, two-digit canvases and their half masks, the validation split,
the task groups of each variant."""

from __future__ import annotations

import torch
from torch import nn

from mit.demo.digits import DigitsSplit

from .config import IMAGE_TASKS, TASKS, VARIANTS, WORDS


def caption_text(digit: int) -> str:
    return f"a handwritten {WORDS[digit]}"


def make_canvases(
    split: DigitsSplit, count: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` canvases of two different digits side by side. Returns pixels (N, 2, 64) (left, right), their digits
    (N, 2), and, for "Segment the k", which side is named (N,) (alternating left / right: balanced)."""
    first = torch.randint(0, len(split.labels), (count,), generator=gen)
    second = torch.randint(0, len(split.labels), (count,), generator=gen)
    same = split.labels[first] == split.labels[second]
    while same.any():  # redraw until the two digits differ
        second[same] = torch.randint(0, len(split.labels), (int(same.sum()),), generator=gen)
        same = split.labels[first] == split.labels[second]
    pixels = torch.stack([split.images[first], split.images[second]], dim=1)
    digits = torch.stack([split.labels[first], split.labels[second]], dim=1)
    named = torch.arange(count) % 2
    return pixels, digits, named


def half_mask(side: torch.Tensor) -> torch.Tensor:
    """(N,) side index (0 = left) -> (N, 2, 64) masks: ones on that half of the 8x16 canvas."""
    return nn.functional.one_hot(side, 2).float()[..., None].expand(-1, -1, 64).contiguous()


def canvas_image(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 2, 64) -> (N, 8, 16), left digit then right digit."""
    return pixels.view(-1, 2, 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 16)


def split_validation(train_split: DigitsSplit, fraction: float, seed: int = 0) -> tuple[DigitsSplit, DigitsSplit]:
    """Stratified split of the training images, by image, into (training, validation): learning rates are chosen on
    the validation images; the test images are never used for a choice."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    from sklearn.model_selection import train_test_split

    keep, held = train_test_split(
        range(len(train_split.labels)), test_size=fraction, random_state=seed, stratify=train_split.labels.numpy()
    )
    keep, held = torch.tensor(keep), torch.tensor(held)
    part = lambda i: DigitsSplit(train_split.images[i], train_split.labels[i], train_split.index[i])  # noqa: E731
    return part(keep), part(held)


def variant_groups(variant: str) -> list[tuple[str, ...]]:
    """The task groups of ``variant``, one adapter each. Every adapter sees ``batch_size / 4`` samples of each of its
    tasks per step, so every variant trains on the same samples of a task (MiT: of its three tasks)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "per_task":
        return [(t,) for t in TASKS]
    return [IMAGE_TASKS if variant == "mit" else TASKS]
