"""Building a run's model: the frozen image encoder (tasks with images), the method's configuration fitted to it,
the frozen LLM with the task's method applied and the task's heads attached, and the batch collation."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .config import EncoderConfig, RunConfig
from .tasks import TaskSpec, build_task_model, load_llm, make_collate


@contextlib.contextmanager
def quiet_loading(quiet: bool) -> Iterator[None]:
    """transformers' weight-loading progress bar off while ``quiet`` (``--no-progress``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def build_encoder(settings: EncoderConfig, dtype: torch.dtype):
    """The frozen CLIP image encoder of ``settings`` in ``dtype``; ValueError when ``settings.image_size`` is not its
    input size."""
    from .encoders import CLIPImageEncoder

    encoder = CLIPImageEncoder(
        settings.encoder,
        settings.encoder_pretrained,
        settings.feature_layers,
        settings.encoder_backend,
        settings.quick_gelu,
    )
    encoder.to(dtype)
    image_size = settings.image_size or encoder.image_size
    if image_size != encoder.image_size:
        raise ValueError(f"image_size: expected the CLIP model's input size {encoder.image_size}, got {image_size}")
    return encoder


def resolve_config(config: RunConfig, encoder=None) -> RunConfig:
    """``config`` with its method's configuration fitted to ``encoder`` (e.g. MiT's ``modality_dim``, neural
    tuning's ``image_dim``: the encoder wins over what was given) and completed by the method (e.g. neural tuning's
    default task tokens)."""
    method = config.method
    method_config = config.method_config
    if encoder is not None:
        method_config = method.fit_to_encoder(method_config, encoder)
    method_config = method.prepare(method_config)
    return config if method_config == config.method_config else config.with_method_config(method_config)


@dataclasses.dataclass
class BuiltModel:
    """What :func:`build_model` returns: the task model (method applied, heads attached), its tokenizer and the
    collate function of its batches."""

    model: nn.Module
    tokenizer: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


def build_model(config: RunConfig, spec: TaskSpec, dtype: torch.dtype, encoder=None, dataset=None) -> BuiltModel:
    """Load the frozen LLM of ``config``, apply the task's method (``config.method_config``, already resolved by
    :func:`resolve_config`) and attach the task's heads (``config.head_settings()``); ``dataset`` is the evaluation
    dataset (e.g. for the number of classes)."""
    with quiet_loading(not config.run.progress):
        llm, tokenizer = load_llm(config.llm.model, dtype, causal_lm=spec.causal_lm)
    model = build_task_model(
        spec,
        llm,
        config.method_config,
        encoder=encoder,
        dataset=dataset,
        heads=config.head_settings(),
        tokenizer=tokenizer,
    )
    collate = make_collate(spec, tokenizer, config.llm.padding_side, config.llm.max_length)
    return BuiltModel(model, tokenizer, collate)


__all__ = ["BuiltModel", "build_encoder", "build_model", "quiet_loading", "resolve_config"]
