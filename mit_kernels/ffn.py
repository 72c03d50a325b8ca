"""MiT's FFN infusion gate: public entry point :func:`mit_ffn_gate`, backend selection and the torch.library ops.

MiT infuses the modality into a Llama MLP as ``down(silu(gate(x)) * up(x) * (1 + ffn_mul))``; this module computes the
part between the projections, ``silu(gate) * up * (1 + ffn_mul[:, None, :])``.

``mit_kernels::ffn_gate_triton_fwd`` returns that product and ``mit_kernels::ffn_gate_triton_bwd`` the three input
gradients (recomputing silu; only the inputs are saved). Both have fake (meta) implementations, so torch.compile traces
through them without a graph break, and FLOP formulas, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

FLOP convention: elementwise FLOPs, ``6 B L F`` forward and ``15 B L F`` backward (:mod:`mit_kernels.flops`).

Under ``backend="auto"`` (eager) a Triton kernel that fails to compile or launch
(:func:`mit_kernels.dispatch.is_triton_failure`) falls back to the reference (eager PyTorch, already fast for an
elementwise op), in the forward and in the backward, with one warning; ``auto`` then stops using Triton on that
device. Where ``auto`` gives attention the ``"sdpa"`` backend (and with ``backend="sdpa"``) the gate runs the
reference.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from .dispatch import cpu_backend
from .flops import ffn_gate_backward_flops, ffn_gate_flops
from .reference import mit_ffn_gate_reference
from .validation import (
    check_rank,
    check_same_dtype_device,
    check_shape,
    check_tensor,
    refuse_double_backward,
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
    """The backend :func:`mit_ffn_gate` runs for ``backend`` on ``device`` (:func:`mit_kernels.dispatch.resolve`;
    "sdpa" means the reference, the gate has no attention)."""
    return dispatch.resolve(backend, device)


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
    which = dispatch.resolve(backend, gate.device)
    if which in ("reference", "sdpa"):
        return mit_ffn_gate_reference(gate, up, ffn_mul)
    if which == "cpu":
        module, _ = cpu_backend()
        return module.ffn_gate(gate, up, ffn_mul)
    if backend != "auto" or torch.compiler.is_compiling():
        return ffn_gate_triton_fwd(gate, up, ffn_mul)
    try:
        return ffn_gate_triton_fwd(gate, up, ffn_mul, True)
    except Exception as exc:
        if not dispatch.is_triton_failure(exc):
            raise
        dispatch.record_triton_failure(gate.device, exc)
        return mit_ffn_gate_reference(gate, up, ffn_mul)


# --------------------------------------------------------------------------------------------------------------------
# torch.library registration of the Triton implementation
# --------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mit_kernels::ffn_gate_triton_fwd", mutates_args=())
def ffn_gate_triton_fwd(
    gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor, fallback: bool = False
) -> torch.Tensor:
    """``fallback`` (set by ``backend="auto"``): a backward kernel that fails to compile or launch falls back to the
    reference's gradients."""
    from . import triton_ffn

    return triton_ffn.ffn_gate_triton_fwd(gate, up, ffn_mul)


@ffn_gate_triton_fwd.register_fake
def _(gate, up, ffn_mul, fallback=False):
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
    gate, up, ffn_mul, *fallback = inputs
    ctx.save_for_backward(gate, up, ffn_mul)  # the backward recomputes silu, no intermediate is kept
    ctx.fallback = bool(fallback and fallback[0])


def _backward(ctx, grad_out):
    gate, up, ffn_mul = ctx.saved_tensors
    refuse_double_backward("mit_kernels::ffn_gate_triton_fwd", "triton", (gate, up, ffn_mul, grad_out))
    try:
        grads = ffn_gate_triton_bwd(grad_out, gate, up, ffn_mul)
    except Exception as exc:
        if not (ctx.fallback and dispatch.is_triton_failure(exc)):
            raise
        dispatch.record_triton_failure(gate.device, exc)
        leaves = [x.detach().requires_grad_() for x in (gate, up, ffn_mul)]
        with torch.enable_grad():
            grads = torch.autograd.grad(mit_ffn_gate_reference(*leaves), leaves, grad_out)
    return (*grads, None)


ffn_gate_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mit_kernels.ffn_gate_triton_fwd)
def _ffn_gate_fwd_flop(gate_shape, *args, out_shape=None, **kwargs) -> int:
    return ffn_gate_flops(gate_shape)


@register_flop_formula(torch.ops.mit_kernels.ffn_gate_triton_bwd)
def _ffn_gate_bwd_flop(grad_out_shape, gate_shape, *args, out_shape=None, **kwargs) -> int:
    return ffn_gate_backward_flops(gate_shape)
