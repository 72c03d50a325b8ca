"""CLIP vision towers for MiT: transformers' ``CLIPVisionModelWithProjection`` (default) or open_clip's.

:func:`build_clip_visual` returns a :class:`CLIPVisual`, one interface over both libraries:
``forward(images, indices)`` -> ``(image_embedding (B, embed_dim), [block outputs (B, width, gh, gw)])`` where the
embedding is CLIP's projected image embedding (what MiT infuses) and the block outputs (after transformer block ``i``,
before the final LayerNorm, class token removed) feed the segmentation decoder.

- ``backend="transformers"`` (default; transformers is already a dependency): ``pretrained`` is a local Hugging Face
  checkpoint, a directory with ``config.json`` and weights: a CLIP vision tower, or a whole CLIP model such as a
  download of ``openai/clip-vit-large-patch14-336`` (the checkpoint LLaVA uses; the text tower is not loaded). Without
  ``pretrained`` the tower is randomly initialised from ``model``: a name in :data:`CLIP_CONFIGS` or the path of a
  ``CLIPVisionConfig`` JSON file (tests use tiny ones).
- ``backend="open_clip"``: ``open_clip.create_model(model, pretrained=...)`` and its ``.visual``; ``model`` is an
  open_clip model name or the path of an open_clip model-config JSON (``{"embed_dim", "vision_cfg"}``), ``pretrained``
  an open_clip tag or a local checkpoint file. open_clip imports torchvision, whose PyPI wheels are CUDA builds: next
  to a CPU build of torch they fail to import, so this backend is optional (``pip install mit[clip]``).

Both give the same features for the same weights (OpenAI's CLIP ViTs, QuickGELU): the HF and open_clip towers are the
same network.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import tempfile
from typing import Any

import torch
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("transformers", "open_clip")
OPEN_CLIP_INSTALL = (
    "pip install open_clip_torch (it imports torchvision, whose PyPI wheels are CUDA builds: with a CPU build of torch "
    "install torchvision from PyTorch's CPU index, or use backend='transformers')"
)

# The towers the paper uses (Table 4), as transformers CLIPVisionConfig fields (OpenAI's: QuickGELU).
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-L-14-336": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    "ViT-L-14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 768},
    "ViT-B-16": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "image_size": 224, "patch_size": 16, "projection_dim": 512},
}  # fmt: skip
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "projection_dim")


class CLIPVisual(nn.Module):
    """A CLIP vision tower behind one interface (see the module docstring).

    Attributes: ``backend``, ``image_size``, ``patch_size``, ``grid_size`` (gh, gw), ``width``, ``embed_dim``,
    ``num_layers``."""

    def __init__(self, tower: nn.Module, backend: str) -> None:
        super().__init__()
        self.tower, self.backend = tower, backend
        if backend == "transformers":
            config = tower.config
            self.image_size, self.patch_size = int(config.image_size), int(config.patch_size)
            self.width, self.embed_dim = int(config.hidden_size), int(config.projection_dim)
            self.num_layers = int(config.num_hidden_layers)
            self.grid_size = (self.image_size // self.patch_size,) * 2
        else:
            size = tower.image_size
            self.image_size = int(size if isinstance(size, int) else size[0])
            self.grid_size = tuple(int(g) for g in tower.grid_size)
            self.patch_size = self.image_size // self.grid_size[0]
            self.width, self.embed_dim = int(tower.proj.shape[0]), int(tower.proj.shape[1])
            self.num_layers = len(tower.transformer.resblocks)

    def forward(self, images: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(embedding (B, embed_dim), [output of block i as (B, width, gh, gw) for i in indices])``."""
        if self.backend == "open_clip":
            out = self.tower.forward_intermediates(images, indices=list(indices), output_fmt="NCHW")
            return out["image_features"], list(out["image_intermediates"])
        out = self.tower(pixel_values=images, output_hidden_states=True)
        batch, (gh, gw) = images.shape[0], self.grid_size
        levels = []
        for i in indices:  # hidden_states[0] is the embedding output (after pre-LayerNorm), [i + 1] block i's output
            tokens = out.hidden_states[i + 1][:, 1:]  # drop the class token
            levels.append(tokens.transpose(1, 2).reshape(batch, self.width, gh, gw))
        return out.image_embeds, levels


