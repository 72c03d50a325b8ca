"""Reference implementation of MiT's fused operations: the readable specification.

Every fast path (Triton on GPU, C++ on CPU) must agree with these functions. They favour clarity over speed: the
attention materialises the full ``(Lq, Lk)`` score matrix and relies on PyTorch autograd for gradients.

Notation (see ``docs/semantics.md``)::

    q            (B, Hq, Lq, D)     queries
    k, v         (B, Hkv, Lk, D)    keys (already rotary-embedded) and values, Hq % Hkv == 0
    k_mul, k_add (B, Hkv, D)        key infusion vectors
    v_mul, v_add (B, Hkv, D)        value infusion vectors
    head_logit   (Hkv,)             lambda, the learnable per-KV-head gate logit

For every sample b, KV head h and key position t::

    c_t  = cosine_similarity(v_t, v_add)          # torch.nn.functional.cosine_similarity, eps = 1e-8, >= fp32
    g_t  = sigmoid(lambda_h + c_t)                # g_t = 1 when rescale=False
    K'_t = k_t + g_t * (k_t * k_mul + k_add)
    V'_t = v_t + g_t * (v_t * v_mul + v_add)
    O    = softmax(q K'^T * scale + mask) V'      # scale = 1 / sqrt(D) by default

Query head j reads KV head ``j // (Hq // Hkv)`` (grouped-query attention). ``causal=True`` is bottom-right aligned:
query i sees key j iff ``j <= i + Lk - Lq``. ``kv_mask`` (B, Lk) bool marks keys that may be attended. A query row
that sees no key outputs exactly 0 and receives zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gates, softmax statistics and sums are computed in for inputs of ``dtype``: at least fp32 (fp64 stays
    fp64 so gradcheck is exact). Every backend follows it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def infusion_gate(v: torch.Tensor, v_add: torch.Tensor, head_logit: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """Per-token head gate ``g = sigmoid(lambda_h + cos(v_t, v_add))``.

    Args:
        v: (B, Hkv, Lk, D) values.
        v_add: (B, Hkv, D) additive value infusion.
        head_logit: (Hkv,) gate logits lambda.
        rescale: when False the gate is identically 1.

    Returns:
        (B, Hkv, Lk, 1) gate in fp32 (fp64 for fp64 inputs).
    """
    ct = accumulator_dtype(v.dtype)
    if not rescale:
        return torch.ones(*v.shape[:-1], 1, dtype=ct, device=v.device)
    cos = F.cosine_similarity(v.to(ct), v_add.to(ct)[:, :, None, :], dim=-1, eps=COSINE_EPS)
    return torch.sigmoid(head_logit.to(ct)[None, :, None] + cos)[..., None]


def infuse(x: torch.Tensor, x_mul: torch.Tensor, x_add: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x' = x + g * (x * x_mul + x_add)`` with x (B, Hkv, L, D), x_mul/x_add (B, Hkv, D), gate (B, Hkv, L, 1).

    Computed in x's dtype (the gate is cast down), as a user would write it in PyTorch.
    """
    g = gate.to(x.dtype)
    return x + g * (x * x_mul[:, :, None, :] + x_add[:, :, None, :])


def attention_mask(
    lq: int, lk: int, *, causal: bool, kv_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask of allowed (query, key) pairs, broadcastable to (B, H, Lq, Lk); None if everything is allowed."""
    allowed = None
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        allowed = (j <= i + (lk - lq))[None, None]
    if kv_mask is not None:
        km = kv_mask[:, None, None, :]
        allowed = km if allowed is None else allowed & km
    return allowed


def masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    kv_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Explicit ``softmax(q k^T * scale + mask) v`` with GQA; rows that see no key give 0 (and zero gradient).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D). Returns (B, Hq, Lq, D).
    """
    if torch.compiler.is_compiling():
        # The non-finite contract needs branches on tensor contents, which a compiled graph cannot hold: the graph
        # keeps this function as one opaque op that runs it eagerly (mit_kernels/reference_op.py defines it on top of
        # this module; `import mit_kernels` has registered it, so it is found by its torch.library name).
        return torch.ops.mit_kernels.reference_attention_fwd(q, k, v, kv_mask, causal, scale)
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = attention_mask(q.shape[2], k.shape[2], causal=causal, kv_mask=kv_mask, device=q.device)
    if allowed is None:
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)
    scores = visible_scores(q, k, allowed) * scale
    row_sees_a_key = allowed.any(dim=-1, keepdim=True)
    # Fill disallowed scores with -inf; rows with no key at all get a constant so softmax stays finite; disallowed
    # probabilities are then set to exactly 0 (a NaN row's softmax is NaN everywhere, masked keys included).
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_sees_a_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return probs_times_visible_values(probs, v, allowed)


