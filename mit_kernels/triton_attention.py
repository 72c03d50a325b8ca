"""Triton kernels for MiT attention: a flash-attention-2 forward and backward with the infusion fused in.

The infusion is applied to each K/V tile right after it is loaded::

    c_t  = <v_t, a> / (max(|v_t|, eps) * max(|a|, eps))        a = v_add, eps = 1e-8
    g_t  = sigmoid(lambda_h + c_t)                              (1 when RESCALE is off)
    K'_t = k_t + g_t * (k_t * k_mul + k_add)
    V'_t = v_t + g_t * (v_t * v_mul + v_add)

so K' and V' never reach global memory and no (Lq, Lk) buffer exists. Softmax runs online in base 2:
``s = (q . K'_t) * scale * log2(e)``, and the forward saves ``lse2 = m + log2(l)`` per query row (+inf for a row that
sees no key, so the backward's ``p = exp2(s - lse2)`` is 0 there; NaN for a row whose visible scores are all -inf).

NaN / Inf propagate like the reference (docs/semantics.md): maxima propagate NaN, "the row sees no key" comes from the
masks (never from a NaN ``l``), and every product over (query, key) pairs goes through :func:`_visible_dot`, so a key a
row does not see never reaches it, even a NaN one.

Backward (given dO), with ``delta_i = sum_d O_id dO_id``::

    p_it  = exp2(s_it - lse2_i)
    dV'_t = sum_i p_it dO_i                     dP_it = dO_i . V'_t
    dS_it = p_it (dP_it - delta_i)
    dK'_t = scale * sum_i dS_it q_i             dq_i  = scale * sum_t dS_it K'_t

and then through the infusion (all in fp32, per key token t of KV head h)::

    dk_t     = dK'_t * (1 + g_t k_mul)                 dv_t (direct) = dV'_t * (1 + g_t v_mul)
    dk_mul   = sum_t g_t dK'_t * k_t                   dv_mul  = sum_t g_t dV'_t * v_t
    dk_add   = sum_t g_t dK'_t                         dv_add (direct) = sum_t g_t dV'_t
    dg_t     = <dK'_t, k_t * k_mul + k_add> + <dV'_t, v_t * v_mul + v_add>
    dz_t     = dg_t g_t (1 - g_t)                      dlambda_h = sum_{b,t} dz_t
    dv_t    += dz_t (a / (n_v n_a) - c_t v_t / (|v_t| n_v))
    dv_add  += sum_t dz_t (v_t / (n_v n_a) - c_t a / (|a| n_a))

where ``n_x = max(|x|, eps)``: exactly the gradient torch's cosine_similarity gives (its clamp passes gradient), with
``x / |x|`` read as 0 for x = 0.

Determinism: no atomics. dq has its own kernel (one program per query block); dk and dv come from one program per key
block that loops over the group's query heads; the per-(b, h) vector gradients are written as per-key-block partial
sums and reduced with ``torch.sum`` afterwards, so results are bitwise reproducible run to run.

GQA: query head ``j`` reads KV head ``j // group`` directly; nothing is repeated in memory.

Offsets: the program ids are widened to int64 before anything is multiplied by a stride, so every element offset
(``b * stride_b + h * stride_h + row * stride_row``, and the rows of LSE, delta and the partial sums) is computed in
64 bits. With 32-bit arithmetic ``b * stride_b`` overflows once B·H·L·D passes 2^31 elements (e.g. B 16, 32 heads,
L 32k, D 128), and a view with a large head stride overflows sooner; tests/kernels/test_triton_offsets.py runs such a view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import accumulator_dtype
from .triton_common import interpreter_active, tl_accumulator, tl_dtype
from .triton_configs import DECODE_ROWS, TileConfig, choose

LOG2E = 1.4426950408889634
COSINE_EPS = 1e-8


# --------------------------------------------------------------------------------------------------------------------
# Shared device functions
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_vectors(KM, KA, VM, VA, vec_off, offs_d, D, ACC: tl.constexpr):
    """Load the four (D,) infusion vectors of one (b, h) and return them with ``max(|v_add|, eps)`` and ``|v_add|``."""
    mask_d = offs_d < D
    k_mul = tl.load(KM + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    k_add = tl.load(KA + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    v_mul = tl.load(VM + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    v_add = tl.load(VA + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    norm_a = tl.sqrt(tl.sum(v_add * v_add, axis=0))
    return k_mul, k_add, v_mul, v_add, norm_a, tl.maximum(norm_a, COSINE_EPS)


@triton.jit
def _load_tile(ptr, offs_n, offs_d, stride_n, L, D, ACC: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_D) tile of rows ``offs_n`` (zero outside [0, L) x [0, D)) and cast it to ACC."""
    mask = (offs_n[:, None] < L) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _gate(v, v_add, clamped_norm_a, head_logit, RESCALE: tl.constexpr):
    """Per-token gate g (BLOCK_N,), cosine c and ``max(|v_t|, eps)``, from a value tile v (BLOCK_N, BLOCK_D)."""
    norm_v = tl.sqrt(tl.sum(v * v, axis=1))
    clamped_norm_v = tl.maximum(norm_v, COSINE_EPS)
    cos = tl.sum(v * v_add[None, :], axis=1) / (clamped_norm_v * clamped_norm_a)
    if RESCALE:
        gate = tl.sigmoid(head_logit + cos)
    else:
        gate = tl.full(cos.shape, 1.0, cos.dtype)
    return gate, cos, norm_v, clamped_norm_v


