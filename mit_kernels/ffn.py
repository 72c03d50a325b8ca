"""MiT's FFN infusion gate: public entry point :func:`mit_ffn_gate`, backend selection and the torch.library ops.

MiT infuses the modality into a Llama MLP as ``down(silu(gate(x)) * up(x) * (1 + ffn_mul))``; this module computes the
part between the projections, ``silu(gate) * up * (1 + ffn_mul[:, None, :])``.

``mit_kernels::ffn_gate_triton_fwd`` returns that product and ``mit_kernels::ffn_gate_triton_bwd`` the three input
gradients (recomputing silu; only the inputs are saved). Both have fake (meta) implementations, so torch.compile traces
through them without a graph break, and FLOP formulas, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

FLOP convention: torch counts no elementwise work at all, which would make these ops invisible, so they are counted as
elementwise FLOPs: every add, subtract, multiply, divide and exp on a (B, L, F) element is one FLOP, a sigmoid is 3
(exp, add, reciprocal) and negation is free; the O(B F) work on ffn_mul (``1 + m``, the final sum of partials) is not
counted. Forward: sigmoid 3 + ``gate * s`` + ``* up`` + ``* (1 + m)`` = ``6 B L F``. Backward: sigmoid 3, silu 1,
``dy (1 + m)`` 1, d up 1, ``silu' = s (1 + gate (1 - s))`` 4, d gate 2, d ffn_mul (two products and the accumulation)
3 = ``15 B L F``. The MLP's matmuls (``6 B L D F`` forward) dwarf both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch.utils.flop_counter import register_flop_formula

from .attention import triton_available
from .reference import mit_ffn_gate_reference
from .validation import check_rank, check_same_dtype_device, check_shape, check_tensor

FFN_BACKENDS = ("auto", "reference", "triton", "cpu")
FFN_FORWARD_FLOPS_PER_ELEMENT = 6
FFN_BACKWARD_FLOPS_PER_ELEMENT = 15


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


def _load_cpu_backend() -> tuple[ModuleType | None, str]:
    """The compiled CPU backend module, or None and the reason it cannot be used."""
    try:
        from . import cpu_backend
    except ImportError as exc:
        return None, f"mit_kernels.cpu_backend cannot be imported ({exc})"
    if not cpu_backend.available():
        return None, "mit_kernels.cpu_backend reports that its compiled extension is not available"
    return cpu_backend, ""


def cpu_backend_available() -> bool:
    """The compiled CPU backend (``mit_kernels.cpu_backend``) is built and loadable."""
    return _load_cpu_backend()[0] is not None


def _triton_interpreter_active() -> bool:
    from . import triton_ffn

    return triton_ffn.interpreter_active()


def resolve_ffn_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend of :func:`mit_ffn_gate` to the one that runs, or raise ValueError if it cannot run on
    ``device``.

    "auto" picks Triton for CUDA tensors; for CPU tensors the compiled CPU backend when it is built, else the
    reference."""
    if backend not in FFN_BACKENDS:
        raise ValueError(f"backend must be one of {FFN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_backend_available():
            return "cpu"
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton), which is not installed")
        if device.type == "cpu" and not _triton_interpreter_active():
            raise ValueError(
                "backend='triton' got CPU tensors, but the Triton interpreter is off: use CUDA tensors, or set "
                "TRITON_INTERPRET=1 in the environment before importing mit_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device} (use backend='auto' or 'triton')")
        _, reason = _load_cpu_backend()
        if reason:
            raise ValueError(
                f"backend='cpu' needs the compiled extension, which is not available: {reason}. Reinstall with "
                "`pip install .` (a C++ compiler is needed), or use backend='reference'"
            )
    return backend


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
        backend: "auto", "reference", "triton" or "cpu" (the compiled extension).

    Returns:
        (B, L, F) in gate's dtype. Differentiable w.r.t. all three tensors; the gradient of ffn_mul is a sum over L.
        The Triton path computes in fp32 (fp64 for fp64 inputs) and saves only the inputs for the backward.
    """
    check_ffn_gate_inputs(gate, up, ffn_mul)
    which = resolve_ffn_backend(backend, gate.device)
    if which == "reference":
        return mit_ffn_gate_reference(gate, up, ffn_mul)
    if which == "cpu":
        cpu_backend, _ = _load_cpu_backend()
        return cpu_backend.ffn_gate(gate, up, ffn_mul)
    return ffn_gate_triton_fwd(gate, up, ffn_mul)


# --------------------------------------------------------------------------------------------------------------------
# torch.library registration of the Triton implementation
# --------------------------------------------------------------------------------------------------------------------


def ffn_gate_flops(gate_shape: Sequence[int]) -> int:
    """Forward FLOPs of the FFN gate for gate (B, L, F): ``6 B L F`` (elementwise convention, module docstring)."""
    return FFN_FORWARD_FLOPS_PER_ELEMENT * math.prod(gate_shape)


def ffn_gate_backward_flops(gate_shape: Sequence[int]) -> int:
    """Backward FLOPs of the FFN gate for gate (B, L, F): ``15 B L F`` (elementwise convention, module docstring)."""
    return FFN_BACKWARD_FLOPS_PER_ELEMENT * math.prod(gate_shape)


@torch.library.custom_op("mit_kernels::ffn_gate_triton_fwd", mutates_args=())
def ffn_gate_triton_fwd(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    from . import triton_ffn

    return triton_ffn.ffn_gate_triton_fwd(gate, up, ffn_mul)


@ffn_gate_triton_fwd.register_fake
def _(gate, up, ffn_mul):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("mit_kernels::ffn_gate_triton_bwd", mutates_args=())
def ffn_gate_triton_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton_ffn

    return triton_ffn.ffn_gate_triton_bwd(grad_out, gate, up, ffn_mul)


@ffn_gate_triton_bwd.register_fake
def _(grad_out, gate, up, ffn_mul):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (gate, up, ffn_mul))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate, up, ffn_mul: the backward recomputes silu, no intermediate is kept


def _backward(ctx, grad_out):
    gate, up, ffn_mul = ctx.saved_tensors
    return ffn_gate_triton_bwd(grad_out, gate, up, ffn_mul)


ffn_gate_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mit_kernels.ffn_gate_triton_fwd)
def _ffn_gate_fwd_flop(gate_shape, *args, out_shape=None, **kwargs) -> int:
    return ffn_gate_flops(gate_shape)


@register_flop_formula(torch.ops.mit_kernels.ffn_gate_triton_bwd)
def _ffn_gate_bwd_flop(grad_out_shape, gate_shape, *args, out_shape=None, **kwargs) -> int:
    return ffn_gate_backward_flops(gate_shape)
