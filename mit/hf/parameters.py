"""The dtype of a method's trainable parameters, whatever the method."""

from __future__ import annotations

import torch


def trainable_dtype(reference: torch.Tensor) -> torch.dtype:
    """A method's parameters are kept in fp32 next to fp16/bf16 (or quantized, non-float) base weights, like peft's
    adapter autocast; next to fp32 / fp64 weights they take that dtype. ``reference``: a base weight they sit beside."""
    return reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32