@triton.jit
def _infuse(x, x_mul, x_add, gate):
    """``x' = x + g * (x * x_mul + x_add)`` for a tile x (BLOCK_N, BLOCK_D) and gate (BLOCK_N,)."""
    return x + gate[:, None] * (x * x_mul[None, :] + x_add[None, :])


@triton.jit
def _max_nan(a, b):
    """Combine function of a NaN-propagating max reduction (tl.max may drop NaN on GPUs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _visible_dot(acc, a, b, allowed, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` over the allowed pairs only: ``acc_id + sum_j a_ij b_jd`` for ``allowed[i, j]``, where ``a`` is 0
    at every pair that is not allowed and ``b`` may hold NaN / Inf. A plain ``tl.dot`` would turn a hidden pair into
    ``0 * NaN = NaN`` (e.g. a causally hidden key's NaN value reaching an earlier query); here the non-finite entries of
    ``b`` are taken out of the product and added back over the allowed pairs with IEEE semantics (``a_ij * Inf`` is
    ±Inf, or NaN for ``a_ij = 0``), by indicator products. The extra products run only for a tile that holds a
    non-finite entry."""
    finite = tl.abs(b) < float("inf")  # False for NaN and ±Inf
    acc += tl.dot(a.to(DOT), tl.where(finite, b, 0.0).to(DOT), input_precision=PRECISION, out_dtype=ACC)
    if tl.sum((~finite).to(tl.int32)) > 0:
        pinf = (b == float("inf")).to(DOT)
        ninf = (b == float("-inf")).to(DOT)
        nan = (b != b).to(DOT)
        pos = (allowed & (a > 0.0)).to(DOT)
        neg = (allowed & (a < 0.0)).to(DOT)
        zero = (allowed & (a == 0.0)).to(DOT)
        nan_hits = tl.dot(allowed.to(DOT), nan, input_precision=PRECISION, out_dtype=ACC)
        nan_hits += tl.dot(zero, pinf + ninf, input_precision=PRECISION, out_dtype=ACC)
        pos_hits = tl.dot(pos, pinf, input_precision=PRECISION, out_dtype=ACC)
        pos_hits += tl.dot(neg, ninf, input_precision=PRECISION, out_dtype=ACC)
        neg_hits = tl.dot(pos, ninf, input_precision=PRECISION, out_dtype=ACC)
        neg_hits += tl.dot(neg, pinf, input_precision=PRECISION, out_dtype=ACC)
        acc = tl.where(pos_hits > 0.0, acc + float("inf"), acc)
        acc = tl.where(neg_hits > 0.0, acc - float("inf"), acc)
        acc = tl.where(nan_hits > 0.0, float("nan"), acc)
    return acc


