"""Public entry point: :func:`mit_attention` and backend selection."""

from __future__ import annotations

import math

import torch

from . import ops
from .reference import mit_attention_reference
from .validation import check_attention_inputs

BACKENDS = ("auto", "reference", "triton", "cpu")
TRITON_MAX_HEAD_DIM = 256


def triton_available() -> bool:
    """Triton is importable (it may still need a CUDA device or TRITON_INTERPRET=1 to run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_active() -> bool:
    """The Triton kernels were defined with TRITON_INTERPRET=1 set, so they run on CPU tensors."""
    if not triton_available():
        return False
    from . import triton_attention

    return triton_attention.interpreter_active()


def _load_cpu_backend():
    """The compiled CPU backend module (``mit_kernels.cpu_backend``), or None and the reason it cannot be used."""
    try:
        from . import cpu_backend
    except ImportError as exc:
        return None, f"mit_kernels.cpu_backend cannot be imported ({exc})"
    if not cpu_backend.available():
        return None, cpu_backend.unavailable_reason() or "its compiled extension is not available"
    return cpu_backend, ""


def cpu_backend_available() -> bool:
    """The C++ CPU backend matching the running torch is loaded, compiling it now (once) if none exists."""
    return _load_cpu_backend()[0] is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs, or raise ValueError if it cannot run on ``device``.

    "auto" picks Triton for CUDA tensors; for CPU tensors the compiled C++ backend ("cpu") when it is built, else the
    reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_backend_available():
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' needs CPU tensors, got device {device} (use backend='auto', or 'triton' on CUDA)"
            )
        _, reason = _load_cpu_backend()
        if reason:
            raise ValueError(
                f"backend='cpu' needs the compiled C++ extension, which is not available: {reason}. Reinstall with "
                "`pip install .` (needs a C++ compiler; MIT_SKIP_CPU_EXT must be unset), or use backend='reference'"
            )
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton), which is not installed")
        if device.type == "cpu" and not triton_interpreter_active():
            raise ValueError(
                "backend='triton' got CPU tensors, but the Triton interpreter is off: use CUDA tensors, or set "
                "TRITON_INTERPRET=1 in the environment before importing mit_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}")
    return backend


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
        backend: "auto", "reference", "triton" or "cpu" (the compiled C++ kernels, CPU tensors).

    Returns:
        (B, Hq, Lq, D) in q's dtype. Differentiable w.r.t. all eight tensors. Rows that see no key are 0.
    """
    check_attention_inputs(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, scale)
    which = resolve_backend(backend, q.device)
    if which == "reference":
        return mit_attention_reference(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
            causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale,
        )  # fmt: skip
    if which == "cpu":
        cpu_backend, _ = _load_cpu_backend()
        return cpu_backend.attention(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"backend='triton' supports head dims D <= {TRITON_MAX_HEAD_DIM}, got q with D={q.shape[-1]} "
            f"(use backend='reference')"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = ops.attention_triton_fwd(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, bool(causal), scale, bool(rescale)
    )
    return out
