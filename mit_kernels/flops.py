"""FLOP formulas of MiT's operators, shared by every backend's ``torch.library`` registration.

Attention follows torch's convention for ``scaled_dot_product_attention``: the matrix products only, a multiply-add
counted as 2 FLOPs, dense (the causal half is not subtracted, exactly as torch counts SDPA), with Hq query heads:
forward ``4 B Hq Lq Lk D``; backward ``10 B Hq Lq Lk D`` (score recomputation, dV, dP, dQ, dK). The elementwise
infusion (O(B Hkv Lk D)) is not counted, as torch does not count elementwise work.

The FFN gate is all elementwise work, which torch would not count at all (the op would be invisible), so it is counted
as elementwise FLOPs: every add, subtract, multiply, divide and exp on a (B, L, F) element is one FLOP, a sigmoid is 3
(exp, add, reciprocal) and negation is free; the O(B F) work on ffn_mul (``1 + m``, the final sum of partials) is not
counted. Forward: sigmoid 3 + ``gate * s`` + ``* up`` + ``* (1 + m)`` = ``6 B L F``. Backward: sigmoid 3, silu 1,
``dy (1 + m)`` 1, d up 1, ``silu' = s (1 + gate (1 - s))`` 4, d gate 2, d ffn_mul (two products and the accumulation)
3 = ``15 B L F``. The MLP's matmuls (``6 B L D F`` forward) dwarf both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

FFN_FORWARD_FLOPS_PER_ELEMENT = 6
FFN_BACKWARD_FLOPS_PER_ELEMENT = 15


def attention_flops(q_shape: Sequence[int], k_shape: Sequence[int]) -> int:
    """Forward FLOPs of MiT attention for q (B, Hq, Lq, D) and k (B, Hkv, Lk, D): ``4 B Hq Lq Lk D``."""
    b, hq, lq, d = q_shape
    lk = k_shape[2]
    return sdpa_flop_count((b, hq, lq, d), (b, hq, lk, d), (b, hq, lk, d))


def attention_backward_flops(q_shape: Sequence[int], k_shape: Sequence[int]) -> int:
    """Backward FLOPs of MiT attention: ``10 B Hq Lq Lk D`` (torch's SDPA backward convention)."""
    b, hq, lq, d = q_shape
    lk = k_shape[2]
    return sdpa_backward_flop_count((b, hq, lq, d), (b, hq, lq, d), (b, hq, lk, d), (b, hq, lk, d))


def ffn_gate_flops(gate_shape: Sequence[int]) -> int:
    """Forward FLOPs of the FFN gate for gate (B, L, F): ``6 B L F``."""
    return FFN_FORWARD_FLOPS_PER_ELEMENT * math.prod(gate_shape)


def ffn_gate_backward_flops(gate_shape: Sequence[int]) -> int:
    """Backward FLOPs of the FFN gate for gate (B, L, F): ``15 B L F``."""
    return FFN_BACKWARD_FLOPS_PER_ELEMENT * math.prod(gate_shape)
