"""Checking a file's tensors against the parameters they are to be loaded into, before any is copied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def check_tensors_match(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    source: str,
    what: str = "the model",
    hint: str = "",
) -> None:
    """ValueError naming ``source`` unless ``tensors`` holds exactly the names of ``shapes``, each with that shape.

    ``what`` names the expected set in the message (``"the model"``, ``"the MiT parameters ..."``); ``hint`` is
    appended to the names' message."""
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{source} does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}{hint}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects {tuple(shape)}"
            )