def resolve_clip_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """transformers CLIPVisionConfig fields of a name in :data:`CLIP_CONFIGS` or of a JSON file (a CLIPVisionConfig,
    or a whole CLIPConfig with ``vision_config``)."""
    text = str(name_or_path)
    if text in CLIP_CONFIGS:
        config = copy.deepcopy(CLIP_CONFIGS[text])
        config.setdefault("hidden_act", "quick_gelu")
        return config
    path = pathlib.Path(text)
    if not text.endswith(".json"):
        raise ValueError(f"unknown CLIP model {text!r}; expected one of {sorted(CLIP_CONFIGS)} or a config .json path")
    if not path.is_file():
        raise ValueError(f"CLIP model config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"CLIP model config {path} is not valid JSON: {error}") from None
    if isinstance(config, dict) and isinstance(config.get("vision_config"), dict):
        config = {"projection_dim": config.get("projection_dim", 512), **config["vision_config"]}
    if not isinstance(config, dict) or "vision_cfg" in config:
        raise ValueError(f"CLIP model config {path}: expected transformers CLIPVisionConfig fields, got an open_clip "
                         "config (use backend='open_clip') or something else")  # fmt: skip
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"CLIP model config {path} lacks {missing}")
    return config


def _transformers_tower(model: str | os.PathLike, pretrained: str | os.PathLike | None, quick_gelu: bool) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if pretrained is None:
        config = resolve_clip_config(model)
        if quick_gelu:
            config["hidden_act"] = "quick_gelu"
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    path = pathlib.Path(pretrained)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(
            f"pretrained={str(pretrained)!r}: the transformers backend loads a local Hugging Face checkpoint directory "
            "(config.json + model.safetensors or pytorch_model.bin, e.g. a download of "
            "openai/clip-vit-large-patch14-336); open_clip / OpenAI .pt files need backend='open_clip'"
        )
    try:
        return CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"CLIP weights {path}: cannot be loaded ({error})") from error


def _try_import_open_clip():
    try:
        import open_clip
    except Exception:  # ImportError, or torchvision's RuntimeError when its C++ ops do not match torch
        return None
    return open_clip


def import_open_clip():
    """Import open_clip or raise ImportError saying how to install it (and what failed)."""
    try:
        import open_clip
    except Exception as error:
        raise ImportError(
            f"open_clip could not be imported ({type(error).__name__}: {error}); {OPEN_CLIP_INSTALL}"
        ) from error
    return open_clip


def _open_clip_tower(model: str | os.PathLike, pretrained: str | os.PathLike | None, quick_gelu: bool) -> nn.Module:
    open_clip = import_open_clip()
    name = str(model)
    if name.endswith(".json"):  # an open_clip model-config file: register it under its stem
        config = json.loads(pathlib.Path(name).read_text())
        config.setdefault("text_cfg", {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
        directory = pathlib.Path(tempfile.mkdtemp(prefix="mit-clip-config-"))
        name = pathlib.Path(name).stem
        (directory / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(directory / f"{name}.json")
    pretrained = None if pretrained is None else str(pretrained)
    return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu).visual


def build_clip_visual(
    model: str | os.PathLike = "ViT-L-14-336",
    pretrained: str | os.PathLike | None = None,
    backend: str = "transformers",
    force_quick_gelu: bool = False,
) -> CLIPVisual:
    """A CLIP vision tower (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "open_clip":
        return CLIPVisual(_open_clip_tower(model, pretrained, force_quick_gelu), "open_clip")
    return CLIPVisual(_transformers_tower(model, pretrained, force_quick_gelu), "transformers")


def default_feature_layers(num_layers: int, levels: int = 3) -> list[int]:
    """Evenly spaced blocks ending at the last one: 24 blocks and 3 levels give [7, 15, 23]."""
    if levels < 1 or levels > num_layers:
        raise ValueError(f"levels must be in [1, {num_layers}], got {levels}")
    return [math.ceil(num_layers * (i + 1) / levels) - 1 for i in range(levels)]
