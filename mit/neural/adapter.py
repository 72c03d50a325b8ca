"""Save and load only the neural-tuning parameters (safetensors) with the config and the base model's shape (JSON).

Format ``mit-neural-adapter-v1``: tensor names are the model's own parameter names (``model.layers.3.self_attn.
nt_neurons.z_proj.weight``, ``nt_image_projection.proj.weight``, ``nt_new_tokens.embedding`` ...); the JSON file
``neural_config.json`` holds exactly ``format``, ``neural_config``, ``new_token_ids`` (one non-negative int per new
token, contiguous) and ``base_model``. Reading, validation and the atomic directory write are MiT's
(:mod:`mit.hf.adapter_files`, :data:`NEURAL_SCHEMA`): the same checks, the same ValueErrors naming the file
and the field, and a model (and tokenizer) left as they were when anything is wrong.
"""

from __future__ import annotations

import os
import pathlib

import torch

from ..hf.adapter_files import (
    WEIGHTS_NAME,
    AdapterSchema,
    base_shape,
    check_adapter_tensors,
    check_base_shape,
    check_saved_tensors,
    is_int,
    read_adapter,
    write_adapter,
)
from ..hf.classes import Rebuildable
from .config import NeuralTuningConfig
from .model import (
    DEFAULT_ADAPTER,
    _ids_after_adding,
    active_neural_adapter,
    add_neural_adapter,
    apply_neural_tuning,
    check_adapter_name,
    is_neural_model,
    neural_adapters,
    neural_named_parameters,
    plan_neural_adapter,
    planned_neural_parameters,
)

CONFIG_NAME = "neural_config.json"
FORMAT = "mit-neural-adapter-v1"

__all__ = ["CONFIG_NAME", "FORMAT", "NEURAL_SCHEMA", "WEIGHTS_NAME", "load_neural_adapter", "save_neural_adapter"]


def check_new_token_ids(value: object, config: NeuralTuningConfig) -> list[int]:
    """``new_token_ids`` for ``config``: one non-negative int per new token, contiguous; ValueError saying what was
    expected otherwise."""
    if not (isinstance(value, list) and all(is_int(i) and i >= 0 for i in value)):
        raise ValueError(f"expected a list of non-negative ints, got {value!r:.80}")
    if len(value) != len(config.new_tokens):
        raise ValueError(
            f"expected one id per new token of the config ({len(config.new_tokens)}: {config.new_tokens}), got {value}"
        )
    if value and value != list(range(value[0], value[0] + len(value))):
        raise ValueError(f"expected contiguous ids (the new tokens' rows), got {value}")
    return list(value)


NEURAL_SCHEMA = AdapterSchema(
    kind="neural-tuning",
    config_name=CONFIG_NAME,
    format=FORMAT,
    config_field="neural_config",
    config_class=NeuralTuningConfig,
    extra_fields={"new_token_ids": check_new_token_ids},
)


