"""The ``"triton"`` backend: MiT's fused Triton kernels as torch.library ops, and what ``backend="auto"`` adds.

Importing this module registers the ops (``import mit_kernels`` does it) without importing Triton: the kernels are
defined on first use, so TRITON_INTERPRET may be set any time before the first call.

- ``mit_kernels::attention_triton_fwd`` returns (out, lse2) and ``mit_kernels::attention_triton_bwd`` the eight input
  gradients (:mod:`mit_kernels.triton_attention`);
- ``mit_kernels::ffn_gate_triton_fwd`` returns ``silu(gate) * up * (1 + ffn_mul[:, None, :])`` and
  ``mit_kernels::ffn_gate_triton_bwd`` the three input gradients, recomputing silu (only the inputs are saved;
  :mod:`mit_kernels.triton_ffn`).

Their fake kernels, autograd and FLOP formulas come from :mod:`mit_kernels.registration` (shapes and FLOPs:
:mod:`mit_kernels.op_kinds`).

Under ``backend="auto"`` (eager) a kernel that fails to compile or launch on the device
(:func:`mit_kernels.dispatch.is_triton_failure`) does not fail the call: the forward runs the exact ``"sdpa"`` path
(:mod:`mit_kernels.sdpa_attention`; the reference for the FFN gate, an elementwise op already fast in eager PyTorch),
a backward computes its gradients through that path (its forward recomputed from the saved inputs: the forward op's
last argument, ``fallback``, says so), with one warning, and ``auto`` stops using Triton on that device. An explicit
``backend="triton"`` never falls back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from . import dispatch
from .op_kinds import ATTENTION, FFN_GATE
from .reference import mit_ffn_gate_reference
from .registration import Fallback, define_op_pair
from .sdpa_attention import sdpa_attention

# --------------------------------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------------------------------


def _attention_forward(
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
    """(out (B, Hq, Lq, D), lse2 (B, Hq, Lq) fp32); ``fallback``: a backward kernel that fails to compile or launch
    falls back to the ``"sdpa"`` gradients."""
    from . import triton_attention  # imported on first use: TRITON_INTERPRET must be set before kernels are defined

    return triton_attention.mit_attention_triton_fwd(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale
    )


def _attention_backward(
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
    """The eight input gradients, shaped like the inputs."""
    from . import triton_attention

    return triton_attention.mit_attention_triton_bwd(
        grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse2, causal, scale, rescale
    )


def attention_via_sdpa(
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
    scale: float | None,
    rescale: bool,
) -> torch.Tensor:
    """The exact ``"sdpa"`` path with the attention ops' arguments: what ``auto`` runs when a kernel cannot.
    Returns (B, Hq, Lq, D)."""
    return sdpa_attention(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale
    )


def _ffn_gate_forward(
    gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor, fallback: bool = False
) -> torch.Tensor:
    """(B, L, F); ``fallback``: a backward kernel that fails to compile or launch falls back to the reference's
    gradients."""
    from . import triton_ffn

    return triton_ffn.ffn_gate_triton_fwd(gate, up, ffn_mul)


def _ffn_gate_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, d ffn_mul)."""
    from . import triton_ffn

    return triton_ffn.ffn_gate_triton_bwd(grad_out, gate, up, ffn_mul)


def _fallback(forward: Callable[..., torch.Tensor]) -> Fallback:
    """Triton's fallback: on a compile or launch failure of a backward kernel, the gradients of ``forward``."""
    return Fallback(is_failure=dispatch.is_triton_failure, record=dispatch.record_triton_failure, forward=forward)


attention_triton_fwd, attention_triton_bwd = define_op_pair(
    "mit_kernels::attention_triton", ATTENTION, _attention_forward, _attention_backward, backend="triton",
    fallback=_fallback(attention_via_sdpa),
)  # fmt: skip
ffn_gate_triton_fwd, ffn_gate_triton_bwd = define_op_pair(
    "mit_kernels::ffn_gate_triton", FFN_GATE, _ffn_gate_forward, _ffn_gate_backward, backend="triton",
    fallback=_fallback(mit_ffn_gate_reference),
)  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# The backend (mit_kernels.backends.BACKEND_TABLE["triton"])
# --------------------------------------------------------------------------------------------------------------------


