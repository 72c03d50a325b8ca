"""The tuning framework: encoders, heads, losses, metrics, dataset adapters, tuning methods, tasks and the accelerate
trainer (built from parts: build, loaders, optim, loop, checkpoints, run_dir).

Optional part of the package (``pip install "mit[tuning]"``: PyYAML, Pillow; accelerate comes with the package). Its
modules are imported on first use of a name below, so ``import mit.tuning`` itself stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CLIPImageEncoder": "encoders",
    "SequenceEncoder": "encoders",
    "ClassificationHead": "heads",
    "RegressionHead": "heads",
    "SegmentationDecoder": "heads",
    "RunConfig": "config",
    "METHODS": "methods",
    "TuningMethod": "methods",
    "register_method": "methods",
    "TaskSpec": "tasks",
    "register_task": "tasks",
    "Trainer": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
