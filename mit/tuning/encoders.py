"""Modality encoders: the frozen CLIP image encoder and the trainable sequence encoder (acoustic / facial features).

Both return the single per-sample *modality embedding* that MiT infuses into the LLM (``MiTConfig.modality_dim``).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn

from .clip import build_clip_visual, default_feature_layers
from .image_preprocessing import encoder_preprocessing


@dataclasses.dataclass
class ImageFeatures:
    """``global_embedding`` (B, embed_dim): CLIP's projected image embedding; ``levels``: the outputs of the chosen
    blocks as (B, width, grid_h, grid_w) maps, shallow to deep."""

    global_embedding: torch.Tensor
    levels: list[torch.Tensor]

    @property
    def patches(self) -> torch.Tensor:
        """(B, grid_h * grid_w, width): the deepest chosen block's patch tokens, row-major, without the class token
        (with the default ``feature_layers``, the last block: CLIP's last hidden state minus its class token). These
        are neural tuning's image tokens (``image_features``)."""
        deepest = self.levels[-1]
        return deepest.flatten(2).transpose(1, 2)


class CLIPImageEncoder(nn.Module):
    """Frozen CLIP image encoder (default ViT-L/14-336: 768-d embedding, 1024-wide 24x24 patch features).

    Args:
        model: the architecture for a randomly initialised tower (no ``pretrained``): a name in
            :data:`mit.clip.CLIP_CONFIGS` (``"ViT-L-14-336"``, ``"ViT-L-14"``, ``"ViT-B-16"``) or the path of a config
            JSON (transformers ``CLIPVisionConfig``; open_clip's schema with ``backend="open_clip"``).
        pretrained: the weights: a local Hugging Face checkpoint directory (``backend="transformers"``, e.g. a
            download of ``openai/clip-vit-large-patch14-336``; its own config.json sets the architecture), or an
            open_clip tag / checkpoint file (``backend="open_clip"``). None = random initialisation (tests).
            Downloading weights is the user's business.
        feature_layers: 0-based blocks whose outputs feed the segmentation decoder; None = 3 evenly spaced blocks
            ending at the last one ([7, 15, 23] for 24 blocks).
        backend: ``"transformers"`` (CLIPVisionModelWithProjection) or ``"open_clip"``.
        force_quick_gelu: QuickGELU activations (OpenAI's weights; the named configs already use them).

    Inputs are images as :attr:`preprocessing` (:class:`~mit.tuning.image_preprocessing.ImagePreprocessing`) makes
    them: the checkpoint's own CLIP image processor (its ``preprocessor_config.json``), open_clip's own transforms, or
    transformers' CLIP defaults (OpenAI's); :attr:`mean` / :attr:`std` are its normalisation, :attr:`image_size` its
    resolution. Parameters are frozen and the module stays in eval mode; the forward pass runs without autograd.
    """

    def __init__(
        self,
        model: str | os.PathLike = "ViT-L-14-336",
        pretrained: str | os.PathLike | None = None,
        feature_layers: list[int] | None = None,
        backend: str = "transformers",
        force_quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.visual = build_clip_visual(model, pretrained, backend, force_quick_gelu)
        self.backend = self.visual.backend
        num_blocks = self.visual.num_layers
        layers = default_feature_layers(num_blocks) if feature_layers is None else [int(i) for i in feature_layers]
        bad = [i for i in layers if not 0 <= i < num_blocks]
        if bad or not layers:
            raise ValueError(f"feature_layers must be non-empty and in [0, {num_blocks}), got {layers}")
        self.feature_layers = layers
        self.image_size, self.grid_size = self.visual.image_size, self.visual.grid_size
        self.embed_dim, self.width = self.visual.embed_dim, self.visual.width
        self.preprocessing = encoder_preprocessing(self.backend, pretrained, self.visual.tower, self.image_size)
        self.mean, self.std = self.preprocessing.mean, self.preprocessing.std
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()

    def train(self, mode: bool = True) -> CLIPImageEncoder:
        super().train(mode)
        self.visual.eval()  # frozen: always in inference mode
        return self

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        dtype = next(self.visual.parameters()).dtype
        with torch.no_grad():
            embedding, levels = self.visual(images.to(dtype), self.feature_layers)
        return ImageFeatures(embedding, levels)


def _sinusoidal(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return table


class SequenceEncoder(nn.Module):
    """Trainable transformer encoder over feature sequences (e.g. COVAREP acoustic and Facet facial features).

    Each modality ``name -> feature size`` gets an input projection to ``d_model``, sinusoidal positions and its own
    ``num_layers``-layer transformer encoder (3, as in the paper) with a key padding mask, then a masked mean over
    time. The pooled vectors are concatenated and projected to ``out_dim``, the modality embedding MiT infuses.

    ``forward({name: (B, T, F)}, {name: (B, T) bool, True = real frame})`` -> (B, out_dim). Padded frames do not change
    the output. A sample with no real frame in a modality contributes a zero vector for it.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        out_dim: int,
        d_model: int = 128,
        num_layers: int = 3,
        num_heads: int = 4,
        dropout: float = 0.1,
        max_length: int = 1024,
    ) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("input_dims must name at least one modality, got {}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.modalities = sorted(input_dims)
        self.input_dims = dict(input_dims)
        self.max_length = max_length
        self.proj = nn.ModuleDict({m: nn.Linear(int(input_dims[m]), d_model) for m in self.modalities})
        self.encoders = nn.ModuleDict(
            {
                m: nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(
                        d_model, num_heads, 4 * d_model, dropout, batch_first=True, norm_first=True
                    ),
                    num_layers,
                    enable_nested_tensor=False,
                )
                for m in self.modalities
            }
        )
        self.register_buffer("positions", _sinusoidal(max_length, d_model), persistent=False)
        self.out = nn.Sequential(
            nn.LayerNorm(len(self.modalities) * d_model), nn.Linear(len(self.modalities) * d_model, out_dim)
        )

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"SequenceEncoder expects features for {self.modalities}, missing {missing}")
        pooled = []
        for m in self.modalities:
            x = features[m]
            if x.dim() != 3 or x.shape[-1] != self.input_dims[m]:
                raise ValueError(f"features[{m!r}] must be (B, T, {self.input_dims[m]}), got {tuple(x.shape)}")
            if x.shape[1] > self.max_length:
                raise ValueError(f"features[{m!r}] has {x.shape[1]} frames, more than max_length={self.max_length}")
            mask = None if masks is None else masks.get(m)
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = mask.bool()
            h = self.proj[m](x) + self.positions[: x.shape[1]].to(x.dtype)
            # rows with no real frame would give NaN in attention: let them see everything, then zero their pool
            empty = ~mask.any(dim=1)
            attend = mask | empty[:, None]
            h = self.encoders[m](h, src_key_padding_mask=~attend)
            weights = (mask & ~empty[:, None]).to(h.dtype)[..., None]
            pooled.append((h * weights).sum(1) / weights.sum(1).clamp_min(1))
        return self.out(torch.cat(pooled, dim=-1))
