"""CLIP vision towers: open_clip's, or a built-in copy of open_clip's ViT that needs no torchvision.

:func:`build_clip_visual` returns a module with open_clip's ``VisionTransformer`` interface
(``forward_intermediates(x, indices=[...], output_fmt="NCHW")`` -> ``{"image_features", "image_intermediates"}``):

- ``backend="open_clip"``: ``open_clip.create_model(name, pretrained=...)`` and its ``.visual`` (the text tower is
  dropped). ``pretrained`` may be an open_clip tag (``"openai"``) or a local file.
- ``backend="native"``: :class:`CLIPVisionTower`, a re-implementation of open_clip's standard ViT with the same
  parameter names and numerics, so open_clip checkpoints (``open_clip_pytorch_model.bin`` / ``.safetensors``) and
  OpenAI's TorchScript archives (``ViT-L-14-336px.pt``) load into it. ``pretrained`` must be a local file.
- ``backend="auto"``: open_clip when it imports, else native.

The native tower exists because open_clip imports torchvision, and the torchvision wheels on PyPI are CUDA builds: next
to a CPU build of torch they fail to import (``operator torchvision::nms does not exist``) and break transformers'
imports too. On a CUDA machine with a matching torchvision both backends give the same features.

Model configs use open_clip's JSON schema (``{"embed_dim": ..., "vision_cfg": {...}}``); a name may also be the path of
such a JSON file (how tests use tiny configs), and :func:`register_clip_config` adds one under a name (and registers it
with open_clip through ``open_clip.add_model_config`` when open_clip is importable).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import tempfile
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_INSTALL = (
    "pip install open_clip_torch (it imports torchvision, whose PyPI wheels are CUDA builds: with a CPU build of torch "
    "install torchvision from PyTorch's CPU index, or use backend='native')"
)

# open_clip's configs of the towers the paper uses (Table 4); more can be added with register_clip_config.
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-L-14-336": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
    },
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}},
}
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "ls_init_value"}


def register_clip_config(name: str, config: dict[str, Any]) -> None:
    """Register an open_clip-style model config under ``name`` (also with open_clip, when it imports)."""
    _validate_config(name, config)
    CLIP_CONFIGS[name] = copy.deepcopy(config)
    open_clip = _try_import_open_clip()
    if open_clip is not None:
        directory = pathlib.Path(tempfile.mkdtemp(prefix="mit-clip-config-"))
        (directory / f"{name}.json").write_text(json.dumps(_open_clip_json(config)))
        open_clip.add_model_config(directory / f"{name}.json")


def resolve_clip_config(name_or_path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(name, config)`` of a registered name or of an open_clip model-config JSON file."""
    text = str(name_or_path)
    if text in CLIP_CONFIGS:
        return text, copy.deepcopy(CLIP_CONFIGS[text])
    path = pathlib.Path(text)
    if text.endswith(".json"):
        if not path.is_file():
            raise ValueError(f"CLIP model config {path} does not exist (expected an open_clip model-config JSON file)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"CLIP model config {path} is not valid JSON: {error}") from None
        _validate_config(str(path), config)
        return path.stem, config
    raise ValueError(
        f"unknown CLIP model {text!r}; expected one of {sorted(CLIP_CONFIGS)} or the path of an open_clip "
        "model-config .json file"
    )


def _validate_config(name: str, config: Any) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict) or "embed_dim" not in config:
        raise ValueError(f"CLIP config {name}: expected {{'embed_dim': int, 'vision_cfg': {{...}}}}, got {config!r}")
    missing = sorted({"image_size", "layers", "width", "patch_size"} - set(config["vision_cfg"]))
    if missing:
        raise ValueError(f"CLIP config {name}: vision_cfg lacks {missing}")


