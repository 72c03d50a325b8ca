"""Input checks shared by every backend. Bad input raises ``ValueError`` naming the argument, what was received and
what was expected: never a silent wrong answer."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got {_describe(x)}")


def check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {_describe(x)}")


def check_same_dtype_device(names: list[str], tensors: list[torch.Tensor]) -> None:
    ref_name, ref = names[0], tensors[0]
    if ref.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{ref_name} must be float16, bfloat16, float32 or float64, got {ref.dtype}")
    for name, x in zip(names[1:], tensors[1:]):
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float | None,
) -> None:
    """Validate the arguments of :func:`mit_kernels.mit_attention` (shapes, dtypes, devices, GQA ratio, mask)."""
    names = ["q", "k", "v", "k_mul", "k_add", "v_mul", "v_add", "head_logit"]
    tensors = [check_tensor(n, x) for n, x in zip(names, (q, k, v, k_mul, k_add, v_mul, v_add, head_logit))]
    check_rank("q", q, 4, "(B, Hq, Lq, D)")
    check_rank("k", k, 4, "(B, Hkv, Lk, D)")
    batch, hq, lq, d = q.shape
    _, hkv, lk, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"k must have shape (B, Hkv, Lk, D) with q's B={batch} and D={d}, got {_describe(k)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of KV heads (GQA): "
            f"q has Hq={hq} heads, k has Hkv={hkv}"
        )
    check_shape("v", v, (batch, hkv, lk, d), "(B, Hkv, Lk, D)")
    if lq < 1 or lk < 1 or d < 1 or batch < 1:
        raise ValueError(f"q and k need B, Lq, Lk, D >= 1, got q {_describe(q)} and k {_describe(k)}")
    for name, x in zip(names[3:7], tensors[3:7]):
        check_shape(name, x, (batch, hkv, d), "(B, Hkv, D)")
    check_shape("head_logit", head_logit, (hkv,), "(Hkv,)")
    check_same_dtype_device(names[:7], tensors[:7])
    if head_logit.dtype not in FLOAT_DTYPES:
        raise ValueError(f"head_logit must be a floating tensor, got {head_logit.dtype}")
    if head_logit.device != q.device:
        raise ValueError(f"head_logit must be on q's device {q.device}, got {head_logit.device}")
    if kv_mask is not None:
        check_tensor("kv_mask", kv_mask)
        if kv_mask.dtype != torch.bool:
            raise ValueError(f"kv_mask must be a bool tensor (True = key may be attended), got dtype {kv_mask.dtype}")
        check_shape("kv_mask", kv_mask, (batch, lk), "(B, Lk)")
        if kv_mask.device != q.device:
            raise ValueError(f"kv_mask must be on q's device {q.device}, got {kv_mask.device}")
    check_scale(scale)


# --------------------------------------------------------------------------------------------------------------------
# Keyword arguments of the public ops and of their backend selectors
# --------------------------------------------------------------------------------------------------------------------


def check_bool(name: str, value: object) -> bool:
    """``value`` is a real bool (True / False; not 1, "no" or a tensor); returns it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    return value


def check_scale(scale: object) -> float | None:
    """``scale`` is None (meaning 1/sqrt(D)) or a finite real number > 0 (not a bool); returns it as a float."""
    if scale is None:
        return None
    if type(scale) is float and 0.0 < scale < math.inf:  # the common case, without numbers.Real's ABC check
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(
            f"scale must be a positive float or None (1/sqrt(D)), got {scale!r} of type {type(scale).__name__}"
        )
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a positive float or None (1/sqrt(D)), got {scale!r}")
    return value


def check_backend(backend: object, known: tuple[str, ...]) -> str:
    """``backend`` is one of the ``known`` backend names (a str); returns it."""
    if not isinstance(backend, str) or backend not in known:
        raise ValueError(f"backend must be one of {known}, got {backend!r}")
    return backend


def check_device(device: object) -> torch.device:
    """``device`` is a torch.device (what a tensor's ``.device`` gives); returns it."""
    if not isinstance(device, torch.device):
        raise ValueError(f"device must be a torch.device, got {device!r} of type {type(device).__name__}")
    return device


def check_head_dim(head_dim: object) -> int | None:
    """``head_dim`` is None or an int >= 1 (not a bool); returns it."""
    if head_dim is None:
        return None
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be None or an int >= 1, got {head_dim!r}")
    return head_dim


def refuse_double_backward(op: str, backend: str, tensors: tuple) -> None:
    """Raise a RuntimeError when a backward without a derivative of its own runs under ``create_graph=True`` (grad mode
    on) with inputs that require grad: a second-order gradient through it would otherwise be wrong (zero or missing)."""
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors):
        raise RuntimeError(
            f"{op} (backend={backend!r}) does not support double backward: its backward is not differentiable, so "
            "create_graph=True cannot give correct second-order gradients. Use backend='reference' for second-order "
            "gradients (gradient penalties, Hessian-vector products)."
        )
