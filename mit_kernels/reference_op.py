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
(gate and K', V') stays in the compiled graph: it is elementwise and needs no branch. The pair is registered like
every fused op (:func:`mit_kernels.registration.define_op_pair`; shapes and FLOPs:
:data:`mit_kernels.op_kinds.SOFTMAX_ATTENTION`).

Cost: the softmax attention between the infusion and the rest of the graph is not fused by the compiler, and its
backward recomputes the forward once. Second-order gradients through the compiled reference raise (as through the
fused backends); eager ``backend="reference"`` keeps them. The backward differentiates with ``torch.func.vjp``
(autograd is off inside a custom op's implementation), which cannot run while a ``TorchDispatchMode`` such as
``FlopCounterMode`` is active on real tensors: count FLOPs on the meta device (the fake kernels), as
benchmarks/flops.py does.
"""

from __future__ import annotations

import torch

from .op_kinds import SOFTMAX_ATTENTION
from .reference import masked_softmax_attention
from .registration import define_op_pair


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` of the eager reference; q (B, Hq, Lq, D), k / v (B, Hkv, Lk, D), kv_mask
    (B, Lk) bool or None. Returns (B, Hq, Lq, D)."""
    return masked_softmax_attention(q, k, v, causal=causal, scale=scale, kv_mask=kv_mask).contiguous()


def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_forward` for the upstream gradient ``grad_out`` (B, Hq, Lq, D): the vector-Jacobian
    product of the eager reference, its forward recomputed (``torch.func.vjp``: autograd is off inside a custom op's
    implementation, functorch's transforms are not)."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_softmax_attention(q, k, v, causal=causal, scale=scale, kv_mask=kv_mask)

    _, vjp = torch.func.vjp(forward, q, k, v)
    return tuple(g.contiguous() for g in vjp(grad_out))


reference_attention_fwd, reference_attention_bwd = define_op_pair(
    "mit_kernels::reference_attention", SOFTMAX_ATTENTION, _forward, _backward, backend="reference under torch.compile"
)
