"""Save and load only the MiT parameters (safetensors) with the MiT config and the base model's shape (JSON).

Format ``mit-adapter-v2`` (this release): tensor names are the model's own parameter names
(``model.layers.3.self_attn.mit_kv_infusion.map.weight`` ...), and ``base_model`` records ``model_type``.
Format ``mit-adapter-v1`` (release 0.1.0, Llama only) named them ``self_attn.infusion.*``, ``self_attn.head_logit`` and
``mlp.ffn_infusion.*``; :func:`load_adapter` renames them on load (:func:`convert_v1_names`).

Both directions are atomic: :func:`save_adapter` validates what it will write (the config again, and the parameters
against it), then writes the directory as one unit (a new directory swapped in:
:mod:`mit.hf.directory_swap`); :func:`load_adapter` reads both files from one snapshot and validates them
and everything they imply for the model before it changes it. The files' schema and the reader / validator, shared
with neural tuning's adapters: :mod:`mit.hf.adapter_files`.
"""

from __future__ import annotations

import os
import pathlib
import re

import torch

from ..config import MiTConfig
from ..hf.adapter_files import (
    WEIGHTS_NAME,
    AdapterSchema,
    LegacyFormat,
    base_shape,
    check_adapter_tensors,
    check_base_shape,
    check_saved_tensors,
    read_adapter,
    write_adapter,
)
from .model import (
    ADAPTER_LOADER,
    DEFAULT_ADAPTER,
    active_mit_adapter,
    add_mit_adapter,
    check_adapter_name,
    is_mit_model,
    mit_adapters,
    plan_mit,
    plan_mit_adapter,
    planned_mit_parameters,
)

__all__ = ["CONFIG_NAME", "FORMAT", "MIT_SCHEMA", "WEIGHTS_NAME", "convert_v1_names", "load_adapter", "save_adapter"]

CONFIG_NAME = "mit_config.json"
FORMAT = "mit-adapter-v2"
V1_FORMAT = "mit-adapter-v1"

_V1_RENAMES = (
    (re.compile(r"\.self_attn\.infusion\.(weight|bias)$"), r".self_attn.mit_kv_infusion.map.\1"),
    (re.compile(r"\.self_attn\.head_logit$"), r".self_attn.mit_kv_infusion.head_logit"),
    (re.compile(r"\.mlp\.ffn_infusion\.(weight|bias)$"), r".mlp.mit_ffn_infusion.map.\1"),
)


def convert_v1_names(
    tensors: dict[str, torch.Tensor], source: str = "the mit-adapter-v1 file"
) -> dict[str, torch.Tensor]:
    """Rename the tensors of a ``mit-adapter-v1`` file to this release's parameter names (``self_attn.infusion.*`` ->
    ``self_attn.mit_kv_infusion.map.*``, ``self_attn.head_logit`` -> ``self_attn.mit_kv_infusion.head_logit``,
    ``mlp.ffn_infusion.*`` -> ``mlp.mit_ffn_infusion.map.*``).

    A file holding two spellings of one tensor (the old name and the new one) is a ValueError naming ``source`` and
    both names: which one was meant cannot be known."""
    converted: dict[str, torch.Tensor] = {}
    spelled: dict[str, str] = {}
    for name, tensor in tensors.items():
        new = name
        for pattern, replacement in _V1_RENAMES:
            new = pattern.sub(replacement, new)
        if new in converted:
            first, second = sorted((spelled[new], name))
            raise ValueError(
                f"{source}: holds both {first} and {second}, two spellings of the tensor {new}; expected one of them"
            )
        converted[new], spelled[new] = tensor, name
    return converted


MIT_SCHEMA = AdapterSchema(
    kind="MiT",
    config_name=CONFIG_NAME,
    format=FORMAT,
    config_field="mit_config",
    config_class=MiTConfig,
    legacy={V1_FORMAT: LegacyFormat(model_type="llama", rename=convert_v1_names)},  # v1: Llama models only
)


