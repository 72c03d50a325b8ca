"""Save and load only the MiT parameters (safetensors) with the MiT config and the base model's shape (JSON).

Format ``mit-adapter-v2`` (this release): tensor names are the model's own parameter names
(``model.layers.3.self_attn.mit_kv_infusion.map.weight`` ...), and ``base_model`` records ``model_type``.
Format ``mit-adapter-v1`` (release 0.1.0, Llama only) named them ``self_attn.infusion.*``, ``self_attn.head_logit`` and
``mlp.ffn_infusion.*``; :func:`load_adapter` renames them on load (:func:`convert_v1_names`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import torch
from safetensors.torch import load_file, save_file

from ..config import MiTConfig
from .model import apply_mit, decoder_of, is_mit_model

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "mit_config.json"
FORMAT = "mit-adapter-v2"
_V1_FORMAT = "mit-adapter-v1"
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
_V1_RENAMES = (
    (re.compile(r"\.self_attn\.infusion\.(weight|bias)$"), r".self_attn.mit_kv_infusion.map.\1"),
    (re.compile(r"\.self_attn\.head_logit$"), r".self_attn.mit_kv_infusion.head_logit"),
    (re.compile(r"\.mlp\.ffn_infusion\.(weight|bias)$"), r".mlp.mit_ffn_infusion.map.\1"),
)


def _base_shape(model) -> dict[str, int | str]:
    config = decoder_of(model).config
    shape: dict[str, int | str] = {k: int(getattr(config, k)) for k in _SHAPE_KEYS}
    shape["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    shape["model_type"] = config.model_type
    return shape


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def convert_v1_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the tensors of a ``mit-adapter-v1`` file to this release's parameter names."""
    converted = {}
    for name, tensor in tensors.items():
        new = name
        for pattern, replacement in _V1_RENAMES:
            new = pattern.sub(replacement, new)
        converted[new] = tensor
    return converted


def save_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (MiT parameters only) and ``mit_config.json`` into ``directory``."""
    if not is_mit_model(model):
        raise ValueError("save_adapter needs a model returned by mit.apply_mit")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.mit_named_parameters()}
    meta = {"mit_config": model.mit_config.to_dict(), "base_model": _base_shape(model), "format": FORMAT}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def load_adapter(model, directory: str | os.PathLike):
    """Load an adapter saved by :func:`save_adapter` (this release's format or ``mit-adapter-v1``) into ``model`` and
    return it.

    A plain model gets :func:`mit.apply_mit` with the saved config first. A model of another type or shape than the
    one the adapter was saved from, or an adapter file whose tensors do not match, raises ValueError naming the
    mismatch."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"no MiT adapter at {directory}: missing {path.name}")
    meta = json.loads(config_path.read_text())
    file_format = meta.get("format", _V1_FORMAT)
    if file_format not in (FORMAT, _V1_FORMAT):
        raise ValueError(
            f"{config_path}: unknown adapter format {file_format!r}; expected {FORMAT!r} or {_V1_FORMAT!r}"
        )
    config = MiTConfig.from_dict(meta["mit_config"])
    saved_shape, shape = dict(meta["base_model"]), _base_shape(model)
    saved_shape.setdefault("model_type", "llama")  # v1 adapters came from Llama models only
    mismatched = {k: (saved_shape.get(k), v) for k, v in shape.items() if saved_shape.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the adapter at {directory} was saved from a model of another shape ({details})")
    tensors = load_file(str(weights_path))
    if file_format == _V1_FORMAT:
        tensors = convert_v1_names(tensors)
    if is_mit_model(model):
        if model.mit_config.to_dict() != config.to_dict():
            raise ValueError(f"the model's MiT config {model.mit_config} differs from the adapter's {config}")
    else:
        apply_mit(model, config)
    params = dict(model.mit_named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"adapter tensor {name} has shape {tuple(tensors[name].shape)}, the model expects "
                    f"{tuple(param.shape)}"
                )
            param.copy_(tensors[name])
    return model
