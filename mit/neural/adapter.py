"""Save and load only the neural-tuning parameters (safetensors) with the config and the base model's shape (JSON).

Format ``mit-neural-adapter-v1``: tensor names are the model's own parameter names (``model.layers.3.self_attn.
nt_neurons.z_proj.weight``, ``nt_image_projection.proj.weight``, ``nt_new_tokens.embedding`` ...); the JSON file
``neural_config.json`` holds the config, the ids of the new tokens and the base model's shape, as MiT's adapters do
(both files are written atomically).
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors.torch import load_file, save_file

from ..integrations.adapter import WEIGHTS_NAME, _base_shape
from ..utils.files import atomic_write
from ..utils.tensors import check_tensors_match
from .config import NeuralTuningConfig
from .model import apply_neural_tuning, is_neural_model, neural_named_parameters, planned_neural_parameters

CONFIG_NAME = "neural_config.json"
FORMAT = "mit-neural-adapter-v1"


def save_neural_adapter(model, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` (neural-tuning parameters only) and ``neural_config.json``."""
    if not is_neural_model(model):
        raise ValueError(f"save_neural_adapter needs a model returned by mit.apply_neural_tuning, got {type(model)}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in neural_named_parameters(model)}
    meta = {
        "neural_config": model.neural_config.to_dict(),
        "new_token_ids": model.nt_new_token_ids,
        "base_model": _base_shape(model),
        "format": FORMAT,
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def load_neural_adapter(model, directory: str | os.PathLike, tokenizer=None):
    """Load an adapter saved by :func:`save_neural_adapter` into ``model`` (a plain model gets
    :func:`apply_neural_tuning` with the saved config first) and return it.

    With ``tokenizer``, the saved new tokens are added to it and must get the saved ids; without, the model is resized
    to the saved ids. A model of another shape, tensors that do not match, or a tokenizer that would give other ids
    raise ValueError naming the mismatch, before anything changes (model and tokenizer stay as they were)."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"no neural-tuning adapter at {directory}: missing {path.name}")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: adapter format {meta.get('format')!r}, expected {FORMAT!r}")
    config = NeuralTuningConfig.from_dict(meta["neural_config"])
    saved_ids = [int(i) for i in meta["new_token_ids"]]
    saved_shape = dict(meta["base_model"])
    if is_neural_model(model):
        if model.neural_config.to_dict() != config.to_dict() or model.nt_new_token_ids != saved_ids:
            raise ValueError(
                f"the model's neural config {model.neural_config} (new token ids {model.nt_new_token_ids}) differs "
                f"from the adapter's {config} ({saved_ids})"
            )
    shape = _base_shape(model)
    mismatched = {k: (saved_shape.get(k), v) for k, v in shape.items() if saved_shape.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"the adapter at {directory} was saved from a model of another shape ({details})")
    tensors = load_file(str(weights_path))
    plain = not is_neural_model(model)
    # everything is checked before the first change (tokenizer, embedding size, modules, parameters): a bad adapter
    # leaves the model and the tokenizer as they were
    if plain:
        expected = planned_neural_parameters(model, config, saved_ids or None)
        if tokenizer is not None and config.new_tokens:
            ids = _ids_after_adding(tokenizer, list(config.new_tokens))
            if ids != saved_ids:
                raise ValueError(
                    f"the tokenizer would give the new tokens ids {ids}, the adapter was saved with {saved_ids}"
                )
    else:
        expected = {n: p.shape for n, p in neural_named_parameters(model)}
    check_tensors_match(tensors, expected, str(weights_path))
    if plain:
        if tokenizer is not None and config.new_tokens:
            tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
        apply_neural_tuning(model, config, new_token_ids=saved_ids or None)
    params = dict(neural_named_parameters(model))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
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
