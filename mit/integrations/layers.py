"""Pass-through subclasses of a family's decoder layer and MLP: how the modality embedding reaches the MLP.

A decoder layer calls ``self.mlp(h)`` without kwargs, so the embedding, which reaches every layer through
transformers' ``**kwargs``, is handed to the MLP's :class:`~mit.integrations.infusion.MiTFFNInfusion` for the
duration of the layer's forward. The layer's own ``forward`` runs unchanged (``super().forward(*args, **kwargs)``):
no transformers code is copied, and gradient checkpointing, which re-runs ``forward`` in backward, hands the embedding
over again during the recomputation (a set/clear forward pre-hook would not be re-run: CheckpointError).
"""

from __future__ import annotations

import torch

from mit_kernels import mit_ffn_gate

from .attention import KV_INFUSION_NAME, is_mit_implementation
from .classes import Rebuildable, register_kind
from .infusion import MiTFFNInfusion, check_modality

FFN_INFUSION_NAME = "mit_ffn_infusion"  # attribute of the MLP holding its MiTFFNInfusion


def check_attention_dispatch(config) -> None:
    """ValueError when attention under this model config would not reach MiT's attention function."""
    implementation = getattr(config, "_attn_implementation", None)
    if not is_mit_implementation(implementation):
        raise ValueError(
            f"the model's attention implementation is {implementation!r}, so MiT's key/value infusion would be "
            "skipped: it was changed after apply_mit (e.g. through config._attn_implementation). Call "
            "model.set_attn_implementation(...) on the MiT model, which keeps the infusion around the new "
            "implementation"
        )


class MiTDecoderLayerMixin(Rebuildable):
    """Mixin of ``MiT<DecoderLayer>``: ``forward(*args, **kwargs)`` is the base layer's, with the embedding handed to
    the MLP's infusion while it runs."""

    def forward(self, *args, **kwargs):
        modality_embedding = kwargs.get("modality_embedding")
        if modality_embedding is not None and hasattr(self.self_attn, KV_INFUSION_NAME):
            check_attention_dispatch(self.self_attn.config)
        infusion: MiTFFNInfusion | None = getattr(self.mlp, FFN_INFUSION_NAME, None)
        if infusion is None or modality_embedding is None:
            return super().forward(*args, **kwargs)
        infusion.modality = modality_embedding
        try:
            return super().forward(*args, **kwargs)
        finally:
            infusion.modality = None


class MiTMLPMixin(Rebuildable):
    """Mixin of ``MiT<MLP>``: with an embedding, ``down(act(gate(x)) * up(x) * (1 + f))``; without one, the base
    MLP's forward, untouched.

    Fused SwiGLU MLPs compute the product with :func:`mit_kernels.mit_ffn_gate`; every other MLP runs its own
    forward while a pre-hook on ``down_proj`` scales that projection's input by ``1 + f``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        infusion: MiTFFNInfusion = getattr(self, FFN_INFUSION_NAME)
        modality_embedding = infusion.modality
        if modality_embedding is None:
            return super().forward(x, *args, **kwargs)
        check_modality(modality_embedding, x.shape[0], infusion.map.in_features)
        ffn_mul = infusion.multiplier(modality_embedding, x.dtype)
        if infusion.fused:
            infusion.record("fused")
            gated = mit_ffn_gate(self.gate_proj(x), self.up_proj(x), ffn_mul, backend=infusion.backend)
            return self.down_proj(gated)
        infusion.record("scaled down_proj input")
        infusion.down_proj_scale = 1 + ffn_mul
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            infusion.down_proj_scale = None


register_kind("decoder_layer", MiTDecoderLayerMixin)
register_kind("mlp", MiTMLPMixin)
