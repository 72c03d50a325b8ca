"""mit: Multimodal Infusion Tuning for large language models.

    import mit
    model = mit.apply_mit(model, mit.MiTConfig(modality_dim=768))   # frozen base + zero-initialised infusion
    out = model(input_ids, attention_mask=mask, modality_embedding=emb)
    mit.save_adapter(model, "out/");  mit.load_adapter(fresh_model, "out/")

The fused operations live in :mod:`mit_kernels`.
"""

from __future__ import annotations

from mit_kernels import __version__, mit_attention, mit_ffn_gate

from . import models
from .adapter import load_adapter, save_adapter
from .config import MiTConfig, default_layers
from .encoders import CLIPImageEncoder, SequenceEncoder
from .heads import ClassificationHead, RegressionHead, SegmentationDecoder
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
from .trainer import TrainConfig, Trainer

__all__ = [
    "FAMILIES",
    "CLIPImageEncoder",
    "ClassificationHead",
    "MiTConfig",
    "MiTFFNInfusion",
    "MiTKVInfusion",
    "MiTModelMixin",
    "RegressionHead",
    "SegmentationDecoder",
    "SequenceEncoder",
    "TrainConfig",
    "Trainer",
    "__version__",
    "apply_mit",
    "count_parameters",
    "default_layers",
    "is_mit_model",
    "load_adapter",
    "mit_attention",
    "mit_ffn_gate",
    "mit_named_parameters",
    "models",
    "save_adapter",
]