def _open_clip_json(config: dict[str, Any]) -> dict[str, Any]:
    """open_clip's factory needs a text tower in the config; a tiny one is added when missing."""
    out = copy.deepcopy(config)
    out.setdefault("text_cfg", {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    return out


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


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (open_clip's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock`` (same parameter names: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )


class CLIPVisionTower(nn.Module):
    """open_clip's standard ``VisionTransformer`` (class-token pooling, learnable positions, ln_pre/ln_post, proj).

    Parameter names equal open_clip's ``model.visual`` ones, so its checkpoints load with :meth:`load_clip_weights`."""

    def __init__(self, config: dict[str, Any], quick_gelu: bool = False) -> None:
        super().__init__()
        _validate_config("native tower", config)
        vision = config["vision_cfg"]
        unsupported = sorted(set(vision) - _VISION_KEYS)
        if unsupported or vision.get("ls_init_value") is not None:
            raise ValueError(
                f"the native CLIP tower supports open_clip's standard ViT only; unsupported vision_cfg keys "
                f"{unsupported or ['ls_init_value']} (use backend='open_clip')"
            )
        if not all(isinstance(vision[k], int) for k in ("image_size", "layers", "width", "patch_size")):
            raise ValueError(f"vision_cfg image_size, layers, width and patch_size must be ints, got {vision}")
        width, patch = vision["width"], vision["patch_size"]
        self.image_size = vision["image_size"]
        self.patch_size = (patch, patch)
        self.grid_size = (self.image_size // patch, self.image_size // patch)
        self.width = width
        self.output_dim = int(config["embed_dim"])
        heads = width // vision.get("head_width", 64)
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        quick = quick_gelu or bool(config.get("quick_gelu", False))
        self.transformer = _Transformer(width, vision["layers"], heads, vision.get("mlp_ratio", 4.0), quick)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, self.output_dim))

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int] | int | None = None, output_fmt: str = "NCHW", **_: Any
    ) -> dict[str, Any]:
        """Same contract as open_clip's: the outputs of blocks ``indices`` (before ln_post, class token removed) and
        the projected class-token embedding ``image_features``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = len(self.transformer.resblocks)
        if indices is None:
            take = set(range(n))
        elif isinstance(indices, int):
            take = set(range(n - indices, n))
        else:
            take = {i % n for i in indices}
        b, _, height, width = x.shape
        x = self._embeds(x)
        intermediates = []
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if i in take:
                y = x[:, 1:]
                if output_fmt == "NCHW":
                    y = y.reshape(b, height // self.patch_size[0], width // self.patch_size[1], -1)
                    y = y.permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        pooled = self.ln_post(x)[:, 0] @ self.proj
        return {"image_intermediates": intermediates, "image_features": pooled}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, indices=[])["image_features"]


def _read_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"CLIP weights {path} do not exist (expected a local checkpoint file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # OpenAI's released weights are TorchScript archives
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        pass
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"CLIP weights {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip_weights(tower: CLIPVisionTower, path: str | os.PathLike) -> CLIPVisionTower:
    """Load the ``visual.*`` tensors of an open_clip / OpenAI CLIP checkpoint into a native tower (strict)."""
    path = pathlib.Path(path)
    state = _read_state_dict(path)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        visual = state  # a checkpoint of the vision tower alone
    own = tower.state_dict()
    missing, unexpected = sorted(set(own) - set(visual)), sorted(set(visual) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"CLIP weights {path} do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [k for k in own if own[k].shape != visual[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"CLIP weights {path}: {k} has shape {tuple(visual[k].shape)}, expected {tuple(own[k].shape)}")
    tower.load_state_dict(visual)
    return tower


def build_clip_visual(
    model: str | os.PathLike = "ViT-L-14-336",
    pretrained: str | os.PathLike | None = None,
    backend: str = "auto",
    force_quick_gelu: bool = False,
) -> tuple[nn.Module, str]:
    """Build a CLIP vision tower; returns ``(visual, backend_used)``. See the module docstring."""
    if backend not in ("auto", "open_clip", "native"):
        raise ValueError(f"backend must be 'auto', 'open_clip' or 'native', got {backend!r}")
    name, config = resolve_clip_config(model)
    open_clip = None
    if backend == "open_clip":
        open_clip = import_open_clip()
    elif backend == "auto":
        open_clip = _try_import_open_clip()
    if open_clip is not None:
        if name not in open_clip.list_models():
            directory = pathlib.Path(tempfile.mkdtemp(prefix="mit-clip-config-"))
            (directory / f"{name}.json").write_text(json.dumps(_open_clip_json(config)))
            open_clip.add_model_config(directory / f"{name}.json")
        pretrained = None if pretrained is None else str(pretrained)
        full = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=force_quick_gelu)
        return full.visual, "open_clip"
    tower = CLIPVisionTower(config, quick_gelu=force_quick_gelu)
    if pretrained is not None:
        if not pathlib.Path(pretrained).exists():
            raise ValueError(
                f"pretrained={str(pretrained)!r} is not a local file; the native CLIP backend loads checkpoint files "
                f"only (open_clip tags such as 'openai' need open_clip: {OPEN_CLIP_INSTALL})"
            )
        load_clip_weights(tower, pretrained)
    return tower, "native"


def default_feature_layers(num_layers: int, levels: int = 3) -> list[int]:
    """Evenly spaced blocks ending at the last one: 24 blocks and 3 levels give [7, 15, 23]."""
    if levels < 1 or levels > num_layers:
        raise ValueError(f"levels must be in [1, {num_layers}], got {levels}")
    return [math.ceil(num_layers * (i + 1) / levels) - 1 for i in range(levels)]
