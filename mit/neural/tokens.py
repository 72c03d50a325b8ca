"""Unified tokens: image patch tokens prepended to the prompt, and trainable rows for new tokens.

- :class:`ImageProjection` (``model.nt_image_projection``): a trainable Linear (image_dim -> hidden) applied to CLIP
  patch tokens (B, P, image_dim); :func:`prepend_image_tokens` puts the projected tokens before each prompt's first
  real token (after its left padding, so a padded row is its unpadded self shifted right).
- :class:`NewTokenRows` (``model.nt_new_tokens``): the embedding rows (and, for untied models, the LM-head rows) of
  the tokens added for the tasks (``<LCL-1..5>``, ``<GLB>`` ...). The base embedding is resized (the resized rows
  stay frozen and unused) and forward hooks substitute the trainable rows: the embedding's output at the new ids, and
  the LM head's logits of the new ids. Deviation from the reference code, which trains the whole embedding and LM
  head: only the new tokens' rows train here (far fewer parameters; the base vocabulary is unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from ..hf.parameters import trainable_dtype


class ImageProjection(nn.Module):
    """``proj``: Linear(image_dim -> hidden) in PyTorch's default init."""

    def __init__(self, image_dim: int, hidden_size: int, like: torch.Tensor) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.proj = nn.Linear(image_dim, hidden_size, device=like.device, dtype=trainable_dtype(like))

    def forward(self, image_features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, P, image_dim) patch tokens -> (B, P, hidden) in ``dtype``."""
        if not isinstance(image_features, torch.Tensor) or image_features.dim() != 3:
            raise ValueError(
                "image_features must be a (batch, patches, image_dim) tensor, got "
                f"{getattr(image_features, 'shape', type(image_features).__name__)}"
            )
        if image_features.shape[-1] != self.image_dim or not image_features.is_floating_point():
            raise ValueError(
                f"image_features must be floating point with last dimension image_dim={self.image_dim}, got shape "
                f"{tuple(image_features.shape)} and dtype {image_features.dtype}"
            )
        weight = self.proj.weight
        return self.proj(image_features.to(device=weight.device, dtype=weight.dtype)).to(dtype)


def prepend_image_tokens(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert the (B, P, hidden) ``images`` before each row's first real token of the (B, L, hidden) prompt.

    Row b with n leading padding positions becomes ``[pad * n, image * P, prompt tokens]``; the (B, L) padding mask
    gets P ones there, the (B, L) labels P ``-100``. A row whose ``image_mask`` (B,) bool is False has no image: its P
    positions come first, zero and masked out (``[masked * P, pad * n, prompt tokens]``, more left padding), so its
    prompt sits where the other rows' prompts sit. Returns (B, P + L, hidden), (B, P + L), labels or None."""
    batch, length = mask.shape
    patches = images.shape[1]
    if images.shape[0] != batch or embeds.shape[:2] != (batch, length):
        raise ValueError(
            f"image_features must have one row per prompt: images {tuple(images.shape[:2])}, prompt embeddings "
            f"{tuple(embeds.shape[:2])}, attention_mask {tuple(mask.shape)}"
        )
    leading = (mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1) left padding per row
    image_ones = mask.new_ones(batch, patches)
    if image_mask is not None:
        if not (
            isinstance(image_mask, torch.Tensor) and image_mask.dtype == torch.bool and image_mask.shape == (batch,)
        ):
            raise ValueError(f"image_mask: expected a ({batch},) bool tensor, got {image_mask!r:.80}")
        present = image_mask.to(mask.device)
        leading = torch.where(present[:, None], leading, torch.zeros_like(leading))
        image_ones = image_ones * present[:, None].to(mask.dtype)
        images = torch.where(present.to(images.device)[:, None, None], images, torch.zeros_like(images))
    j = torch.arange(patches + length, device=mask.device).expand(batch, -1)
    index = torch.where(j < leading, j + patches, torch.where(j < leading + patches, j - leading, j))
    full = torch.cat([images.to(embeds.dtype), embeds], dim=1)
    full = full.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))
    full_mask = torch.cat([image_ones, mask], dim=1).gather(1, index)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, patches), -100), labels], dim=1).gather(1, index)
    return full, full_mask, labels


class NewTokenRows(nn.Module):
    """Trainable rows of ``num`` new tokens with contiguous ids ``first_id .. first_id + num - 1``.

    ``embedding`` (num, hidden) replaces the base embedding's output at those ids; ``head`` (num, hidden) gives their
    logits (the same Parameter as ``embedding`` when the base ties its embedding and LM head, None without a head)."""

    def __init__(self, first_id: int, init_embedding: torch.Tensor, init_head: torch.Tensor | None, tied: bool) -> None:
        super().__init__()
        self.first_id, self.num = first_id, init_embedding.shape[0]
        dtype = trainable_dtype(init_embedding)
        self.embedding = nn.Parameter(init_embedding.detach().clone().to(dtype))
        self.tied = tied
        if tied:
            self.head = self.embedding
        elif init_head is not None:
            self.head = nn.Parameter(init_head.detach().clone().to(dtype))
        else:
            self.head = None

    disabled: bool = False  # True (an instance attribute) inside the model's disable_adapter() context: hooks are off

    def embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of the input embedding: rows at the new ids come from ``embedding`` (None, the embedding's
        own output, while ``disabled``)."""
        if self.disabled:
            return None
        ids = args[0]
        offset = ids - self.first_id
        is_new = (offset >= 0) & (offset < self.num)
        rows = self.embedding[offset.clamp(0, self.num - 1)].to(output.dtype)
        return torch.where(is_new[..., None], rows, output)

    def head_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of the LM head: the logits of the new ids are ``hidden @ head.T`` (None, the head's own
        output, while ``disabled``)."""
        if self.disabled:
            return None
        hidden = args[0]
        new = (hidden.to(self.head.dtype) @ self.head.T).to(output.dtype)
        end = self.first_id + self.num
        return torch.cat([output[..., : self.first_id], new, output[..., end:]], dim=-1)

    def extra_repr(self) -> str:
        return f"first_id={self.first_id}, num={self.num}, tied={self.tied}"