def save_neural_adapter(model, directory: str | os.PathLike, adapter_name: str | None = None) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (neural-tuning parameters only) and ``neural_config.json`` into
    ``directory`` as one unit, and return ``directory``. ``adapter_name``: which of the model's adapters (default: the
    active one); the tensors are named as the model's parameters are while that adapter is active, whichever is.

    Checked first, nothing written otherwise (ValueError naming the field): the adapter's config and new token ids
    again (for the active one ``model.neural_config`` and ``model.nt_new_token_ids``: they may have been changed since
    :func:`mit.apply_neural_tuning`), and its parameters against the ones that config gives the base model, i.e. what
    :func:`load_neural_adapter` will check. ``directory`` must be new, empty or hold only a previous neural-tuning
    adapter, which is replaced as a whole (a failed or interrupted save leaves it loadable)."""
    if not is_neural_model(model):
        raise ValueError(
            f"save_neural_adapter needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}"
        )
    adapters = neural_adapters(model)
    name = active_neural_adapter(model) if adapter_name is None else adapter_name
    if name not in adapters:
        raise ValueError(f"adapter_name {name!r} is not an adapter of this model; its adapters: {sorted(adapters)}")
    if name == active_neural_adapter(model):
        where, config, ids = "model.neural_config", model.neural_config, model.nt_new_token_ids
        named, ids_where = neural_named_parameters(model), "model.nt_new_token_ids"
    else:
        adapter = adapters[name]
        where, config, ids = f"the config of adapter {name!r}", adapter.config, adapter.new_token_ids
        named, ids_where = list(adapter.named_parameters(model)), f"the new token ids of adapter {name!r}"
    config = NEURAL_SCHEMA.revalidate(config, f"save_neural_adapter: {where}")
    try:
        token_ids = check_new_token_ids(ids, config)
    except ValueError as error:
        raise ValueError(f"save_neural_adapter: {ids_where}: {error}") from None
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in named}
    expected = planned_neural_parameters(model, config, token_ids or None)
    check_saved_tensors("save_neural_adapter", tensors, expected, where)
    meta = {
        "neural_config": config.to_dict(),
        "new_token_ids": token_ids,
        "base_model": base_shape(model),
        "format": FORMAT,
    }
    write_adapter(directory, NEURAL_SCHEMA, meta, tensors)
    return pathlib.Path(directory)


def load_neural_adapter(model, directory: str | os.PathLike, tokenizer=None, adapter_name: str | None = None):
    """Load an adapter saved by :func:`save_neural_adapter` into ``model`` and return it.

    A plain model gets :func:`apply_neural_tuning` with the saved config first, as adapter ``adapter_name`` (default
    ``"default"``). On a neural-tuning model: without ``adapter_name``, or with the name of one of its adapters, the
    weights go into that adapter (the active one by default), whose config and new token ids must equal the saved
    ones; with a new name, the adapter is added, inactive (``model.set_adapter(name)`` switches to it), with its own
    config: its own layers, image dim and new tokens.

    With ``tokenizer``, the saved new tokens are added to it (for a plain model or a new adapter) and must get the
    saved ids; without, the vocabulary is resized to the saved ids. Everything is checked before the first change, as
    :func:`mit.load_adapter` does: both files' schema (:data:`NEURAL_SCHEMA`), the model's type and shape, every
    tensor's name, shape and dtype, and the ids the tokenizer would give; any problem is a ValueError naming the file
    (or the tokenizer) and the field, and the model and the tokenizer stay as they were. Tensors are cast to the
    parameters' dtype."""
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    files = read_adapter(directory, NEURAL_SCHEMA)
    config, saved_ids = files.config, files.extra["new_token_ids"]
    plain = not is_neural_model(model)
    add = None
    if not plain:
        adapters = neural_adapters(model)
        name = active_neural_adapter(model) if adapter_name is None else adapter_name
        if name in adapters:
            if name == active_neural_adapter(model):
                current, current_ids = model.neural_config, model.nt_new_token_ids
            else:
                current, current_ids = adapters[name].config, adapters[name].new_token_ids
            if current.to_dict() != config.to_dict() or list(current_ids) != saved_ids:
                raise ValueError(
                    f"{files.config_path}: the neural config of the model's adapter {name!r}, {current} (new token ids "
                    f"{list(current_ids)}), differs from the adapter's {config} ({saved_ids}) (load it under a new "
                    "adapter_name to add it)"
                )
    elif isinstance(model, Rebuildable):
        raise ValueError(
            f"load_neural_adapter needs a plain model or a neural-tuning one; this one is a {type(model).__name__}"
        )
    check_base_shape(files, model)
    # everything is checked before the first change (tokenizer, embedding size, modules, parameters): a bad adapter
    # leaves the model and the tokenizer as they were
    new_adapter = plain or name not in adapters
    if new_adapter and tokenizer is not None and config.new_tokens:
        ids = _ids_after_adding(tokenizer, list(config.new_tokens))
        if ids != saved_ids:
            raise ValueError(
                f"{files.config_path}: the tokenizer would give the new tokens ids {ids}, the adapter was saved "
                f"with {saved_ids}"
            )
    if plain:
        expected = planned_neural_parameters(model, config, saved_ids or None)
    else:
        if name not in adapters:
            add = plan_neural_adapter(model, config, name, new_token_ids=saved_ids or None)
            params = dict(add.named_parameters(model))
        elif name == active_neural_adapter(model):
            params = dict(neural_named_parameters(model))
        else:
            params = dict(adapters[name].named_parameters(model))
        expected = {n: p.shape for n, p in params.items()}
    check_adapter_tensors(files, expected, "the neural-tuning parameters its config gives this model")
    if new_adapter and tokenizer is not None and config.new_tokens:
        tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
    if plain:
        apply_neural_tuning(
            model,
            config,
            new_token_ids=saved_ids or None,
            adapter_name=DEFAULT_ADAPTER if adapter_name is None else adapter_name,
        )
        params = dict(neural_named_parameters(model))
    with torch.no_grad():
        for n, param in params.items():
            param.copy_(files.tensors[n])
    if add is not None:
        add_neural_adapter(model, config, name, new_token_ids=saved_ids or None, adapter=add)
    return model
