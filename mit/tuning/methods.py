"""Tuning methods: how a task's frozen LLM is adapted, one object per method.

A :class:`TuningMethod` names the section of :class:`~mit.tuning.config.RunConfig` that configures it
(``config_section``, holding a ``config_type``), fits that configuration to the run's image encoder, applies itself to
the LLM and says what the trainer must know about it. The trainer, the task registry and the model builder only call
these methods: a third method is one subclass and one :func:`register_method` call (plus its RunConfig section).

Built in: ``"mit"`` (:class:`MiTMethod`, Multimodal Infusion Tuning, :func:`mit.apply_mit`) and ``"neural"``
(:class:`NeuralMethod`, neural tuning, :func:`mit.apply_neural_tuning`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

from torch import nn

from ..config import MiTConfig
from ..integrations import apply_mit
from ..neural import TASK_TOKENS, NeuralTuningConfig, apply_neural_tuning


class ImageEncoder(Protocol):
    """What a method reads of the run's image encoder: its global embedding size and its patch-token width."""

    embed_dim: int
    width: int


class TuningMethod:
    """Base of the tuning methods. Subclasses set ``name``, ``config_section`` and ``config_type`` and implement
    :meth:`apply`; the other hooks default to "nothing to do"."""

    name: ClassVar[str]
    config_section: ClassVar[str]  # the RunConfig field holding this method's configuration
    config_type: ClassVar[type]

    def fit_to_encoder(self, config: Any, encoder: ImageEncoder) -> Any:
        """``config`` with the sizes that follow the image encoder set from ``encoder`` (a copy; the encoder wins
        over what the user gave)."""
        return config

    def prepare(self, config: Any) -> Any:
        """``config`` completed with what this method needs before :meth:`apply` (a copy)."""
        return config

    def check(self, config: Any, task: str, encoder: ImageEncoder | None) -> None:
        """ValueError when ``config`` is not this method's configuration or does not fit ``encoder``."""
        if not isinstance(config, self.config_type):
            raise ValueError(
                f"method config: task {task!r} uses {self.name} and expects a {self.config_type.__name__}, got "
                f"{type(config).__name__}"
            )

    def apply(self, llm: nn.Module, config: Any, tokenizer: Any = None) -> nn.Module:
        """Adapt ``llm`` (frozen; in place where the method allows) and return the adapted model."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MiTMethod(TuningMethod):
    """Multimodal Infusion Tuning: one modality embedding per sample infused into the chosen layers; its size
    (``modality_dim``) is the image encoder's global embedding size."""

    name = "mit"
    config_section = "mit"
    config_type = MiTConfig

    def fit_to_encoder(self, config: MiTConfig, encoder: ImageEncoder) -> MiTConfig:
        return dataclasses.replace(config, modality_dim=encoder.embed_dim)

    def check(self, config: MiTConfig, task: str, encoder: ImageEncoder | None) -> None:
        super().check(config, task, encoder)
        if encoder is not None and config.modality_dim != encoder.embed_dim:
            raise ValueError(
                f"mit_config.modality_dim: expected the CLIP embedding size {encoder.embed_dim}, "
                f"got {config.modality_dim}"
            )

    def apply(self, llm: nn.Module, config: MiTConfig, tokenizer: Any = None) -> nn.Module:
        return apply_mit(llm, config)


class NeuralMethod(TuningMethod):
    """Neural tuning: sparse task neurons, image patch tokens projected into the sequence (their width,
    ``image_dim``, is the encoder's patch-token width) and new task tokens added to the tokenizer (default:
    :data:`mit.neural.TASK_TOKENS`)."""

    name = "neural"
    config_section = "neural"
    config_type = NeuralTuningConfig

    def fit_to_encoder(self, config: NeuralTuningConfig, encoder: ImageEncoder) -> NeuralTuningConfig:
        return dataclasses.replace(config, image_dim=encoder.width)

    def prepare(self, config: NeuralTuningConfig) -> NeuralTuningConfig:
        return config if config.new_tokens else dataclasses.replace(config, new_tokens=list(TASK_TOKENS))

    def check(self, config: NeuralTuningConfig, task: str, encoder: ImageEncoder | None) -> None:
        super().check(config, task, encoder)
        if encoder is not None and config.image_dim != encoder.width:
            raise ValueError(
                f"neural_config.image_dim: expected the CLIP width {encoder.width}, got {config.image_dim}"
            )

    def apply(self, llm: nn.Module, config: NeuralTuningConfig, tokenizer: Any = None) -> nn.Module:
        return apply_neural_tuning(llm, config, tokenizer)


MIT = MiTMethod()
NEURAL = NeuralMethod()
METHODS: dict[str, TuningMethod] = {MIT.name: MIT, NEURAL.name: NEURAL}


def register_method(method: TuningMethod, *, replace: bool = False) -> TuningMethod:
    """Make ``method`` available to :class:`~mit.tuning.tasks.TaskSpec` by its name; ValueError if the name is taken
    (unless ``replace``)."""
    if not isinstance(method, TuningMethod):
        raise ValueError(f"method: expected a TuningMethod, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ValueError(f"tuning method {method.name!r} is already registered (pass replace=True to replace it)")
    METHODS[method.name] = method
    return method


def get_method(method: str | TuningMethod) -> TuningMethod:
    """The registered method called ``method`` (a TuningMethod is returned as is); ValueError listing the names."""
    if isinstance(method, TuningMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return METHODS[method]


__all__ = [
    "METHODS",
    "MIT",
    "NEURAL",
    "ImageEncoder",
    "MiTMethod",
    "NeuralMethod",
    "TuningMethod",
    "get_method",
    "register_method",
]
