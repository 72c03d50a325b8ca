"""What every backend's torch.library ops of one operator share: argument layout, output shapes, FLOP formulas.

Each fused operator is a pair of ops, ``<name>_fwd`` and ``<name>_bwd``, one pair per backend that has kernels
(``mit_kernels::attention_triton_*``, ``attention_cpu_*``, ``ffn_gate_triton_*``, ``ffn_gate_cpu_*``) and one for the
reference's opaque softmax attention under torch.compile (``mit_kernels::reference_attention_*``). The pairs of one
operator take the same leading arguments, so their fake (meta) kernels and their FLOP formulas are written once here,
as an :class:`OpKind`, and :mod:`mit_kernels.registration` registers them for every pair.

Argument layout, shared by every kind:

- forward: the tensors that get a gradient, then other tensor arguments (``kv_mask``), then non-tensor arguments
  (flags, scale); a backend may add arguments at the end (Triton's ``fallback``). Its first output is the result; any
  further outputs are statistics for the backward (attention's log-sum-exp), without a gradient.
- backward: ``grad_out``, the forward's tensor arguments, the forward's outputs when the kind saves them, then the
  forward's non-tensor arguments. It returns the gradients of the tensors that get one, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .flops import attention_backward_flops, attention_flops, ffn_gate_backward_flops, ffn_gate_flops
from .reference import accumulator_dtype

Shape = Sequence[int]


@dataclass(frozen=True)
class OpKind:
    """The shape rule and FLOP formulas of one operator's forward / backward op pair.

    Attributes:
        gradients: how many of the forward's leading arguments are tensors that get a gradient (the backward returns
            one per such tensor, shaped like it).
        tensors: how many of the forward's leading arguments are tensors (the ``gradients`` ones, then those without
            a gradient, e.g. ``kv_mask``, possibly None); the backward takes them right after ``grad_out``.
        saves_outputs: the backward also takes the forward's outputs (after the tensors).
        outputs: the forward's fake kernel: empty outputs (shape, dtype, device) for the forward's arguments.
        flops: forward FLOPs from the shapes of the forward's arguments (as ``FlopCounterMode`` gives them).
        backward_flops: backward FLOPs from the shapes of the backward's arguments after ``grad_out`` (they start with
            the forward's).
    """

    gradients: int
    tensors: int
    saves_outputs: bool
    outputs: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    flops: Callable[..., int]
    backward_flops: Callable[..., int]

    def gradient_outputs(self, grad_out: torch.Tensor, *args: object) -> tuple[torch.Tensor, ...]:
        """The backward's fake kernel: one empty contiguous tensor like each input that gets a gradient."""
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in args[: self.gradients])


def _like_first(x: torch.Tensor, *args: object) -> torch.Tensor:
    """One output shaped like the first argument, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _attention_outputs(q: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out like q (B, Hq, Lq, D), contiguous; lse (B, Hq, Lq) in fp32 (fp64 for fp64)."""
    return _like_first(q), q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))


def _attention_flops(q: Shape, k: Shape, *args: object) -> int:
    return attention_flops(q, k)


def _attention_backward_flops(q: Shape, k: Shape, *args: object) -> int:
    return attention_backward_flops(q, k)


def _ffn_gate_flops(gate: Shape, *args: object) -> int:
    return ffn_gate_flops(gate)


def _ffn_gate_backward_flops(gate: Shape, *args: object) -> int:
    return ffn_gate_backward_flops(gate)


ATTENTION = OpKind(
    gradients=8,
    tensors=9,
    saves_outputs=True,
    outputs=_attention_outputs,
    flops=_attention_flops,
    backward_flops=_attention_backward_flops,
)
"""MiT attention: forward ``(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)`` ->
``(out, lse)``, q (B, Hq, Lq, D), k / v (B, Hkv, Lk, D), the four infusion vectors (B, Hkv, D), head_logit (Hkv,),
kv_mask (B, Lk) bool or None; out like q, lse (B, Hq, Lq) in fp32 (fp64 for fp64; the Triton kernels store it in
base 2). Backward ``(grad_out, q, ..., head_logit, kv_mask, out, lse, causal, scale, rescale)`` -> the eight
gradients. FLOPs: torch's SDPA convention, ``4 B Hq Lq Lk D`` forward, ``10 B Hq Lq Lk D`` backward."""

FFN_GATE = OpKind(
    gradients=3,
    tensors=3,
    saves_outputs=False,
    outputs=_like_first,
    flops=_ffn_gate_flops,
    backward_flops=_ffn_gate_backward_flops,
)
"""MiT's FFN gate: forward ``(gate, up, ffn_mul)`` -> ``silu(gate) * up * (1 + ffn_mul[:, None, :])``, gate and up
(B, L, F), ffn_mul (B, F); backward ``(grad_out, gate, up, ffn_mul)`` -> the three gradients. FLOPs: elementwise,
``6 B L F`` forward, ``15 B L F`` backward."""

SOFTMAX_ATTENTION = OpKind(
    gradients=3,
    tensors=4,
    saves_outputs=False,
    outputs=_like_first,
    flops=_attention_flops,
    backward_flops=_attention_backward_flops,
)
"""The reference's masked softmax attention (no infusion): forward ``(q, k, v, kv_mask, causal, scale)`` ->
``softmax(q k^T * scale + mask) v`` like q; backward ``(grad_out, q, k, v, kv_mask, causal, scale)`` -> (dq, dk, dv).
FLOPs: as attention's."""
