"""Save and load only the neural-tuning parameters (safetensors) with the config and the base model's shape (JSON).

Format ``mit-neural-adapter-v1``: tensor names are the model's own parameter names (``model.layers.3.self_attn.
nt_neurons.z_proj.weight``, ``nt_image_projection.proj.weight``, ``nt_new_tokens.embedding`` ...); the JSON file
``neural_config.json`` holds exactly ``format``, ``neural_config``, ``new_token_ids`` (one non-negative int per new
token, contiguous) and ``base_model``. Reading, validation and the atomic directory write are MiT's
(:mod:`mit.integrations.adapter_files`, :data:`NEURAL_SCHEMA`): the same checks, the same ValueErrors naming the file
and the field, and a model (and tokenizer) left as they were when anything is wrong.
"""

from __future__ import annotations

import os
import pathlib

import torch

from ..integrations.adapter_files import (
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
from ..integrations.classes import Rebuildable
from .config import NeuralTuningConfig
from .model import apply_neural_tuning, is_neural_model, neural_named_parameters, planned_neural_parameters

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


def save_neural_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (neural-tuning parameters only) and ``neural_config.json`` into
    ``directory`` as one unit, and return ``directory``.

    Checked first, nothing written otherwise (ValueError naming the field): ``model.neural_config`` again and
    ``model.nt_new_token_ids`` (they may have been changed since :func:`mit.apply_neural_tuning`), and the model's
    ``nt_*`` parameters against the ones that config gives the base model, i.e. what :func:`load_neural_adapter`
    will check. ``directory`` must be new, empty or hold only a previous neural-tuning adapter, which is replaced as a
    whole (a failed or interrupted save leaves it loadable)."""
    if not is_neural_model(model):
        raise ValueError(
            f"save_neural_adapter needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}"
        )
    config = NEURAL_SCHEMA.revalidate(model.neural_config, "save_neural_adapter: model.neural_config")
    try:
        token_ids = check_new_token_ids(model.nt_new_token_ids, config)
    except ValueError as error:
        raise ValueError(f"save_neural_adapter: model.nt_new_token_ids: {error}") from None
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in neural_named_parameters(model)}
    expected = planned_neural_parameters(model, config, token_ids or None)
    check_saved_tensors("save_neural_adapter", tensors, expected, "model.neural_config")
    meta = {
        "neural_config": config.to_dict(),
        "new_token_ids": token_ids,
        "base_model": base_shape(model),
        "format": FORMAT,
    }
    write_adapter(directory, NEURAL_SCHEMA, meta, tensors)
    return pathlib.Path(directory)


def load_neural_adapter(model, directory: str | os.PathLike, tokenizer=None):
    """Load an adapter saved by :func:`save_neural_adapter` into ``model`` (a plain model gets
    :func:`apply_neural_tuning` with the saved config first) and return it.

    With ``tokenizer``, the saved new tokens are added to it and must get the saved ids; without, the model is resized
    to the saved ids. Everything is checked before the first change, as :func:`mit.load_adapter` does: both files'
    schema (:data:`NEURAL_SCHEMA`), the model's type and shape, every tensor's name, shape and dtype, and the ids the
    tokenizer would give; any problem is a ValueError naming the file (or the tokenizer) and the field, and the model
    and the tokenizer stay as they were. Tensors are cast to the parameters' dtype."""
    files = read_adapter(directory, NEURAL_SCHEMA)
    config, saved_ids = files.config, files.extra["new_token_ids"]
    plain = not is_neural_model(model)
    if not plain:
        if model.neural_config.to_dict() != config.to_dict() or model.nt_new_token_ids != saved_ids:
            raise ValueError(
                f"{files.config_path}: the model's neural config {model.neural_config} (new token ids "
                f"{model.nt_new_token_ids}) differs from the adapter's {config} ({saved_ids})"
            )
    elif isinstance(model, Rebuildable):
        raise ValueError(
            f"load_neural_adapter needs a plain model or a neural-tuning one; this one is a {type(model).__name__}"
        )
    check_base_shape(files, model)
    # everything is checked before the first change (tokenizer, embedding size, modules, parameters): a bad adapter
    # leaves the model and the tokenizer as they were
    if plain:
        expected = planned_neural_parameters(model, config, saved_ids or None)
        if tokenizer is not None and config.new_tokens:
            ids = _ids_after_adding(tokenizer, list(config.new_tokens))
            if ids != saved_ids:
                raise ValueError(
                    f"{files.config_path}: the tokenizer would give the new tokens ids {ids}, the adapter was saved "
                    f"with {saved_ids}"
                )
    else:
        expected = {n: p.shape for n, p in neural_named_parameters(model)}
    check_adapter_tensors(files, expected, "the neural-tuning parameters its config gives this model")
    if plain:
        if tokenizer is not None and config.new_tokens:
            tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
        apply_neural_tuning(model, config, new_token_ids=saved_ids or None)
    params = dict(neural_named_parameters(model))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(files.tensors[name])
    return model


def _ids_after_adding(tokenizer, tokens: list[str]) -> list[int]:
    """The ids ``tokenizer.add_tokens(tokens)`` would give (a token already known keeps its id; new ones are numbered
    from ``len(tokenizer)`` in order), without adding them."""
    vocab = tokenizer.get_vocab()
    ids, following = [], len(tokenizer)
    for token in tokens:
        if token in vocab:
            ids.append(int(vocab[token]))
        else:
            vocab[token] = following
            ids.append(following)
            following += 1
    return ids