def save_adapter(model, directory: str | os.PathLike, adapter_name: str | None = None) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (MiT parameters only) and ``mit_config.json`` into ``directory`` as one
    unit, and return ``directory``. ``adapter_name``: which of the model's adapters (default: the active one); the
    tensors are named as the model's parameters are while that adapter is active, whichever is.

    Checked first, nothing written otherwise (ValueError naming the field): the adapter's config again (it may have
    been changed since :func:`mit.apply_mit`), and its parameters against the ones that config gives the base model,
    i.e. what :func:`load_adapter` will check. ``directory`` must be new, empty or hold only a previous MiT adapter,
    which is replaced as a whole: a reader sees the previous adapter or the new one, and a failed or interrupted save
    leaves the previous one loadable."""
    if not is_mit_model(model):
        raise ValueError(f"save_adapter needs a model returned by mit.apply_mit, got {type(model).__name__}")
    adapters = mit_adapters(model)
    name = active_mit_adapter(model) if adapter_name is None else adapter_name
    if name not in adapters:
        raise ValueError(f"adapter_name {name!r} is not an adapter of this model; its adapters: {sorted(adapters)}")
    plan = adapters[name]
    if name == active_mit_adapter(model):
        named, where, config = model.mit_named_parameters(), "model.mit_config", model.mit_config
    else:
        named, where, config = list(plan.named_parameters()), f"the config of adapter {name!r}", plan.config
    config = MIT_SCHEMA.revalidate(config, f"save_adapter: {where}")
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in named}
    check_saved_tensors("save_adapter", tensors, planned_mit_parameters(model, config), where)
    meta = {"mit_config": config.to_dict(), "base_model": base_shape(model), "format": FORMAT}
    write_adapter(directory, MIT_SCHEMA, meta, tensors)
    return pathlib.Path(directory)


def load_adapter(model, directory: str | os.PathLike, adapter_name: str | None = None):
    """Load an adapter saved by :func:`save_adapter` (this release's format or ``mit-adapter-v1``) into ``model`` and
    return it.

    A plain model gets :func:`mit.apply_mit` with the saved config, as adapter ``adapter_name`` (default
    ``"default"``). On an MiT model: without ``adapter_name``, or with the name of one of its adapters, the weights go
    into that adapter (the active one by default), whose config must equal the saved one; with a new name, the
    adapter is added, inactive (``model.set_adapter(name)`` switches to it), with its own config: its own layers and
    modality dim. Everything is checked first (both files' schema, the model's type and shape against the saved
    ones, every tensor's name, shape and dtype against the parameters the config gives this model); any problem
    raises a ValueError naming the file and leaves ``model`` exactly as it was. Tensors are cast to the parameters'
    dtype (floating point only)."""
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    files = read_adapter(directory, MIT_SCHEMA)
    check_base_shape(files, model)
    install = add = None
    if is_mit_model(model):
        adapters = mit_adapters(model)
        name = active_mit_adapter(model) if adapter_name is None else adapter_name
        if name in adapters:
            plan = adapters[name]
            current = model.mit_config if name == active_mit_adapter(model) else plan.config
            if current.to_dict() != files.config.to_dict():
                raise ValueError(
                    f"{files.config_path}: the MiT config of the model's adapter {name!r}, {current}, differs "
                    f"from the adapter's {files.config} (load it under a new adapter_name to add it)"
                )
        else:
            plan = add = plan_mit_adapter(model, files.config, name)
    else:
        plan = install = plan_mit(model, files.config)  # builds the new modules; the model is not touched yet
    params = dict(plan.named_parameters())
    shapes = {n: param.shape for n, param in params.items()}
    check_adapter_tensors(files, shapes, "the MiT parameters its config gives this model")
    with torch.no_grad():
        for n, param in params.items():
            param.copy_(files.tensors[n])
    if install is not None:
        install.install(model, DEFAULT_ADAPTER if adapter_name is None else adapter_name)
    if add is not None:
        add_mit_adapter(model, files.config, adapter_name, add)
    return model


ADAPTER_LOADER["load"] = load_adapter  # MiT models' load_adapter method (transformers' spelling) calls this
