"""Public entry point: :func:`mit_attention` and backend selection."""

from __future__ import annotations

import math

import torch

from . import dispatch, ops
from .dispatch import BACKENDS, cpu_backend, triton_available, triton_interpreter_active
from .reference import mit_attention_reference
from .sdpa_attention import sdpa_attention
from .validation import check_attention_inputs, check_bool, check_scale

# The backend probes and resolver live in dispatch; these names stay importable from here.
__all__ = ["BACKENDS", "mit_attention", "resolve_backend", "triton_available", "triton_interpreter_active"]


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """The backend :func:`mit_attention` runs for ``backend`` on ``device`` (see :func:`mit_kernels.dispatch.resolve`:
    "auto" takes Triton on CUDA when it can run there and the head dim fits, else "sdpa"; the C++ kernels on CPU, the
    reference otherwise)."""
    return dispatch.resolve(backend, device, head_dim)


def _gpu_tiles(q: torch.Tensor) -> bool:
    """The Triton kernels have tiles for q's dtype and head dim on its GPU (no fp64; fp32 at head dim 256 does not
    fit 99 KiB of shared memory)."""
    if q.dtype == torch.float64:
        return False
    from .triton_configs import has_tiles

    capability = dispatch.device_capability(q.device)
    return has_tiles(max(16, 1 << (q.shape[-1] - 1).bit_length()), q.element_size(), capability)


def mit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_mask: torch.Tensor | None = None,
    rescale: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Multimodal-infusion attention (see ``docs/semantics.md``)::

        c_t  = cosine_similarity(v_t, v_add);   g_t = sigmoid(head_logit_h + c_t)   (1 if rescale=False)
        K'_t = k_t + g_t * (k_t * k_mul + k_add);   V'_t = v_t + g_t * (v_t * v_mul + v_add)
        O    = softmax(q K'^T * scale + mask) V'

    Args:
        q: (B, Hq, Lq, D) queries.
        k: (B, Hkv, Lk, D) keys, already rotary-embedded; ``Hq % Hkv == 0`` (query head j reads KV head
            ``j // (Hq // Hkv)``).
        v: (B, Hkv, Lk, D) values.
        k_mul, k_add, v_mul, v_add: (B, Hkv, D) infusion vectors (same dtype as q).
        head_logit: (Hkv,) gate logits lambda (any float dtype; used in fp32).
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Lk - Lq).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_mask: optional (B, Lk) bool, True where the key may be attended.
        rescale: apply the head-level gate; with False, g = 1.
        backend: "auto", "reference", "triton", "cpu" (the compiled C++ kernels, CPU tensors) or "sdpa" (exact:
            the infusion in PyTorch, then torch's scaled_dot_product_attention; :mod:`mit_kernels.sdpa_attention`).
            "auto" on CUDA runs Triton when it can run on the device, else "sdpa"; when a Triton kernel fails to
            compile or launch there, it warns once (:class:`mit_kernels.dispatch.MitKernelFallbackWarning`) and runs
            "sdpa" on that device from then on.

    Returns:
        (B, Hq, Lq, D) in q's dtype. Differentiable w.r.t. all eight tensors. Rows that see no key are 0.
    """
    check_attention_inputs(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, scale)
    check_bool("causal", causal)
    check_bool("rescale", rescale)
    scale = check_scale(scale)
    which = dispatch.resolve(backend, q.device, q.shape[-1])
    if which == "triton" and backend == "auto" and q.device.type == "cuda" and not _gpu_tiles(q):
        which = "sdpa"  # fp64 (the GPU kernels are compiled and checked for fp16 / bf16 / fp32), or no tile fits
    if which == "reference":
        return mit_attention_reference(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
            causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale,
        )  # fmt: skip
    if which == "cpu":
        module, _ = cpu_backend()
        return module.attention(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)
    if which == "sdpa":
        return sdpa_attention(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
            causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale,
        )  # fmt: skip
    triton_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Under "auto" (eager: a compiled graph fails inside the graph, out of reach here) a kernel that cannot be compiled
    # or launched on this device falls back to "sdpa", in the forward here and in the backward (ops._backward).
    args = (q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, triton_scale, rescale)
    if backend != "auto" or torch.compiler.is_compiling():
        return ops.attention_triton_fwd(*args)[0]
    try:
        out, _ = ops.attention_triton_fwd(*args, True)
    except Exception as exc:
        if not dispatch.is_triton_failure(exc):
            raise
        dispatch.record_triton_failure(q.device, exc)
        return sdpa_attention(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
            causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale,
        )  # fmt: skip
    return out
