"""Fused kernels for Multimodal Infusion Tuning (MiT).

``mit_attention`` infuses a per-sample modality embedding into the keys and values of an attention layer, gated per
KV head, fused into a flash-attention forward and backward; ``mit_ffn_gate`` fuses the feed-forward infusion
``silu(gate) * up * (1 + ffn_mul)``. See ``docs/semantics.md`` for the exact equations and
``mit_kernels.reference`` for the readable specification every backend is tested against.
"""

from __future__ import annotations

import torch  # noqa: F401  (imported before any compiled extension)

from . import (
    cpu_backend,  # noqa: F401  (registers the C++ operators' Python side when a matching build exists)
    reference_op,  # noqa: F401  (registers the reference's opaque softmax attention for torch.compile)
)
from .attention import BACKENDS, mit_attention, resolve_backend
from .dispatch import MitKernelFallbackWarning
from .ffn import mit_ffn_gate
from .reference import mit_attention_reference, mit_ffn_gate_reference

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "MitKernelFallbackWarning",
    "__version__",
    "mit_attention",
    "mit_attention_reference",
    "mit_ffn_gate",
    "mit_ffn_gate_reference",
    "resolve_backend",
]
