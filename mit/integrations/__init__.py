"""MiT on Hugging Face decoder models through transformers' extension points (no copied ``forward``).

- :mod:`.infusion`: the trainable modules (``mit_kv_infusion``, ``mit_ffn_infusion``);
- :mod:`.attention`: the attention function registered in ``AttentionInterface`` (fused kernel or exact fallback);
- :mod:`.layers`: pass-through decoder-layer and MLP subclasses (the embedding's way to the MLP);
- :mod:`.scope`: the per-thread bindings of one call (the embedding from a decoder layer to its MLP, the ``generate``
  cache of the infusion maps' outputs);
- :mod:`.model`: ``apply_mit`` (``plan_mit`` + ``MiTPlan.install``) and the top-level ``forward`` with
  ``modality_embedding``;
- :mod:`.adapter`: the MiT adapter's schema (``mit_config.json``), ``save_adapter``, ``load_adapter`` (the files'
  reader, validator and writer are shared with neural tuning: :mod:`mit.hf.adapter_files`).

What both methods share (families, class synthesis, the decoder, positions, forward signatures, adapter files,
reversibility) is :mod:`mit.hf`; what works on either method's model (``mit.from_pretrained``, ``mit.unload``,
``mit.disable_adapter``, ``mit.set_adapter``) is :mod:`mit.lifecycle`.
"""

from __future__ import annotations

from ..hf.decoder import count_parameters, decoder_of, padding_aware_position_ids
from ..hf.families import FAMILIES, FamilySpec
from . import adapter  # noqa: F401  (registers the loader MiT models' load_adapter calls)
from .attention import key_padding_mask, mit_implementation
from .infusion import MiTFFNInfusion, MiTKVInfusion, mit_named_parameters
from .model import (
    MiTModelMixin,
    MiTPlan,
    apply_mit,
    disable_mit_adapter,
    is_mit_model,
    plan_mit,
    planned_mit_parameters,
    unload_mit,
)

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "MiTFFNInfusion",
    "MiTKVInfusion",
    "MiTModelMixin",
    "MiTPlan",
    "apply_mit",
    "count_parameters",
    "decoder_of",
    "disable_mit_adapter",
    "is_mit_model",
    "key_padding_mask",
    "mit_implementation",
    "mit_named_parameters",
    "padding_aware_position_ids",
    "plan_mit",
    "planned_mit_parameters",
    "unload_mit",
]
