"""Tasks: the registry (:mod:`.registry`), what tasks share (:mod:`.base`) and the tasks, one module each (the
paper's three, and neural tuning's ``multitask``). To add a task, write a module that builds a :class:`TaskSpec` and
register it: in this file for a built-in task, or with :func:`register_task` from your own code."""

from __future__ import annotations

from . import classification, multitask, refseg, sentiment
from .base import (
    TaskModel,
    batch_to,
    build_task_model,
    check_llm_path,
    load_llm,
    make_collate,
    pad_sequences,
    resolve_dtype,
    trainable_state_dict,
)
from .registry import (
    DatasetSpec,
    TaskSpec,
    dataset_names,
    get_task,
    register_task,
    registered_tasks,
    task_names,
    unregister_task,
)

for _spec in (refseg.SPEC, classification.SPEC, sentiment.SPEC, multitask.SPEC):
    register_task(_spec, replace=True)

__all__ = [
    "DatasetSpec",
    "TaskModel",
    "TaskSpec",
    "batch_to",
    "build_task_model",
    "check_llm_path",
    "dataset_names",
    "get_task",
    "load_llm",
    "make_collate",
    "pad_sequences",
    "register_task",
    "registered_tasks",
    "resolve_dtype",
    "task_names",
    "trainable_state_dict",
    "unregister_task",
]
