"""Pass-through subclasses of a family's decoder layer and MLP: how the modality embedding reaches the MLP.

A decoder layer calls ``self.mlp(h)`` without kwargs, so the embedding, which reaches every layer through
transformers' ``**kwargs``, is bound for the MLP's :class:`~mit.integrations.infusion.MiTFFNInfusion` in the current
thread for the duration of the layer's forward (:mod:`mit.integrations.scope`; nothing is written to a module, so
concurrent calls on one model do not see each other's embedding). The layer's own ``forward`` runs unchanged
(``super().forward(*args, **kwargs)``): no transformers code is copied, and gradient checkpointing, which re-runs
``forward`` in backward, binds the embedding again during the recomputation (a set/clear forward pre-hook would not be
re-run: CheckpointError).
"""

from __future__ import annotations

import torch

from mit_kernels import mit_ffn_gate

from ..hf.classes import Rebuildable
from .attention import KV_INFUSION_NAME, MEMO_KWARG, is_mit_implementation
from .infusion import MiTFFNInfusion, check_modality
from .scope import CALL_SCOPE, FFNBinding, bind_ffn

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
    """Mixin of ``MiT<DecoderLayer>``: ``forward(*args, **kwargs)`` is the base layer's, with the embedding of
    ``kwargs`` bound for the MLP's infusion (in the current thread) while it runs."""

    def forward(self, *args, **kwargs):
        modality_embedding = kwargs.get("modality_embedding")
        memo = kwargs.get(MEMO_KWARG)
        if modality_embedding is not None and memo is None and KV_INFUSION_NAME in self.self_attn._modules:
            check_attention_dispatch(self.self_attn.config)  # (an MiT model's forward, which passes a memo, did)
        infusion: MiTFFNInfusion | None = self.mlp._modules.get(FFN_INFUSION_NAME)  # (no AttributeError when absent)
        if infusion is None or modality_embedding is None:
            return super().forward(*args, **kwargs)
        # bind_ffn(FFNBinding(...)) without its two Python frames (FFNBinding's generated __new__, bind_ffn): inside
        # a decoding step each Python function run once per infused layer costs ~5 us to bring back into the caches
        # (docs/decoding-cost.md); the scope's attribute is what bind_ffn sets
        previous = CALL_SCOPE.ffn
        CALL_SCOPE.ffn = tuple.__new__(FFNBinding, (infusion, modality_embedding, None, memo))
        try:
            return super().forward(*args, **kwargs)
        finally:
            CALL_SCOPE.ffn = previous


class MiTMLPMixin(Rebuildable):
    """Mixin of ``MiT<MLP>``: with an embedding, ``down(act(gate(x)) * up(x) * (1 + f))``; without one, the base
    MLP's forward, untouched.

    The embedding is the one its decoder layer bound in the current thread
    (:func:`~mit.integrations.scope.current_ffn`). Fused SwiGLU MLPs compute the product with
    :func:`mit_kernels.mit_ffn_gate`; every other MLP runs its own forward while a pre-hook on ``down_proj`` scales
    that projection's input by ``1 + f`` (bound the same way)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x`` (B, L, hidden) -> (B, L, hidden)."""
        infusion: MiTFFNInfusion = self._modules[FFN_INFUSION_NAME]
        binding = CALL_SCOPE.ffn  # current_ffn(infusion), inline (one Python frame less per infused layer)
        if binding is None or binding.infusion is not infusion:
            return super().forward(x, *args, **kwargs)
        modality_embedding, memo = binding.modality_embedding, binding.memo
        if infusion.fused:
            infusion.__dict__["last_dispatch"] = "fused"  # infusion.record("fused"), inline (one call less)
            infusion.dispatch_counts["fused"] += 1
            gate, up = self.gate_proj(x), self.up_proj(x)
            if memo is not None:  # the arguments are built here, once per call (or per generate: CallMemo.gate_plan)
                plans = memo.plans
                plan = plans.get(infusion) if plans is not None else None
                if (
                    plan is None
                    or plan.embedding is not modality_embedding
                    or plan.dtype is not x.dtype
                    or plan.gate_dtype is not gate.dtype
                ):  # (gate_plan's own check, inline: it makes or remakes the plan)
                    plan = memo.gate_plan(infusion, modality_embedding, x, gate)
                return self.down_proj(plan.function(gate, up, plan.ffn_mul))
            # no forward of an MiT model above: the public op (under autocast the projections run in the autocast
            # dtype while the residual stream x does not)
            check_modality(modality_embedding, x.shape[0], infusion.map.in_features)
            ffn_mul = infusion.multiplier(modality_embedding, x.dtype).to(gate.dtype)
            return self.down_proj(mit_ffn_gate(gate, up, ffn_mul, backend=infusion.backend))
        if memo is None or not memo.embedding_checked(modality_embedding, x.shape[0]):
            check_modality(modality_embedding, x.shape[0], infusion.map.in_features)
        ffn_mul = infusion.multiplier(modality_embedding, x.dtype)
        infusion.record("scaled down_proj input")
        previous = bind_ffn(FFNBinding(infusion, modality_embedding, 1 + ffn_mul))
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            bind_ffn(previous)
