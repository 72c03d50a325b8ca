"""The exact ``"sdpa"`` backend: MiT's infusion in eager PyTorch, then torch's ``scaled_dot_product_attention``.

The gate and the infusion are computed as in ``docs/semantics.md`` (in fp32, fp64 for fp64 inputs), K' and V' are cast
to q's dtype, and :func:`torch.nn.functional.scaled_dot_product_attention` attends over them, so on a GPU the work runs
in torch's flash / cuDNN / memory-efficient kernels. Gradients of all eight inputs come from autograd (torch's SDPA
backward, then the infusion's). It is what ``backend="auto"`` runs on a CUDA device that the Triton kernels cannot use
(:mod:`mit_kernels.dispatch`), and runs on any device torch's SDPA runs on.

Where SDPA's conventions differ from the contract, this module makes them agree:

- ``causal`` is bottom-right aligned here (query i sees key j iff ``j <= i + Lk - Lq``); SDPA's ``is_causal`` is
  top-left aligned. ``is_causal=True`` is used only when ``Lq == Lk`` (where the two agree); ``Lq < Lk`` without
  padding uses :func:`torch.nn.attention.bias.causal_lower_right` (an explicit mask under ``torch.compile``, which
  cannot trace it); padding, or ``Lq > Lk``, an explicit bool mask. No padding and no causal mask: no mask at all.
- A row that sees no key gives NaN in some of SDPA's kernels (torch 2.14's CPU kernels give 0; what each CUDA kernel
  gives depends on the torch version), and a NaN there spreads to dK' and dV' in the backward. Such rows are found
  from the masks (a cumulative count of the kept keys), given one key in the mask so that SDPA never sees an empty
  row, and set to 0 with ``torch.where``: they output exactly 0 and pass back exactly zero gradient.
- A key a row does not see must not influence it even when it holds a NaN or an Inf (docs/semantics.md, "Masking"),
  but SDPA computes ``P V'``, where ``0 * NaN = NaN``. So when q, K' or V' hold a non-finite value the call runs the
  reference (:func:`mit_kernels.reference.mit_attention_reference`) instead, which puts NaN / Inf exactly where the
  contract says. **Cost:** the check reads q, K' and V' once and synchronises the device once per call (the host
  waits for the infusion before it launches the attention); finite inputs then take the SDPA path. Under
  ``torch.compile`` the check is skipped (a graph cannot branch on data), as the reference skips its own exact paths:
  NaN / Inf then spread as SDPA spreads them, which may reach rows that do not see them.
- torch's SDPA backward kernels have no derivative, so double backward (``create_graph=True`` with inputs that
  require grad) raises a ``RuntimeError`` pointing to ``backend="reference"``, like the fused backends, on every
  device and on both paths.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

from .reference import accumulator_dtype, infuse, infusion_gate, mit_attention_reference
from .validation import check_attention_inputs, check_bool, check_scale, refuse_double_backward

DOUBLE_BACKWARD_OP = "torch.nn.functional.scaled_dot_product_attention"


def mit_attention_sdpa(
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
    """MiT attention through torch's ``scaled_dot_product_attention`` (see the module docstring for how the contract
    of ``docs/semantics.md`` is kept).

    Args:
        q: (B, Hq, Lq, D) queries.
        k, v: (B, Hkv, Lk, D) keys (rotary already applied) and values; ``Hq % Hkv == 0`` (grouped-query attention
            through SDPA's ``enable_gqa``, without repeating K' and V' in memory).
        k_mul, k_add, v_mul, v_add: (B, Hkv, D) infusion vectors, q's dtype.
        head_logit: (Hkv,) gate logits lambda, any float dtype.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Lk - Lq).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_mask: optional (B, Lk) bool, True where the key may be attended.
        rescale: apply the head gate; with False, g = 1.

    Returns:
        (B, Hq, Lq, D) in q's dtype, contiguous. Rows that see no key are exactly 0. Raises ValueError naming the
        argument for bad input.
    """
    check_attention_inputs(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, scale)
    return sdpa_attention(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit,
        causal=check_bool("causal", causal), scale=check_scale(scale), kv_mask=kv_mask,
        rescale=check_bool("rescale", rescale),
    )  # fmt: skip


def sdpa_attention(
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
    """:func:`mit_attention_sdpa` on inputs already validated (by :func:`mit_kernels.mit_attention`); same shapes."""
    inputs = _RefuseDoubleBackward.apply(q, k, v, k_mul, k_add, v_mul, v_add, head_logit)
    q, k, v, k_mul, k_add, v_mul, v_add, head_logit = inputs
    ct = accumulator_dtype(q.dtype)
    gate = infusion_gate(v, v_add, head_logit, rescale)  # (B, Hkv, Lk, 1) in ct
    k_inf = infuse(k.to(ct), k_mul.to(ct), k_add.to(ct), gate).to(q.dtype)
    v_inf = infuse(v.to(ct), v_mul.to(ct), v_add.to(ct), gate).to(q.dtype)
    if not torch.compiler.is_compiling() and not _all_finite(q, k_inf, v_inf):
        return mit_attention_reference(*inputs, causal=causal, scale=scale, kv_mask=kv_mask, rescale=rescale)
    return _attend(q, k_inf, v_inf, causal=causal, scale=scale, kv_mask=kv_mask)


def _all_finite(*xs: torch.Tensor) -> bool:
    """Whether every entry of ``xs`` is finite: one reduction per tensor, one device synchronisation in all."""
    finite = torch.isfinite(xs[0]).all()
    for x in xs[1:]:
        finite = finite & torch.isfinite(x).all()
    return bool(finite)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    kv_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` through SDPA with the contract's masks. q (B, Hq, Lq, D); k, v (B, Hkv,
    Lk, D), finite. Returns (B, Hq, Lq, D), contiguous; rows that see no key are 0 and pass back zero gradient."""
    lq, lk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    # torch.compile cannot trace the construction of torch's causal-bias tensor subclass: an explicit mask there.
    lower_right = lq < lk and not torch.compiler.is_compiling()
    if kv_mask is None and (not causal or lq == lk or lower_right):
        # Every row sees a key: no mask, SDPA's top-left is_causal where it equals bottom-right (Lq == Lk), or
        # torch's bottom-right causal bias.
        mask = causal_lower_right(lq, lk) if causal and lq < lk else None
        is_causal = causal and lq == lk
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        return out.contiguous()
    allowed, row_sees_a_key = visibility(lq, lk, causal=causal, kv_mask=kv_mask, device=q.device)
    # A row that sees no key gets key 0, so that SDPA stays finite in the forward and the backward; its output is
    # then replaced by 0, whose zero gradient gives that key exactly zero dK' and dV' (q, k, v are finite here).
    first_key = torch.arange(lk, device=q.device) == 0
    mask = allowed | (~row_sees_a_key & first_key)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return torch.where(row_sees_a_key, out, 0.0).contiguous()