def _nonfinite_columns(*xs: torch.Tensor) -> torch.Tensor:
    """Indices of the last-dim columns where any of ``xs`` holds a NaN or an Inf."""
    bad = torch.zeros(xs[0].shape[-1], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        bad |= (~torch.isfinite(x)).flatten(0, -2).any(dim=0)
    return bad.nonzero().flatten()


def visible_scores(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``q_i . k_j`` for every pair, such that a pair the mask hides passes back exactly zero gradient even when q_i or
    k_j holds a NaN or an Inf (``matmul``'s backward would give ``0 * NaN = NaN``).

    q (B, H, Lq, D), k (B, H, Lk, D), allowed bool broadcastable to (B, H, Lq, Lk). Returns (B, H, Lq, Lk). With
    finite inputs this is exactly ``q @ k^T``; otherwise the columns holding non-finite entries are taken out of the
    product and added back pair by pair, zeroed (before the product) where the pair is hidden.
    """
    if bool(torch.isfinite(q).all() & torch.isfinite(k).all()):
        return torch.matmul(q, k.transpose(-1, -2))
    columns = _nonfinite_columns(q, k)
    scores = torch.matmul(q.index_fill(-1, columns, 0.0), k.index_fill(-1, columns, 0.0).transpose(-1, -2))
    allowed = allowed.expand(scores.shape)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    for d in columns.tolist():
        qd = torch.where(allowed, q[..., :, None, d], zero)
        kd = torch.where(allowed, k[..., None, :, d], zero)
        scores = scores + qd * kd
    return scores


def probs_times_visible_values(probs: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``O_i = sum over the keys j row i sees of p_ij v_j``: a key a row does not see never reaches it, even when its
    value is NaN or Inf (a plain ``probs @ v`` would give ``0 * NaN = NaN``).

    probs (B, H, Lq, Lk), zero where not allowed; v (B, H, Lk, D); allowed bool, broadcastable to (B, H, Lq, Lk).
    Returns (B, H, Lq, D). With finite values this is exactly ``probs @ v``; otherwise the non-finite entries are added
    column by column over the allowed pairs only (``p_ij * v_jd``, so a visible key with p = 0 and v = Inf still
    gives NaN, as IEEE arithmetic does).
    """
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(probs, v)
    out = torch.matmul(probs, v.masked_fill(~finite, 0.0))
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    bad = torch.where(finite, zero, v)
    columns = _nonfinite_columns(v)
    allowed = allowed.expand(probs.shape)
    # where before the product: a disallowed pair contributes (and passes back) exactly 0, not 0 * NaN.
    extra = [(probs * torch.where(allowed, bad[..., None, :, d], zero)).sum(-1) for d in columns.tolist()]
    return out.index_add(-1, columns, torch.stack(extra, dim=-1))


def mit_attention_reference(
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
) -> torch.Tensor:
    """MiT attention, written directly from the equations in the module docstring. Returns (B, Hq, Lq, D)."""
    gate = infusion_gate(v, v_add, head_logit, rescale)
    k_inf = infuse(k, k_mul, k_add, gate)
    v_inf = infuse(v, v_mul, v_add, gate)
    return masked_softmax_attention(q, k_inf, v_inf, causal=causal, scale=scale, kv_mask=kv_mask)


def mit_ffn_gate_reference(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """MiT's infused SwiGLU gate, the input of a Llama MLP's down projection::

        y = silu(gate) * up * (1 + f)          f = ffn_mul, broadcast over the sequence

    so the MLP is ``down(silu(gate_proj(x)) * up_proj(x) * (1 + ffn_mul))``.

    Args:
        gate: (B, L, F) gate projection ``gate_proj(x)``.
        up: (B, L, F) up projection ``up_proj(x)``.
        ffn_mul: (B, F) per-sample multiplicative infusion.

    Returns:
        (B, L, F), computed in the inputs' dtype as a user would write it in PyTorch (autograd gives the gradients).
    """
    return F.silu(gate) * up * (1 + ffn_mul[:, None, :])
