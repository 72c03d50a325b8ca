"""mit: Multimodal Infusion Tuning for large language models.

    import mit
    model = mit.apply_mit(model, mit.MiTConfig(modality_dim=768))   # frozen base + zero-initialised infusion
    out = model(input_ids, attention_mask=mask, modality_embedding=emb)
    mit.save_adapter(model, "out/");  mit.load_adapter(fresh_model, "out/")
    model = mit.from_pretrained("base-model-name-or-dir", "out/")   # base model + adapter (MiT or neural) in one call
    with mit.disable_adapter(model): ...                            # the base model, bit for bit
    emb = mit.ImageEmbedder.from_pretrained("clip-dir/")(["cat.jpg"])  # pictures -> modality embeddings
    base = mit.unload(model)                                         # the base model back, exactly

Subpackages: :mod:`mit.integrations` (MiT on Hugging Face models, adapters), :mod:`mit.tuning` (encoders, heads,
data, tasks, trainer; optional), :mod:`mit.demo` (optional), :mod:`mit.utils`. The fused operations live in
:mod:`mit_kernels`. ``import mit`` loads only the integration: the tuning framework's names below (``mit.Trainer``,
``mit.CLIPImageEncoder``, ...) and neural tuning's (``mit.apply_neural_tuning``, ``mit.NeuralTuningConfig``, ...,
:mod:`mit.neural`) are imported on first use.
"""

from __future__ import annotations

import importlib

from mit_kernels import __version__, mit_attention, mit_ffn_gate

from . import models
from .config import MiTConfig, default_layers
from .integrations import (
    FAMILIES,
    MiTFFNInfusion,
    MiTKVInfusion,
    MiTModelMixin,
    apply_mit,
    count_parameters,
    is_mit_model,
    mit_named_parameters,
)
from .integrations.adapter import load_adapter, save_adapter
from .lifecycle import disable_adapter, from_pretrained, set_adapter, unload

_TUNING = ("CLIPImageEncoder", "ClassificationHead", "RegressionHead", "SegmentationDecoder", "SequenceEncoder",
           "RunConfig", "TaskSpec", "Trainer", "register_task")  # fmt: skip


_NEURAL = ("NeuralTuningConfig", "apply_neural_tuning", "load_neural_adapter", "save_neural_adapter")


def __getattr__(name: str):
    if name == "ImageEmbedder":  # pictures -> modality embeddings (transformers' CLIP processor and tower; PIL)
        return importlib.import_module(".image_embedder", __name__).ImageEmbedder
    if name in _TUNING:
        return getattr(importlib.import_module(".tuning", __name__), name)
    if name in _NEURAL:
        return getattr(importlib.import_module(".neural", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "CLIPImageEncoder",
    "ClassificationHead",
    "ImageEmbedder",
    "MiTConfig",
    "MiTFFNInfusion",
    "MiTKVInfusion",
    "MiTModelMixin",
    "NeuralTuningConfig",
    "RegressionHead",
    "RunConfig",
    "SegmentationDecoder",
    "SequenceEncoder",
    "TaskSpec",
    "Trainer",
    "__version__",
    "apply_mit",
    "apply_neural_tuning",
    "count_parameters",
    "default_layers",
    "disable_adapter",
    "from_pretrained",
    "is_mit_model",
    "load_adapter",
    "load_neural_adapter",
    "mit_attention",
    "mit_ffn_gate",
    "mit_named_parameters",
    "models",
    "register_task",
    "save_adapter",
    "save_neural_adapter",
    "set_adapter",
    "unload",
]
