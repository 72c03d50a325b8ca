"""Neural tuning (preview): the MiT authors' follow-up (arXiv 2408.03001), on the same integration machinery.

- :mod:`.config`: :class:`NeuralTuningConfig`;
- :mod:`.neurons`: the sparse task neurons of one layer and the per-forward cross-layer state;
- :mod:`.tokens`: image patch tokens before the prompt, trainable rows of new tokens;
- :mod:`.model`: :func:`apply_neural_tuning` and the ``NT<Class>`` subclasses; :func:`unload_neural` (the base
  model back) and :func:`disable_neural_adapter` (the base model inside a context);
- :mod:`.adapter`: :func:`save_neural_adapter` / :func:`load_neural_adapter`.
"""

from __future__ import annotations

from .adapter import load_neural_adapter, save_neural_adapter
from .config import TASK_TOKENS, NeuralTuningConfig
from .model import (
    apply_neural_tuning,
    disable_neural_adapter,
    is_neural_model,
    neural_named_parameters,
    unload_neural,
)
from .neurons import NeuralState, NeuralTuningLayer, active_count, sparsify

__all__ = [
    "TASK_TOKENS",
    "NeuralState",
    "NeuralTuningConfig",
    "NeuralTuningLayer",
    "active_count",
    "apply_neural_tuning",
    "disable_neural_adapter",
    "is_neural_model",
    "load_neural_adapter",
    "neural_named_parameters",
    "save_neural_adapter",
    "sparsify",
    "unload_neural",
]
