"""MiT on Hugging Face decoder models through transformers' extension points (no copied ``forward``).

- :mod:`.families`: the supported ``model_type`` table;
- :mod:`.infusion`: the trainable modules (``mit_kv_infusion``, ``mit_ffn_infusion``);
- :mod:`.attention`: the attention function registered in ``AttentionInterface`` (fused kernel or exact fallback);
- :mod:`.layers`: pass-through decoder-layer and MLP subclasses (the embedding's way to the MLP);
- :mod:`.scope`: the per-thread bindings of one call (the embedding from a decoder layer to its MLP, the ``generate``
  cache of the infusion maps' outputs);
- :mod:`.model`: ``apply_mit`` (``plan_mit`` + ``MiTPlan.install``) and the top-level ``forward`` with
  ``modality_embedding``;
- :mod:`.adapter_files` / :mod:`.adapter`: the adapter files' schema, reader, validator and writer (shared with
  neural tuning's adapters) / ``save_adapter``, ``load_adapter``;
- :mod:`.lifecycle`: ``from_pretrained`` (base model + adapter in one call), ``disable_adapter``, ``unload`` (the
  base model back exactly), for both methods;
- :mod:`.directory_swap`: directories written and read as one unit (how adapters are saved and read).
"""

from __future__ import annotations

from .attention import key_padding_mask, mit_implementation
from .families import FAMILIES, FamilySpec
from .infusion import MiTFFNInfusion, MiTKVInfusion, mit_named_parameters
from .lifecycle import adapter_kind, disable_adapter, from_pretrained, unload
from .model import (
    MiTModelMixin,
    MiTPlan,
    apply_mit,
    count_parameters,
    decoder_of,
    is_mit_model,
    padding_aware_position_ids,
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
    "adapter_kind",
    "apply_mit",
    "count_parameters",
    "decoder_of",
    "disable_adapter",
    "from_pretrained",
    "is_mit_model",
    "key_padding_mask",
    "mit_implementation",
    "mit_named_parameters",
    "padding_aware_position_ids",
    "plan_mit",
    "planned_mit_parameters",
    "unload",
    "unload_mit",
]