def refusal(device: torch.device, head_dim: int | None) -> str | None:
    """Why an explicit ``backend="triton"`` cannot run on ``device`` with head dim ``head_dim`` (None for the FFN
    gate), or None when it can: Triton missing, CPU tensors without the interpreter, another device type, a head dim
    above :data:`mit_kernels.dispatch.TRITON_MAX_HEAD_DIM`."""
    if not dispatch.triton_available():
        return "backend='triton' needs the triton package (pip install triton), which is not installed"
    if device.type == "cpu" and not dispatch.triton_interpreter_active():
        env = os.environ.get("TRITON_INTERPRET", "<unset>")
        return (
            "backend='triton' got CPU tensors, but the Triton interpreter is off (TRITON_INTERPRET="
            f"{env} when the kernels were defined): use CUDA tensors, or set TRITON_INTERPRET=1 in the "
            "environment before importing mit_kernels"
        )
    if device.type not in ("cpu", "cuda"):
        return f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}"
    if head_dim is not None and head_dim > dispatch.TRITON_MAX_HEAD_DIM:
        return (
            f"backend='triton' supports head dims D <= {dispatch.TRITON_MAX_HEAD_DIM}, got D={head_dim} "
            "(use backend='auto' or 'reference')"
        )
    return None


def _gpu_tiles(q: torch.Tensor) -> bool:
    """The Triton kernels have tiles for q's dtype and head dim on its GPU (no fp64; fp32 at head dim 256 does not
    fit 99 KiB of shared memory)."""
    if q.dtype == torch.float64:
        return False
    from .triton_configs import has_tiles

    capability = dispatch.device_capability(q.device)
    return has_tiles(max(16, 1 << (q.shape[-1] - 1).bit_length()), q.element_size(), capability)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    kv_mask: torch.Tensor | None,
    rescale: bool,
) -> torch.Tensor:
    """MiT attention through the fused kernels, on inputs validated by :func:`mit_kernels.mit_attention` (q (B, Hq,
    Lq, D), k / v (B, Hkv, Lk, D), infusion vectors (B, Hkv, D), head_logit (Hkv,)). Returns (B, Hq, Lq, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_triton_fwd(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)[0]


def attention_under_auto(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    kv_mask: torch.Tensor | None,
    rescale: bool,
) -> torch.Tensor:
    """:func:`attention` as ``backend="auto"`` runs it: ``"sdpa"`` on a GPU where no tile fits the case (fp64, whose
    GPU kernels are not compiled and checked; fp32 at a head dim whose tile does not fit), and in eager mode ``"sdpa"``
    (forward and backward) when a kernel fails to compile or launch. Same shapes."""
    if q.device.type == "cuda" and not _gpu_tiles(q):
        return sdpa_attention(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
            causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale,
        )  # fmt: skip
    args = (q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal)
    triton_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():  # a failure inside a compiled graph is out of reach here
        return attention_triton_fwd(*args, triton_scale, rescale)[0]
    try:
        out, _ = attention_triton_fwd(*args, triton_scale, rescale, True)
    except Exception as exc:
        if not dispatch.is_triton_failure(exc):
            raise
        dispatch.record_triton_failure(q.device, exc, stacklevel=3)  # the caller of mit_attention
        return attention_via_sdpa(*args, scale, rescale)
    return out


def ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """The FFN gate through the fused kernel, on inputs validated by :func:`mit_kernels.mit_ffn_gate` (gate and up
    (B, L, F), ffn_mul (B, F)). Returns (B, L, F)."""
    return ffn_gate_triton_fwd(gate, up, ffn_mul)


def ffn_gate_under_auto(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """:func:`ffn_gate` as ``backend="auto"`` runs it: in eager mode the reference (forward and backward) when a
    kernel fails to compile or launch. Same shapes."""
    if torch.compiler.is_compiling():
        return ffn_gate_triton_fwd(gate, up, ffn_mul)
    try:
        return ffn_gate_triton_fwd(gate, up, ffn_mul, True)
    except Exception as exc:
        if not dispatch.is_triton_failure(exc):
            raise
        dispatch.record_triton_failure(gate.device, exc, stacklevel=3)  # the caller of mit_ffn_gate
        return mit_ffn_gate_reference(gate, up, ffn_mul)