def visibility(
    lq: int, lk: int, *, causal: bool, kv_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bool mask of allowed (query, key) pairs and whether each query row sees at least one key.

    ``causal`` is bottom-right aligned (query i sees key j iff ``j <= i + Lk - Lq``), ``kv_mask`` (B, Lk) bool marks
    the keys that may be attended. Returns ``(allowed, row_sees_a_key)``: allowed broadcastable to (B, 1, Lq, Lk) —
    (B, 1, 1, Lk) without ``causal``, (1, 1, Lq, Lk) without ``kv_mask`` — and row_sees_a_key broadcastable to
    (B, 1, Lq, 1), computed from the number of kept keys each row reaches (a cumulative count under ``causal``), not
    by reducing ``allowed``.
    """
    keys = torch.arange(lk, device=device)
    if not causal:
        if kv_mask is None:
            everything = torch.ones(1, 1, 1, lk, dtype=torch.bool, device=device)
            return everything, everything[..., :1]
        return kv_mask[:, None, None, :], (kv_mask.sum(dim=-1) > 0)[:, None, None, None]
    last = torch.arange(lq, device=device) + (lk - lq)  # the last key each row may see (negative: none)
    causal_allowed = (keys <= last[:, None])[None, None]  # (1, 1, Lq, Lk)
    if kv_mask is None:
        return causal_allowed, (last >= 0)[None, None, :, None]
    kept = kv_mask.cumsum(dim=-1)  # (B, Lk): how many of the keys 0..j may be attended
    row_sees_a_key = (last >= 0) & (kept[:, last.clamp(min=0)] > 0)  # (B, Lq)
    return causal_allowed & kv_mask[:, None, None, :], row_sees_a_key[:, None, :, None]


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the eight inputs (views, no copy) whose backward raises under ``create_graph=True`` when they
    require grad: torch's SDPA backward kernels are not differentiable, and the refusal must not depend on which
    kernel (or the reference path) ran. Placed on the inputs, its backward runs after the attention's and the
    infusion's, within the same ``backward`` call."""

    @staticmethod
    def forward(ctx, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(*inputs)
        return tuple(x.view_as(x) for x in inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward(DOUBLE_BACKWARD_OP, "sdpa", (*ctx.saved_tensors, *grads))
        return grads
