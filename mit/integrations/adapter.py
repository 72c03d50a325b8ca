"""Save and load only the MiT parameters (safetensors) with the MiT config and the base model's shape (JSON).

Format ``mit-adapter-v2`` (this release): tensor names are the model's own parameter names
(``model.layers.3.self_attn.mit_kv_infusion.map.weight`` ...), and ``base_model`` records ``model_type``.
Format ``mit-adapter-v1`` (release 0.1.0, Llama only) named them ``self_attn.infusion.*``, ``self_attn.head_logit`` and
``mlp.ffn_infusion.*``; :func:`load_adapter` renames them on load (:func:`convert_v1_names`).

Both directions are atomic: :func:`save_adapter` writes each file to a temporary name and renames it into place;
:func:`load_adapter` reads and validates both files and everything they imply for the model before it changes it.
The files' schema: :mod:`mit.integrations.adapter_files`.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors.torch import save_file

from ..utils.files import atomic_write
from ..utils.tensors import check_tensors_match
from .adapter_files import CONFIG_NAME, FORMAT, SHAPE_KEYS, WEIGHTS_NAME, AdapterFiles, convert_v1_names, read_adapter
from .model import decoder_of, is_mit_model, plan_mit

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "convert_v1_names", "load_adapter", "save_adapter"]


def _base_shape(model) -> dict[str, int | str]:
    config = decoder_of(model).config
    shape: dict[str, int | str] = {k: int(getattr(config, k)) for k in SHAPE_KEYS if k != "head_dim"}
    shape["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    shape["model_type"] = config.model_type
    return shape


def save_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (MiT parameters only) and ``mit_config.json`` into ``directory``, each
    written to a temporary file and renamed into place (a failed save leaves any previous file whole)."""
    if not is_mit_model(model):
        raise ValueError("save_adapter needs a model returned by mit.apply_mit")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.mit_named_parameters()}
    meta = {"mit_config": model.mit_config.to_dict(), "base_model": _base_shape(model), "format": FORMAT}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def _check_tensors(files: AdapterFiles, params: dict[str, torch.nn.Parameter]) -> None:
    """Names and shapes of the file's tensors against the parameters the config gives this model."""
    shapes = {name: param.shape for name, param in params.items()}
    check_tensors_match(
        files.tensors, shapes, str(files.weights_path), "the MiT parameters its config gives this model"
    )


def load_adapter(model, directory: str | os.PathLike):
    """Load an adapter saved by :func:`save_adapter` (this release's format or ``mit-adapter-v1``) into ``model`` and
    return it.

    A plain model gets :func:`mit.apply_mit` with the saved config. Everything is checked first (both files' schema,
    the model's type and shape against the saved ones, every tensor's name, shape and dtype against the parameters
    the config gives this model); any problem raises a ValueError naming the file and leaves ``model`` exactly as it
    was. Tensors are cast to the parameters' dtype (floating point only)."""
    files = read_adapter(directory)
    saved_shape, shape = files.base_model, _base_shape(model)
    mismatched = {k: (saved_shape.get(k), v) for k, v in shape.items() if saved_shape.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"{files.config_path}: the adapter at {files.directory} was saved from a model of another shape ({details})"
        )
    plan = None
    if is_mit_model(model):
        if model.mit_config.to_dict() != files.config.to_dict():
            raise ValueError(
                f"{files.config_path}: the model's MiT config {model.mit_config} differs from the adapter's "
                f"{files.config}"
            )
        params = dict(model.mit_named_parameters())
    else:
        plan = plan_mit(model, files.config)  # builds the new modules; the model is not touched yet
        params = dict(plan.named_parameters())
    _check_tensors(files, params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(files.tensors[name])
    if plan is not None:
        plan.install(model)
    return model
