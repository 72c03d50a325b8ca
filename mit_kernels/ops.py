"""torch.library registration of the fused MiT attention (Triton implementation).

Importing this module registers the ops (``import mit_kernels`` does it) without importing Triton: the kernels are
defined on first use, so TRITON_INTERPRET may be set any time before the first call.

``mit_kernels::attention_triton_fwd`` returns (out, lse2) and ``mit_kernels::attention_triton_bwd`` the eight input
gradients. Both have fake (meta) implementations, so torch.compile traces through them without a graph break, and FLOP
formulas, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

The forward's last argument, ``fallback`` (False by default), is set by ``backend="auto"`` (eager): when the backward
kernel then fails to compile or launch (:func:`mit_kernels.dispatch.is_triton_failure`), the gradients come from the
exact ``"sdpa"`` path instead (:mod:`mit_kernels.sdpa_attention`, its forward recomputed), with one warning, and
``auto`` stops using Triton on that device.

FLOP convention: torch's SDPA convention, ``4 B Hq Lq Lk D`` forward and ``10 B Hq Lq Lk D`` backward
(:mod:`mit_kernels.flops`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from .flops import attention_backward_flops, attention_flops
from .reference import accumulator_dtype
from .sdpa_attention import sdpa_attention
from .validation import refuse_double_backward


@torch.library.custom_op("mit_kernels::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    rescale: bool,
    fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_attention  # imported on first use: TRITON_INTERPRET must be set before kernels are defined

    return triton_attention.mit_attention_triton_fwd(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale
    )


@attention_triton_fwd.register_fake
def _(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale, fallback=False):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("mit_kernels::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    kv_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse2: torch.Tensor,
    causal: bool,
    scale: float,
    rescale: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    from . import triton_attention

    return triton_attention.mit_attention_triton_bwd(
        grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse2, causal, scale, rescale
    )


@attention_triton_bwd.register_fake
def _(grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse2, causal, scale, rescale):
    return tuple(
        torch.empty_like(x, memory_format=torch.contiguous_format)
        for x in (q, k, v, k_mul, k_add, v_mul, v_add, head_logit)
    )


def _setup_context(ctx, inputs, output):
    q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale, *fallback = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, out, lse2)
    ctx.kv_mask = kv_mask
    ctx.causal, ctx.scale, ctx.rescale = causal, scale, rescale
    ctx.fallback = bool(fallback and fallback[0])
    ctx.mark_non_differentiable(lse2)


def _backward(ctx, grad_out, _grad_lse2):
    saved = ctx.saved_tensors
    refuse_double_backward("mit_kernels::attention_triton_fwd", "triton", (*saved, grad_out))
    q, k, v, k_mul, k_add, v_mul, v_add, head_logit, out, lse2 = saved
    try:
        grads = attention_triton_bwd(
            grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, ctx.kv_mask, out, lse2,
            ctx.causal, ctx.scale, ctx.rescale,
        )  # fmt: skip
    except Exception as exc:
        if not (ctx.fallback and dispatch.is_triton_failure(exc)):
            raise
        dispatch.record_triton_failure(q.device, exc)
        grads = _sdpa_gradients(grad_out, (q, k, v, k_mul, k_add, v_mul, v_add, head_logit), ctx)
    return (*grads, None, None, None, None, None)


def _sdpa_gradients(grad_out: torch.Tensor, inputs: tuple[torch.Tensor, ...], ctx) -> tuple[torch.Tensor, ...]:
    """The eight input gradients of the exact ``"sdpa"`` path at ``inputs`` (its forward recomputed on detached
    copies), for the upstream gradient ``grad_out`` (B, Hq, Lq, D); zeros where the op does not depend on an input
    (lambda without rescale), as the Triton backward gives."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    with torch.enable_grad():
        out = sdpa_attention(*leaves, causal=ctx.causal, scale=ctx.scale, kv_mask=ctx.kv_mask, rescale=ctx.rescale)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))


attention_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mit_kernels.attention_triton_fwd)
def _attention_fwd_flop(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(q_shape, k_shape)


@register_flop_formula(torch.ops.mit_kernels.attention_triton_bwd)
def _attention_bwd_flop(grad_out_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(q_shape, k_shape)
