"""Save and load only the MiT parameters (safetensors) with the MiT config and the base model's shape (JSON).

Format ``mit-adapter-v2`` (this release): tensor names are the model's own parameter names
(``model.layers.3.self_attn.mit_kv_infusion.map.weight`` ...), and ``base_model`` records ``model_type``.
Format ``mit-adapter-v1`` (release 0.1.0, Llama only) named them ``self_attn.infusion.*``, ``self_attn.head_logit`` and
``mlp.ffn_infusion.*``; :func:`load_adapter` renames them on load (:func:`convert_v1_names`).

Both directions are atomic: :func:`save_adapter` validates what it will write (the config again, and the parameters
against it), then writes the directory as one unit (a new directory swapped in:
:mod:`mit.integrations.directory_swap`); :func:`load_adapter` reads both files from one snapshot and validates them
and everything they imply for the model before it changes it. The files' schema and the reader / validator, shared
with neural tuning's adapters: :mod:`mit.integrations.adapter_files`.
"""

from __future__ import annotations

import os
import pathlib

import torch

from .adapter_files import (
    CONFIG_NAME,
    FORMAT,
    MIT_SCHEMA,
    WEIGHTS_NAME,
    base_shape,
    check_adapter_tensors,
    check_base_shape,
    check_saved_tensors,
    convert_v1_names,
    read_adapter,
    write_adapter,
)
from .model import is_mit_model, plan_mit, planned_mit_parameters

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "convert_v1_names", "load_adapter", "save_adapter"]


def save_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (MiT parameters only) and ``mit_config.json`` into ``directory`` as one
    unit, and return ``directory``.

    Checked first, nothing written otherwise (ValueError naming the field): ``model.mit_config`` again (it may have
    been changed since :func:`mit.apply_mit`), and the model's MiT parameters against the ones that config gives the
    base model, i.e. what :func:`load_adapter` will check. ``directory`` must be new, empty or hold only a previous
    MiT adapter, which is replaced as a whole: a reader sees the previous adapter or the new one, and a failed or
    interrupted save leaves the previous one loadable."""
    if not is_mit_model(model):
        raise ValueError(f"save_adapter needs a model returned by mit.apply_mit, got {type(model).__name__}")
    config = MIT_SCHEMA.revalidate(model.mit_config, "save_adapter: model.mit_config")
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.mit_named_parameters()}
    check_saved_tensors("save_adapter", tensors, planned_mit_parameters(model, config), "model.mit_config")
    meta = {"mit_config": config.to_dict(), "base_model": base_shape(model), "format": FORMAT}
    write_adapter(directory, MIT_SCHEMA, meta, tensors)
    return pathlib.Path(directory)


def load_adapter(model, directory: str | os.PathLike):
    """Load an adapter saved by :func:`save_adapter` (this release's format or ``mit-adapter-v1``) into ``model`` and
    return it.

    A plain model gets :func:`mit.apply_mit` with the saved config. Everything is checked first (both files' schema,
    the model's type and shape against the saved ones, every tensor's name, shape and dtype against the parameters
    the config gives this model); any problem raises a ValueError naming the file and leaves ``model`` exactly as it
    was. Tensors are cast to the parameters' dtype (floating point only)."""
    files = read_adapter(directory, MIT_SCHEMA)
    check_base_shape(files, model)
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
    shapes = {name: param.shape for name, param in params.items()}
    check_adapter_tensors(files, shapes, "the MiT parameters its config gives this model")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(files.tensors[name])
    if plan is not None:
        plan.install(model)
    return model
