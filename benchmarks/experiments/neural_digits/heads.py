"""The experiment's own modules around the LLM: the digit patch encoder (and its pretraining as a
classifier), the FiLM mask decoder over patch features and the draw head. None has an equivalent in
:mod:`mit.tuning.heads` (those decode CLIP feature maps of full-size images)."""

from __future__ import annotations

import torch
from torch import nn

from mit.demo.digits import DigitsSplit


class PatchEncoder(nn.Module):
    """(B, n, 64) patches (8x8 digits in [0, 1]) -> tokens (B, n * T, patch_dim) and features (B, n, patch_dim).

    Each patch is standardised with the training images' per-pixel statistics, then an MLP gives T tokens; a learned
    position (per patch slot, at most ``max_patches``) is added to tokens and features."""

    def __init__(
        self, patch_dim: int, tokens_per_patch: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
        max_patches: int = 2, hidden: int = 256,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("pixel_mean", pixel_mean.clone())
        self.register_buffer("pixel_std", pixel_std.clone())
        self.tokens_per_patch, self.patch_dim = tokens_per_patch, patch_dim
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, (tokens_per_patch + 1) * patch_dim)
        )
        self.position = nn.Parameter(0.1 * torch.randn(max_patches, patch_dim))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if patches.dim() != 3 or patches.shape[-1] != 64 or patches.shape[1] > self.position.shape[0]:
            raise ValueError(f"patches must be (B, n <= {self.position.shape[0]}, 64), got {tuple(patches.shape)}")
        batch, n, _ = patches.shape
        out = self.net((patches - self.pixel_mean) / self.pixel_std).view(batch, n, self.tokens_per_patch + 1, -1)
        out = out + self.position[:n, None]
        return out[:, :, :-1].reshape(batch, n * self.tokens_per_patch, -1), out[:, :, -1]


def pretrain_encoder(encoder: PatchEncoder, train_split: DigitsSplit, steps: int, seed: int = 0) -> list[float]:
    """Train ``encoder`` (in place) as a digit classifier on the training split's images: a linear read-out of every
    token and of the feature (B, patch_dim) -> 10 logits, cross-entropy, full-batch Adam (lr 3e-3) for ``steps``;
    the read-outs are dropped. The analogue of the pretrained (CLIP) image encoder of the paper: the image tokens
    carry the digit from the start. Returns the loss per step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    readout = nn.Linear(encoder.patch_dim, 10)
    with torch.no_grad():
        readout.weight.copy_(torch.randn(10, encoder.patch_dim, generator=gen) / encoder.patch_dim**0.5)
        readout.bias.zero_()
    optimiser = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=3e-3)
    images, labels = train_split.images[:, None], train_split.labels
    losses = []
    for _ in range(steps):
        tokens, features = encoder(images)  # (N, T, C), (N, 1, C)
        logits = readout(torch.cat([tokens, features], dim=1))  # (N, T + 1, 10)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


class MaskDecoder(nn.Module):
    """FiLM of the patch features (B, n, C) by a condition (B, hidden), then per-patch pixel logits (B, n, 64)."""

    def __init__(self, hidden_size: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.film = nn.Linear(hidden_size, 2 * patch_dim)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(patch_dim, 64))

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(self.norm(condition)).chunk(2, dim=-1)
        return self.out(features * (1 + gamma[:, None]) + beta[:, None])


class DrawHead(nn.Module):
    """The <GLB> token's final hidden state (B, hidden) -> 64 pixel values (B, 64), and 10 digit logits (B, 10) of a
    linear read-out of the same (normalised) state: a training signal that separates the digits' <GLB> states (the
    pixels alone regressed about one mean image for every prompt); only the pixels are evaluated."""

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 64))
        self.digit = nn.Linear(hidden_size, 10)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.norm(hidden)
        return self.net(normed), self.digit(normed)