@triton.jit
def _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC: tl.constexpr):
    """Rebuild ``scale`` and ``scale * log2(e)`` in ACC from fp32 hi + lo halves (float kernel arguments are fp32;
    the split keeps ~48 bits, enough for fp64 gradcheck)."""
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    scale_log2 = tl.cast(scale_log2_hi, ACC) + tl.cast(scale_log2_lo, ACC)
    return scale, scale_log2


@triton.jit
def _allowed(offs_m, offs_n, kv_keep, Lq, Lk, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the (query, key) pairs that may attend (bottom-right causal, key padding)."""
    ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk) & kv_keep[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return ok


@triton.jit
def _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK: tl.constexpr):
    """(BLOCK_N,) bool: the key may be attended (inside [0, Lk) and, with a padding mask, marked True there)."""
    keep = offs_n < Lk
    if HAS_KV_MASK:
        keep = keep & (tl.load(KVM + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
    return keep


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mit_attn_fwd_kernel(
    Q, K, V, KM, KA, VM, VA, HL, KVM, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    Hq, Hkv, Lq, Lk, D, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, RESCALE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qm, Lq, D, ACC).to(DOT)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k_mul, k_add, v_mul, v_add, _, clamped_norm_a = _load_vectors(KM, KA, VM, VA, (b * Hkv + h) * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    _scale, scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    seen = tl.zeros([BLOCK_M], tl.int1)  # the row sees at least one key (a property of the masks alone)

    hi = Lk
    if CAUSAL:  # the last query of this block sees keys j <= (pid_m + 1) * BLOCK_M - 1 + Lk - Lq
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, ACC)
        gate, _, _, _ = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)
        keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)
        k_inf = _infuse(k, k_mul, k_add, gate).to(DOT)
        # A padded key's V' row is zeroed: its p = 0 would otherwise turn a NaN / Inf there into 0 * NaN in P V'.
        v_inf = tl.where(keep[:, None], _infuse(v, v_mul, v_add, gate), 0.0).to(DOT)

        s = tl.dot(q, tl.trans(k_inf), input_precision=PRECISION, out_dtype=ACC) * scale_log2
        allowed = _allowed(offs_m, offs_n, keep, Lq, Lk, CAUSAL)
        s = tl.where(allowed, s, float("-inf"))
        seen = seen | (tl.max(allowed.to(tl.int32), axis=1) > 0)

        # NaN-propagating maxima: a NaN score makes its row NaN, as in the reference's softmax.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_nan), propagate_nan=tl.PropagateNan.ALL)
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, never NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = tl.where(allowed, p, 0.0)
        acc = _visible_dot(acc * alpha[:, None], p, v_inf, allowed, ACC, DOT, PRECISION)
        m_i = m_new

    # A row that sees no key gives 0 (lse2 = +inf); one that sees keys keeps what its statistics give: NaN for NaN
    # scores or values (a NaN l is never read as "no key"), and NaN when all its visible scores are -inf (l = 0).
    no_mass = l_i == 0.0
    l_safe = tl.where(no_mass, 1.0, l_i)
    out = tl.where(seen[:, None], tl.where(no_mass[:, None], float("nan"), acc / l_safe[:, None]), 0.0)
    lse2 = tl.where(seen, tl.where(no_mass, float("nan"), m_i + tl.math.log2(l_safe)), float("inf"))
    o_ptrs = O + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    tl.store(LSE + pid_bh * Lq + offs_m, lse2.to(LSE.dtype.element_ty), mask=offs_m < Lq)


# --------------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mit_attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    Hq, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d O_id * dO_id, per query row (fp32; fp64 for fp64 inputs)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + hq * stride_oh, offs_m, offs_d, stride_om, Lq, D, ACC)
    do = _load_tile(DO + b * stride_dob + hq * stride_doh, offs_m, offs_d, stride_dom, Lq, D, ACC)
    tl.store(DELTA + pid_bh * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@triton.jit
def _mit_attn_bwd_dq_kernel(
    Q, K, V, KM, KA, VM, VA, HL, KVM, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    Hq, Hkv, Lq, Lk, D, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, RESCALE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq_i = scale * sum_t dS_it K'_t for one block of queries of one query head (K', V' recomputed per tile)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qm, Lq, D, ACC).to(DOT)
    do = _load_tile(DO + b * stride_dob + hq * stride_doh, offs_m, offs_d, stride_dom, Lq, D, ACC).to(DOT)
    lse2 = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf")).to(ACC)
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0).to(ACC)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k_mul, k_add, v_mul, v_add, _, clamped_norm_a = _load_vectors(KM, KA, VM, VA, (b * Hkv + h) * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    scale, scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, ACC)
        gate, _, _, _ = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)
        keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)
        # A padded key's K' row is zeroed: dS = 0 there, and 0 * NaN in dS K' would reach dq.
        k_inf = tl.where(keep[:, None], _infuse(k, k_mul, k_add, gate), 0.0).to(DOT)
        v_inf = _infuse(v, v_mul, v_add, gate).to(DOT)

        s = tl.dot(q, tl.trans(k_inf), input_precision=PRECISION, out_dtype=ACC) * scale_log2
        allowed = _allowed(offs_m, offs_n, keep, Lq, Lk, CAUSAL)
        p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0).to(ACC)
        dp = tl.dot(do, tl.trans(v_inf), input_precision=PRECISION, out_dtype=ACC)
        ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
        dq = _visible_dot(dq, ds, k_inf, allowed, ACC, DOT, PRECISION)

    dq_ptrs = DQ + b * stride_dqb + hq * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


@triton.jit
def _mit_attn_bwd_dkdv_kernel(
    Q, K, V, KM, KA, VM, VA, HL, KVM, DO, LSE, DELTA,
    DK, DV, DKM_PART, DKA_PART, DVM_PART, DVA_PART, DHL_PART,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    Hq, Hkv, Lq, Lk, D, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, NUM_KV_BLOCKS,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, RESCALE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of keys of one KV head: accumulate dK', dV' over the group's query heads, then push them through
    the infusion to dk, dv and this block's partial sums of dk_mul, dk_add, dv_mul, dv_add and dlambda."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k_mul, k_add, v_mul, v_add, norm_a, clamped_norm_a = _load_vectors(KM, KA, VM, VA, pid_bh * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    scale, scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)
    v = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, ACC)
    gate, _, _, _ = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)
    k_inf = _infuse(_load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC), k_mul, k_add, gate).to(DOT)
    v_inf = _infuse(v, v_mul, v_add, gate).to(DOT)
    keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)

    dk_inf = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv_inf = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo = 0
    if CAUSAL:  # query i sees key j iff i >= j - (Lk - Lq): skip query blocks entirely before that
        lo = tl.maximum(0, pid_n * BLOCK_N - (Lk - Lq))
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        hq = h * GROUP + g
        q_base = Q + b * stride_qb + hq * stride_qh
        do_base = DO + b * stride_dob + hq * stride_doh
        row_base = (b * Hq + hq) * Lq
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, offs_m, offs_d, stride_qm, Lq, D, ACC).to(DOT)
            do = _load_tile(do_base, offs_m, offs_d, stride_dom, Lq, D, ACC).to(DOT)
            lse2 = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=float("inf")).to(ACC)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Lq, other=0.0).to(ACC)

            s = tl.dot(q, tl.trans(k_inf), input_precision=PRECISION, out_dtype=ACC) * scale_log2
            allowed = _allowed(offs_m, offs_n, keep, Lq, Lk, CAUSAL)
            p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0).to(ACC)
            dv_inf = _visible_dot(dv_inf, tl.trans(p), do, tl.trans(allowed), ACC, DOT, PRECISION)
            dp = tl.dot(do, tl.trans(v_inf), input_precision=PRECISION, out_dtype=ACC)
            ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
            dk_inf = _visible_dot(dk_inf, tl.trans(ds), q, tl.trans(allowed), ACC, DOT, PRECISION)
    # A padded key gets exactly zero dK', dV' (0 * NaN in dS^T Q would put a NaN query row there).
    dk_inf = tl.where(keep[:, None], dk_inf * scale, 0.0)
    dv_inf = tl.where(keep[:, None], dv_inf, 0.0)

    # Through the infusion. Raw tiles are re-read here rather than kept live across the loop.
    k = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC)
    dk = dk_inf * (1.0 + gate[:, None] * k_mul[None, :])
    dv = dv_inf * (1.0 + gate[:, None] * v_mul[None, :])
    part = pid_bh * NUM_KV_BLOCKS + pid_n
    tl.store(DKM_PART + part * D + offs_d, tl.sum(gate[:, None] * dk_inf * k, axis=0), mask=offs_d < D)
    tl.store(DKA_PART + part * D + offs_d, tl.sum(gate[:, None] * dk_inf, axis=0), mask=offs_d < D)
    tl.store(DVM_PART + part * D + offs_d, tl.sum(gate[:, None] * dv_inf * v, axis=0), mask=offs_d < D)
    dv_add = tl.sum(gate[:, None] * dv_inf, axis=0)
    if RESCALE:
        gate, cos, norm_v, clamped_norm_v = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)
        dgate = tl.sum(
            dk_inf * (k * k_mul[None, :] + k_add[None, :]) + dv_inf * (v * v_mul[None, :] + v_add[None, :]), axis=1
        )
        dz = dgate * gate * (1.0 - gate)  # d loss / d(lambda + c_t)
        tl.store(DHL_PART + part, tl.sum(dz, axis=0))
        # d c / d v_t = a / (n_v n_a) - c v_t / (|v_t| n_v);  d c / d a = v_t / (n_v n_a) - c a / (|a| n_a)
        inv_norm_v = tl.where(norm_v > 0.0, 1.0 / tl.where(norm_v > 0.0, norm_v, 1.0), 0.0)
        inv_norm_a = tl.where(norm_a > 0.0, 1.0 / tl.where(norm_a > 0.0, norm_a, 1.0), 0.0)
        w = dz / (clamped_norm_v * clamped_norm_a)
        dv += w[:, None] * v_add[None, :] - (dz * cos * inv_norm_v / clamped_norm_v)[:, None] * v
        dv_add += tl.sum(w[:, None] * v, axis=0) - tl.sum(dz * cos, axis=0) * inv_norm_a / clamped_norm_a * v_add
    tl.store(DVA_PART + part * D + offs_d, dv_add, mask=offs_d < D)

    mask_nd = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_nd)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> dict:
    """Accumulator dtype, tl.dot operand dtype and precision.

    Elementwise work is always fp32 (fp64 for fp64 inputs). On a GPU fp16/bf16 dots take their operands in the input
    dtype (tensor cores, fp32 accumulation), and fp32 dots use IEEE fp32 (no silent TF32). The interpreter computes
    bf16 arithmetic wrongly, so there every dot runs in fp32.
    """
    acc = tl_accumulator(dtype)
    if dtype in (torch.float16, torch.bfloat16) and not interpreter_active():
        dot = tl_dtype(dtype)
    else:
        dot = acc
    return {"ACC": acc, "DOT": dot, "PRECISION": "ieee"}


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _split_scales(scale: float) -> tuple[float, float, float, float]:
    """(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo): fp32 halves whose sum is the fp64 value to ~1e-14."""
    out = []
    for x in (scale, scale * LOG2E):
        hi = float(torch.tensor(x, dtype=torch.float32))
        out += [hi, x - hi]
    return tuple(out)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _kv_mask_arg(kv_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if kv_mask is None:
        return q, False
    return kv_mask.contiguous().view(torch.uint8), True


def mit_attention_triton_fwd(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns ``out`` (B, Hq, Lq, D) in q's dtype and ``lse2`` (B, Hq, Lq) fp32 (base-2 log-sum-exp
    of the scaled scores; +inf for rows that see no key). Inputs are assumed validated."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    k_mul, k_add, v_mul, v_add = (x.contiguous() for x in (k_mul, k_add, v_mul, v_add))
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty((batch, hq, lq), device=q.device, dtype=accumulator_dtype(q.dtype))
    kvm, has_kv_mask = _kv_mask_arg(kv_mask, q)
    block_d = _block_d(d)

    def launch(config: TileConfig) -> None:
        grid = (triton.cdiv(lq, config.block_m), batch * hq)
        _mit_attn_fwd_kernel[grid](
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit.contiguous(), kvm, out, lse2,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            hq, hkv, lq, lk, d, *_split_scales(scale),
            GROUP=hq // hkv, CAUSAL=causal, RESCALE=rescale, HAS_KV_MASK=has_kv_mask, BLOCK_D=block_d,
            **config.launch_args(), **_precision(q.dtype),
        )  # fmt: skip

    key = (q.dtype, hq // hkv, causal, rescale, has_kv_mask)
    decode = lq <= DECODE_ROWS
    launch(choose("fwd", block_d, q, key, launch, decode=decode, interpreter=interpreter_active()))
    return out, lse2


def mit_attention_triton_bwd(
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
) -> tuple[torch.Tensor, ...]:
    """Launch the backward. Returns (dq, dk, dv, dk_mul, dk_add, dv_mul, dv_add, dhead_logit) in the inputs' dtypes.

    Deterministic: the (B, Hkv, D) vector gradients and dhead_logit are per-key-block partial sums (fp32) reduced by
    ``torch.sum``; no atomics are used anywhere."""
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    k_mul, k_add, v_mul, v_add = (x.contiguous() for x in (k_mul, k_add, v_mul, v_add))
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    prec = _precision(q.dtype)
    acc_dtype = accumulator_dtype(q.dtype)
    kvm, has_kv_mask = _kv_mask_arg(kv_mask, q)
    common = {"GROUP": hq // hkv, "CAUSAL": causal, "RESCALE": rescale, "HAS_KV_MASK": has_kv_mask, **prec}

    block_d = _block_d(d)
    interpreted = interpreter_active()
    key = (q.dtype, hq // hkv, causal, rescale, has_kv_mask)
    delta = torch.empty((batch, hq, lq), device=q.device, dtype=acc_dtype)
    delta_rows = 16 if interpreted else 64
    _mit_attn_bwd_delta_kernel[(triton.cdiv(lq, delta_rows), batch * hq)](
        out, grad_out, delta,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        hq, lq, d, BLOCK_M=delta_rows, BLOCK_D=block_d, ACC=prec["ACC"],
    )  # fmt: skip

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)

    def launch_dq(config: TileConfig) -> None:
        _mit_attn_bwd_dq_kernel[(triton.cdiv(lq, config.block_m), batch * hq)](
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit.contiguous(), kvm, grad_out, lse2, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            hq, hkv, lq, lk, d, *_split_scales(scale),
            BLOCK_D=block_d, **common, **config.launch_args(),
        )  # fmt: skip

    launch_dq(choose("bwd_dq", block_d, q, key, launch_dq, interpreter=interpreted))

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)

    def launch_dkdv(config: TileConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
        num_kv_blocks = triton.cdiv(lk, config.block_n)
        parts = [torch.empty((batch, hkv, num_kv_blocks, d), device=q.device, dtype=acc_dtype) for _ in range(4)]
        dhl_part = torch.zeros((batch, hkv, num_kv_blocks), device=q.device, dtype=acc_dtype)
        _mit_attn_bwd_dkdv_kernel[(num_kv_blocks, batch * hkv)](
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit.contiguous(), kvm, grad_out, lse2, delta,
            dk, dv, *parts, dhl_part,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            hq, hkv, lq, lk, d, *_split_scales(scale), num_kv_blocks,
            BLOCK_D=block_d, **common, **config.launch_args(),
        )  # fmt: skip
        return parts, dhl_part

    parts, dhl_part = launch_dkdv(choose("bwd_dkdv", block_d, q, key, launch_dkdv, interpreter=interpreted))
    dk_mul, dk_add, dv_mul, dv_add = (p.sum(dim=2).to(q.dtype) for p in parts)
    dhead_logit = dhl_part.sum(dim=(0, 2)).to(head_logit.dtype)
    return dq, dk, dv, dk_mul, dk_add, dv_mul, dv_add, dhead_logit
