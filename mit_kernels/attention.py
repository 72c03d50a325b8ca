"""Public entry point: :func:`mit_attention` and backend selection."""

from __future__ import annotations

import torch

from . import backends
from .backends import BACKENDS
from .dispatch import triton_available, triton_interpreter_active
from .validation import check_attention_inputs, check_bool, check_scale

# The backend probes live in dispatch, the resolver beside the backend table; these names stay importable from here.
__all__ = ["BACKENDS", "mit_attention", "resolve_backend", "triton_available", "triton_interpreter_active"]


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """The backend :func:`mit_attention` runs for ``backend`` on ``device`` (see :func:`mit_kernels.backends.resolve`:
    "auto" takes Triton on CUDA when it can run there and the head dim fits, else "sdpa"; the C++ kernels on CPU, the
    reference otherwise)."""
    return backends.resolve(backend, device, head_dim)


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
    attention = backends.loaded_backend(backends.resolve(backend, q.device, q.shape[-1])).attention_for(backend)
    return attention(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale
    )
