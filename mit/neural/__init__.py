"""Neural tuning (preview): the MiT authors' follow-up (arXiv 2408.03001), on the same integration machinery.

- :mod:`.config`: :class:`NeuralTuningConfig`;
- :mod:`.neurons`: the sparse task neurons of one layer and the per-forward cross-layer state;
- :mod:`.tokens`: image patch tokens before the prompt, trainable rows of new tokens;
- :mod:`.model`: :func:`apply_neural_tuning` and the ``NT<Class>`` subclasses; named adapters
  (:func:`add_neural_adapter`, :func:`set_neural_adapter`, :func:`delete_neural_adapter`, :func:`neural_adapters`);
  :func:`unload_neural` (the base model back) and :func:`disable_neural_adapter` (the base model inside a context);
- :mod:`.adapter`: :func:`save_neural_adapter` / :func:`load_neural_adapter`.
"""

from __future__ import annotations

from .adapter import load_neural_adapter, save_neural_adapter
from .config import TASK_TOKENS, NeuralTuningConfig
from .model import (
    NeuralAdapter,
    active_neural_adapter,
    add_neural_adapter,
    apply_neural_tuning,
    delete_neural_adapter,
    disable_neural_adapter,
    is_neural_model,
    neural_adapters,
    neural_named_parameters,
    set_neural_adapter,
    unload_neural,
)
from .neurons import NeuralState, NeuralTuningLayer, active_count, sparsify

__all__ = [
    "TASK_TOKENS",
    "NeuralAdapter",
    "NeuralState",
    "NeuralTuningConfig",
    "NeuralTuningLayer",
    "active_count",
    "active_neural_adapter",
    "add_neural_adapter",
    "apply_neural_tuning",
    "delete_neural_adapter",
    "disable_neural_adapter",
    "is_neural_model",
    "load_neural_adapter",
    "neural_adapters",
    "neural_named_parameters",
    "save_neural_adapter",
    "set_neural_adapter",
    "sparsify",
    "unload_neural",
]
