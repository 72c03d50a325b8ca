"""Save and load only the MiT parameters (safetensors) with the MiT config and the base model's shape (JSON)."""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors.torch import load_file, save_file

from .config import MiTConfig
from .modeling import _decoder, _MiTModelMixin, apply_mit

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "mit_config.json"
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _base_shape(model) -> dict[str, int]:
    config = _decoder(model).config
    shape = {k: int(getattr(config, k)) for k in _SHAPE_KEYS}
    shape["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return shape


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (MiT parameters only) and ``mit_config.json`` into ``directory``."""
    if not isinstance(model, _MiTModelMixin):
        raise ValueError("save_adapter needs a model returned by mit.apply_mit")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.mit_named_parameters()}
    meta = {"mit_config": model.mit_config.to_dict(), "base_model": _base_shape(model), "format": "mit-adapter-v1"}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def load_adapter(model, directory: str | os.PathLike):
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return it.

    A plain Llama model gets :func:`mit.apply_mit` with the saved config first. A model of another shape than the
    one the adapter was saved from, or an adapter file whose tensors do not match, raises ValueError naming the
    mismatch."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"no MiT adapter at {directory}: missing {path.name}")
    meta = json.loads(config_path.read_text())
    config = MiTConfig.from_dict(meta["mit_config"])
    saved_shape, shape = meta["base_model"], _base_shape(model)
    mismatched = {k: (saved_shape.get(k), v) for k, v in shape.items() if saved_shape.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the adapter at {directory} was saved from a model of another shape ({details})")
    if isinstance(model, _MiTModelMixin):
        if model.mit_config.to_dict() != config.to_dict():
            raise ValueError(f"the model's MiT config {model.mit_config} differs from the adapter's {config}")
    else:
        apply_mit(model, config)
    tensors = load_file(str(weights_path))
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
