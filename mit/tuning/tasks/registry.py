"""The task registry: one :class:`TaskSpec` per task, read by the run config, the trainer and the ``mit`` command.

A task is everything the trainer needs to tune a frozen LLM on one kind of problem: its datasets (with their default
splits and how to build them), its tuning method (:mod:`mit.tuning.methods`), how to attach an encoder and a head to
the tuned LLM (and the head's settings, a dataclass of the task's own), how to batch its samples, which per-sample
records evaluation keeps and which metrics they give, and which metric selects the better run. Adding a task is one
module that builds a ``TaskSpec`` plus one :func:`register_task` call (the built-in tasks are registered in
:mod:`mit.tuning.tasks`); ``mit train --task <name>`` then accepts it.

This module imports nothing of the run configuration: the configuration reads the registry (task names, datasets,
head settings), never the other way round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..methods import TuningMethod, get_method

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from ..encoders import CLIPImageEncoder

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a task.

    Attributes:
        name: the ``--dataset`` value.
        splits: (training split, evaluation split) used when ``--train-split`` / ``--eval-split`` are not given.
        build: ``build(data, split, preprocessing, limit) -> Dataset``; ``data`` is the run's
            :class:`~mit.tuning.config.DataConfig`, ``preprocessing`` the image encoder's
            :class:`~mit.tuning.image_preprocessing.ImagePreprocessing` (its ``size`` is the input resolution; None
            for tasks without an image encoder). Each item is a dict with at least ``"prompt"`` (str) and ``"id"``
            (str).
    """

    name: str
    splits: tuple[str, str]
    build: Callable[[Any, str, Any, int | None], Dataset]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific, for the trainer and the command line.

    Attributes:
        name: the ``--task`` value.
        description: one line for ``mit train --help``.
        datasets: the task's datasets; the first one is the default ``--dataset``.
        selection_metric: the evaluation metric that decides "better"; ``higher_is_better`` its direction.
        uses_image_encoder: the run builds a CLIP image encoder (``--encoder*`` settings); the method's sizes then
            follow it (:meth:`TuningMethod.fit_to_encoder <mit.tuning.methods.TuningMethod.fit_to_encoder>`).
        build_model: ``build_model(llm, method_config, encoder, dataset, heads) -> nn.Module``; ``llm`` already has
            the method applied; ``dataset`` is the evaluation dataset (for e.g. its number of classes); ``heads`` an
            instance of ``head_settings`` (None when the task has none). The module's ``forward(batch)`` returns
            ``{"logits": ..., "loss": ...}`` (loss when the batch has targets).
        collate: ``collate(items) -> dict`` of the task's own batch entries (images, targets, ...); the prompts'
            ``input_ids`` / ``attention_mask`` and the ``id`` list are added by the trainer.
        records: ``records(batch, out) -> list`` of per-sample evaluation records (any picklable values: they are
            gathered over processes).
        metrics: ``metrics(records) -> {name: value}``; must include ``selection_metric``.
        method: the :class:`~mit.tuning.methods.TuningMethod` that adapts the LLM, or the name of a registered one
            (``"mit"``, ``"neural"``), resolved once here; ``build_model`` receives its configuration (the run's
            section ``method.config_section``).
        head_settings: a dataclass of the task's head settings (fields made with :func:`mit.utils.settings.setting`:
            they become flags and ``heads.<name>`` config keys); None: the task has none.
        causal_lm: load the LLM with its LM head (``AutoModelForCausalLM``) instead of the bare decoder.
        encode: ``encode(tokenizer, items, padding_side, max_length) -> dict`` replacing the prompt tokenisation
            (e.g. prompt + answer with ``labels``); None: the prompts alone.
        order: ``order(dataset, indices) -> indices``: rearranges a process's shuffled training indices before they
            are cut into batches (e.g. to mix tasks equally in every batch); None: keep the shuffled order.
    """

    name: str
    description: str
    datasets: tuple[DatasetSpec, ...]
    selection_metric: str
    higher_is_better: bool
    uses_image_encoder: bool
    build_model: Callable[[nn.Module, Any, CLIPImageEncoder | None, Dataset, Any], nn.Module]
    collate: Callable[[list[dict[str, Any]]], Batch]
    records: Callable[[Batch, dict[str, torch.Tensor]], list[Any]]
    metrics: Callable[[list[Any]], dict[str, float]]
    method: TuningMethod | str = "mit"
    causal_lm: bool = False
    encode: Callable[[Any, list[dict[str, Any]], str, int | None], Batch] | None = None
    order: Callable[[Dataset, list[int]], list[int]] | None = None
    head_settings: type | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", get_method(self.method))  # frozen: resolved once, here
        except ValueError as error:
            raise ValueError(f"TaskSpec {self.name!r}: {error}") from None
        if self.head_settings is not None and not dataclasses.is_dataclass(self.head_settings):
            raise ValueError(f"TaskSpec {self.name!r}: head_settings: expected a dataclass, got {self.head_settings!r}")
        if not self.datasets:
            raise ValueError(f"TaskSpec {self.name!r}: datasets: expected at least one DatasetSpec, got none")

    def dataset(self, name: str | None) -> DatasetSpec:
        """The dataset called ``name`` (None: the default), or ValueError listing this task's datasets."""
        if name is None:
            return self.datasets[0]
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise ValueError(
            f"dataset: expected one of {[d.name for d in self.datasets]} for task {self.name}, got {name!r}"
        )


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make ``spec`` available to the trainer and to ``mit train --task``; ValueError if the name is taken (unless
    ``replace``)."""
    if not isinstance(spec, TaskSpec):
        raise ValueError(f"spec: expected a TaskSpec, got {type(spec).__name__}")
    if spec.name in _TASKS and not replace:
        raise ValueError(f"task {spec.name!r} is already registered (pass replace=True to replace it)")
    _TASKS[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def get_task(name: str) -> TaskSpec:
    if name not in _TASKS:
        raise ValueError(f"task: expected one of {task_names()}, got {name!r}")
    return _TASKS[name]


def task_names() -> list[str]:
    return list(_TASKS)


def registered_tasks() -> list[TaskSpec]:
    """Every registered task, in registration order."""
    return list(_TASKS.values())


def dataset_names() -> list[str]:
    """Every registered task's datasets (``--dataset`` choices), in registration order."""
    return [d.name for spec in _TASKS.values() for d in spec.datasets]
