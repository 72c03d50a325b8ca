"""Task heads: the light-weight segmentation decoder, the classification head and the regression head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(channels: int) -> nn.Sequential:
    groups = 8 if channels % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels), nn.GELU()
    )


class SegmentationDecoder(nn.Module):
    """Three-layer decoder: task embedding + multi-level image features -> mask logits at the input resolution.

    Layer ``i`` (deepest level first) adds the projected level-``i`` features to the running map (upsampled x2 from
    layer 1 on), multiplies it by a per-channel gate computed from the task embedding (the text selects the channels
    of the referred object), and applies a 3x3 conv + GroupNorm + GELU. A 1x1 conv gives one logit per pixel,
    upsampled bilinearly to ``output_size``.

    Args:
        text_dim: the LLM's hidden size; feature_dim: the image features' channels (CLIP width);
        num_levels: how many feature maps ``forward`` receives (one layer each); hidden: decoder channels.
    """

    def __init__(self, text_dim: int, feature_dim: int, num_levels: int = 3, hidden: int = 256) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_levels = num_levels
        self.level_proj = nn.ModuleList(nn.Conv2d(feature_dim, hidden, 1) for _ in range(num_levels))
        self.text_proj = nn.ModuleList(nn.Linear(text_dim, hidden) for _ in range(num_levels))
        self.blocks = nn.ModuleList(_block(hidden) for _ in range(num_levels))
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(
        self, task_embedding: torch.Tensor, levels: list[torch.Tensor], output_size: tuple[int, int]
    ) -> torch.Tensor:
        if len(levels) != self.num_levels:
            raise ValueError(f"SegmentationDecoder expects {self.num_levels} feature maps, got {len(levels)}")
        x = None
        for i, feature in enumerate(reversed(levels)):  # deepest first
            f = self.level_proj[i](feature.to(self.out.weight.dtype))
            if x is None:
                x = f
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
                x = x + F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
            gate = torch.sigmoid(self.text_proj[i](task_embedding.to(f.dtype)))
            x = self.blocks[i](x * gate[:, :, None, None])
        logits = self.out(x)
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]


class ClassificationHead(nn.Module):
    """Logits over ``[global image embedding ; task embedding]``: LayerNorm, Linear, GELU, dropout, Linear."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.net = nn.Sequential(
            nn.LayerNorm(image_dim + text_dim),
            nn.Linear(image_dim + text_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, image_embedding: torch.Tensor, task_embedding: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image_embedding.to(task_embedding.dtype), task_embedding], dim=-1)
        return self.net(x.to(self.net[1].weight.dtype))


class RegressionHead(nn.Module):
    """Sentiment score from the task embedding: a fully connected layer (``hidden=0``) or a 2-layer MLP."""

    def __init__(self, text_dim: int, hidden: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(text_dim, 1))

    def forward(self, task_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(task_embedding.to(self.net[0].weight.dtype))[:, 0]
