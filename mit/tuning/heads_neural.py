"""Task heads of neural tuning's multi-task model: the FiLM mask decoder of ``<LCL-i>`` states and the ``<GLB>``
embedding regressor."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .heads import _block


class FiLMMaskDecoder(nn.Module):
    """Mask logits from one token state (an ``<LCL-i>`` final hidden state) and multi-level image features.

    Level ``i`` (deepest first) is projected to ``hidden`` channels and added to the running map (upsampled x2 from the
    second level on); the map is then modulated feature-wise by the token state, ``x * (1 + gamma_i) + beta_i`` with
    ``(gamma_i, beta_i) = Linear_i(state)`` (FiLM), and passed through a 3x3 conv + GroupNorm + GELU. A 1x1 conv gives
    one logit per pixel, upsampled bilinearly to ``output_size``.

    Args: ``cond_dim`` the LLM's hidden size; ``feature_dim`` the image features' channels (CLIP width);
    ``num_levels`` the feature maps per forward; ``hidden`` the decoder channels.
    """

    def __init__(self, cond_dim: int, feature_dim: int, num_levels: int = 3, hidden: int = 256) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels: expected >= 1, got {num_levels}")
        self.num_levels = num_levels
        self.level_proj = nn.ModuleList(nn.Conv2d(feature_dim, hidden, 1) for _ in range(num_levels))
        self.film = nn.ModuleList(nn.Linear(cond_dim, 2 * hidden) for _ in range(num_levels))
        self.blocks = nn.ModuleList(_block(hidden) for _ in range(num_levels))
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, state: torch.Tensor, levels: list[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        """``state`` (N, cond_dim), ``levels`` N-row maps (N, feature_dim, h_i, w_i) -> logits (N, *output_size)."""
        if len(levels) != self.num_levels:
            raise ValueError(f"levels: expected {self.num_levels} feature maps, got {len(levels)}")
        x = None
        dtype = self.out.weight.dtype
        for i, feature in enumerate(reversed(levels)):
            f = self.level_proj[i](feature.to(dtype))
            if x is None:
                x = f
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
                x = x + F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
            gamma, beta = self.film[i](state.to(dtype)).chunk(2, dim=-1)
            x = self.blocks[i](x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        logits = self.out(x)
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]


class EmbeddingRegressor(nn.Module):
    """The ``<GLB>`` head: LayerNorm, Linear, GELU, dropout, Linear: (N, hidden_size) -> (N, out_dim)."""

    def __init__(self, hidden_size: int, out_dim: int, hidden: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state.to(self.net[1].weight.dtype))
