"""The reference's masked softmax attention as an opaque op, for ``torch.compile``.

The reference keeps its non-finite contract (a key a row does not see never influences it, in the output and in the
gradients; docs/semantics.md) with data-dependent branches: when ``q``, ``k`` or ``v`` hold a NaN or an Inf, the
columns holding them are taken out of the matrix products and added back over the visible pairs only
(:func:`mit_kernels.reference.visible_scores`, :func:`mit_kernels.reference.probs_times_visible_values`). A compiled
graph cannot hold a branch on tensor contents, and the plain products it could hold give ``0 * Inf = NaN`` for a
hidden pair: an Inf in one padded key would make the whole sample NaN.

So while compiling, :func:`mit_kernels.reference.masked_softmax_attention` calls
``mit_kernels::reference_attention_fwd`` here instead: a custom op that torch.compile keeps as one node of the graph
(its fake kernel gives the output's shape; ``fullgraph=True`` holds) and that runs the eager reference, branches
included, when the graph executes. Its backward, ``mit_kernels::reference_attention_bwd``, recomputes the eager
forward on detached copies and differentiates it, so compiled and eager gradients are the same numbers. The infusion
(gate and K', V') stays in the compiled graph: it is elementwise and needs no branch.

Cost: the softmax attention between the infusion and the rest of the graph is not fused by the compiler, and its
backward recomputes the forward once. Second-order gradients through the compiled reference raise (as through the
fused backends); eager ``backend="reference"`` keeps them. The backward differentiates with ``torch.func.vjp``
(autograd is off inside a custom op's implementation), which cannot run while a ``TorchDispatchMode`` such as
``FlopCounterMode`` is active on real tensors: count FLOPs on the meta device (the fake kernels), as
benchmarks/flops.py does.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .flops import attention_backward_flops, attention_flops
from .validation import refuse_double_backward


@torch.library.custom_op("mit_kernels::reference_attention_fwd", mutates_args=())
def reference_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` of the eager reference; q (B, Hq, Lq, D), k / v (B, Hkv, Lk, D), kv_mask
    (B, Lk) bool or None. Returns (B, Hq, Lq, D)."""
    from .reference import masked_softmax_attention

    return masked_softmax_attention(q, k, v, causal=causal, scale=scale, kv_mask=kv_mask).contiguous()


@reference_attention_fwd.register_fake
def _(q, k, v, kv_mask, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("mit_kernels::reference_attention_bwd", mutates_args=())
def reference_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`reference_attention_fwd` for the upstream gradient ``grad_out`` (B, Hq, Lq, D): the
    vector-Jacobian product of the eager reference, its forward recomputed (``torch.func.vjp``: autograd is off inside
    a custom op's implementation, functorch's transforms are not)."""
    from .reference import masked_softmax_attention

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_softmax_attention(q, k, v, causal=causal, scale=scale, kv_mask=kv_mask)

    _, vjp = torch.func.vjp(forward, q, k, v)
    return tuple(g.contiguous() for g in vjp(grad_out))


@reference_attention_bwd.register_fake
def _(grad_out, q, k, v, kv_mask, causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.kv_mask, ctx.causal, ctx.scale = kv_mask, causal, scale


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    refuse_double_backward("mit_kernels::reference_attention_fwd", "reference under torch.compile", (q, k, v, grad_out))
    dq, dk, dv = reference_attention_bwd(grad_out, q, k, v, ctx.kv_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


reference_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mit_kernels.reference_attention_fwd)
def _fwd_flop(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(q_shape, k_shape)


@register_flop_formula(torch.ops.mit_kernels.reference_attention_bwd)
def _bwd_flop(grad_out_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(q_shape, k_shape)
