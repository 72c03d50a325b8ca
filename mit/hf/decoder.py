"""Where a Hugging Face decoder model keeps what every method needs: the decoder (the module holding ``layers``),
positions that ignore left padding, parameter counts."""

from __future__ import annotations

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding the decoder ``layers`` (``model.model`` of a ``*ForCausalLM``, or a bare ``*Model``), or
    ValueError naming ``model``."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            if getattr(candidate, "config", None) is not None:
                return candidate
    raise ValueError(
        f"model: expected a Hugging Face decoder model (a *ForCausalLM or a bare *Model with .layers), "
        f"got {type(model).__name__}"
    )


def padding_aware_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions that start at 0 at each sample's first real token: ``cumsum(mask) - 1`` over the last ``seq_len``
    columns of the (B, past + seq_len) padding mask, as generate() computes them. Returns (B, seq_len) int64.

    MiT needs them for left-padded batches: its post-rotary ``k_add`` makes attention depend on absolute positions
    (rotary alone is shift-invariant), so with default positions a sample's output would depend on its padding;
    neural tuning needs them for the image tokens it inserts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
