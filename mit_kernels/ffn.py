"""MiT's FFN infusion gate: public entry point :func:`mit_ffn_gate` and backend selection.

MiT infuses the modality into a Llama MLP as ``down(silu(gate(x)) * up(x) * (1 + ffn_mul))``; this module computes the
part between the projections, ``silu(gate) * up * (1 + ffn_mul[:, None, :])``, with the backend that
:func:`mit_kernels.backends.resolve` picks from :data:`mit_kernels.backends.BACKEND_TABLE` (the fused ops:
``mit_kernels::ffn_gate_triton_*`` in :mod:`mit_kernels.triton_backend`, ``mit_kernels::ffn_gate_cpu_*`` in
:mod:`mit_kernels.cpu_backend`).

FLOP convention: elementwise FLOPs, ``6 B L F`` forward and ``15 B L F`` backward (:mod:`mit_kernels.flops`).

Under ``backend="auto"`` (eager) a Triton kernel that fails to compile or launch
(:func:`mit_kernels.dispatch.is_triton_failure`) falls back to the reference (eager PyTorch, already fast for an
elementwise op), in the forward and in the backward, with one warning; ``auto`` then stops using Triton on that
device. Where ``auto`` gives attention the ``"sdpa"`` backend (and with ``backend="sdpa"``) the gate runs the
reference.
"""

from __future__ import annotations

import torch

from . import backends
from .validation import (
    check_rank,
    check_same_dtype_device,
    check_shape,
    check_tensor,
)

# --------------------------------------------------------------------------------------------------------------------
# Validation and backend selection
# --------------------------------------------------------------------------------------------------------------------


def check_ffn_gate_inputs(gate: object, up: object, ffn_mul: object) -> None:
    """Validate the arguments of :func:`mit_ffn_gate`: gate and up (B, L, F), ffn_mul (B, F), one float dtype, one
    device. Raises ValueError naming the argument, what was received and what was expected."""
    names = ["gate", "up", "ffn_mul"]
    tensors = [check_tensor(n, x) for n, x in zip(names, (gate, up, ffn_mul))]
    check_rank("gate", tensors[0], 3, "(B, L, F)")
    batch, _, features = tensors[0].shape
    check_shape("up", tensors[1], tuple(tensors[0].shape), "(B, L, F) like gate")
    check_shape("ffn_mul", tensors[2], (batch, features), "(B, F) with gate's B and F")
    check_same_dtype_device(names, tensors)


def resolve_ffn_backend(backend: str, device: torch.device) -> str:
    """The backend :func:`mit_ffn_gate` runs for ``backend`` on ``device`` (:func:`mit_kernels.backends.resolve`;
    "sdpa" means the reference, the gate has no attention)."""
    return backends.resolve(backend, device)


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------


def mit_ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """MiT's infused SwiGLU gate, the input of a Llama MLP's down projection::

        y = silu(gate) * up * (1 + ffn_mul[:, None, :])

    Args:
        gate: (B, L, F) gate projection ``gate_proj(x)``; any strides (a ``chunk`` of a fused gate-up projection works
            without a copy when its last dimension is contiguous).
        up: (B, L, F) up projection ``up_proj(x)``, gate's dtype and device.
        ffn_mul: (B, F) per-sample multiplicative infusion, gate's dtype and device.
        backend: "auto", "reference", "triton", "cpu" (the compiled extension) or "sdpa" (the attention's exact
            fallback backend; the gate then runs the reference).

    Returns:
        (B, L, F) in gate's dtype. Differentiable w.r.t. all three tensors; the gradient of ffn_mul is a sum over L.
        The Triton path computes in fp32 (fp64 for fp64 inputs) and saves only the inputs for the backward.
    """
    check_ffn_gate_inputs(gate, up, ffn_mul)
    return backends.loaded_backend(backends.resolve(backend, gate.device)).ffn_gate_for(backend)(gate, up, ffn_mul)
