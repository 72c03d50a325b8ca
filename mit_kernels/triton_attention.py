"""Triton kernels for MiT attention: an infusion pre-pass, then flash-attention-2 forward and backward.

The infusion, per key token t of KV head h (all in fp32, fp64 for fp64 inputs)::

    c_t  = <v_t, a> / (max(|v_t|, eps) * max(|a|, eps))        a = v_add, eps = 1e-8
    g_t  = sigmoid(lambda_h + c_t)                              (1 when RESCALE is off)
    K'_t = k_t + g_t * (k_t * k_mul + k_add)
    V'_t = v_t + g_t * (v_t * v_mul + v_add)

Passes (one program per tile; every grid is one-dimensional, so no axis meets CUDA's 65,535 limit):

- ``_infuse_kv_kernel`` writes K' and V' once per call, in the inputs' dtype (exactly the values a tile-load fusion
  would feed ``tl.dot``). The attention kernels then read K', V' like plain flash attention reads K, V: their inner
  loops hold no infusion, so they compile to the same registers, shared memory and tensor-core instructions as a plain
  flash-attention kernel of the same tile (``python -m mit_kernels compile-check`` measures both side by side).
  Cost: one read of K, V and one write of K', V' (O(B Hkv Lk D)), against the O(B Hq Lq Lk D) attention work.
- A generation step (Lq = 1, GQA group up to ``DECODE_SPLIT_MAX_GROUP``) is split over the keys, flash-decoding
  style: ``_attn_decode_split_kernel`` runs one program per (b, KV head, split of the cache), with the group's query
  heads as the rows of one tile, so each cached key is read and infused once per step (not once per query head), and
  about two programs per multiprocessor keep the memory system busy at batch 1; each program writes its split's
  softmax partials (m_s, l_s, acc_s, base 2), and ``_attn_decode_combine_kernel`` reduces them per query row::

      m = max_s m_s      l = sum_s 2^(m_s - m) l_s      O = sum_s 2^(m_s - m) acc_s / l      lse2 = m + log2(l)

  and marks the rows that came out non-finite for the exact variant below (one program per query head). With a
  padding mask a program first reads its split's mask alone and loads K / V only from the block of the first key it
  keeps to that of the last: a static cache's empty slots and left padding cost a read of the mask (compiled: the same
  registers, no spill, the same shared memory as without that pass; not yet timed on a GPU).
  On an H200 its kernels take 4-69x less time than one program per query head (the path below, 32 programs for a
  whole cache at batch 1; benchmarks/results/gpu_check_NVIDIA_H200_decode.csv).
- Other decode shapes (Lq <= ``DECODE_ROWS``) are memory-bound too: there the forward infuses each K/V tile as it is
  loaded (``INFUSE=True``) instead, so the cache is read once per step and nothing is written. On 16-row tiles (mma.sync
  targets: sm_80, sm_86, sm_89) the infusion is distributed over the products (``SPLIT``)::

      q . K'_t = q . k_t + g_t ((q * k_mul) . k_t + q . k_add)
      sum_t p_t V'_t = sum_t p_t v_t + (sum_t p_t g_t v_t) * v_mul + (sum_t p_t g_t) v_add

  so the raw tiles feed the tensor cores from the load pipeline and no infused copy is staged in shared memory (K' is
  then not rounded to the input dtype before its product: a little more exact than the pre-pass); on 64-row tiles
  (wgmma, sm_90 / sm_100) the tile is infused in registers, whose extra accumulator would not fit there.
- Forward: softmax runs online in base 2, ``s = (q . K'_t) * scale * log2(e)``; it saves ``lse2 = m + log2(l)`` per
  query row (+inf for a row that sees no key, so the backward's ``p = exp2(s - lse2)`` is 0 there; NaN for a row whose
  visible scores are all -inf).
- Backward, given dO, with ``delta_i = sum_d O_id dO_id``::

      p_it  = exp2(s_it - lse2_i)
      dV'_t = sum_i p_it dO_i                     dP_it = dO_i . V'_t
      dS_it = p_it (dP_it - delta_i)
      dK'_t = scale * sum_i dS_it q_i             dq_i  = scale * sum_t dS_it K'_t

  (``_attn_bwd_dq_kernel``: one program per query block; ``_attn_bwd_dkdv_kernel``: one program per key block, looping
  over the group's query heads; dK', dV' are written in fp32), then ``_infusion_bwd_kernel`` takes them through the
  infusion, per key token t::

      dk_t     = dK'_t * (1 + g_t k_mul)                 dv_t (direct) = dV'_t * (1 + g_t v_mul)
      dk_mul   = sum_t g_t dK'_t * k_t                   dv_mul  = sum_t g_t dV'_t * v_t
      dk_add   = sum_t g_t dK'_t                         dv_add (direct) = sum_t g_t dV'_t
      dg_t     = <dK'_t, k_t * k_mul + k_add> + <dV'_t, v_t * v_mul + v_add>
      dz_t     = dg_t g_t (1 - g_t)                      dlambda_h = sum_{b,t} dz_t
      dv_t    += dz_t (a / (n_v n_a) - c_t v_t / (|v_t| n_v))
      dv_add  += sum_t dz_t (v_t / (n_v n_a) - c_t a / (|a| n_a))

  where ``n_x = max(|x|, eps)``: exactly the gradient torch's cosine_similarity gives (its clamp passes gradient),
  with ``x / |x|`` read as 0 for x = 0.

NaN / Inf (docs/semantics.md: a key a row does not see never influences it). Each attention pass runs twice, as two
compiled variants of one kernel: the fast variant (``EXACT=False``) does plain flash-attention arithmetic and marks, per
output row, whether the row came out non-finite; the exact variant (``EXACT=True``) runs over the same grid, and a
program with no marked row does no work (its loop is empty, its stores are masked off). With finite inputs a hidden
pair (probability 0) contributes exactly 0 and the rows stay finite, so the fast result is the exact one; a hidden pair
that meets a NaN / Inf (``0 * NaN``) always leaves a NaN in its row, which is then recomputed by the exact variant:
masked maxima that propagate NaN, and every product over (query, key) pairs through :func:`_visible_dot`, which takes
non-finite entries out of ``tl.dot`` and adds them back over the visible pairs only. "The row sees a key" comes from
the masks (the first attendable key, tracked per tile), never from the softmax statistics. Finite inputs pay one
extra launch of empty programs per pass and a per-row finiteness test.

Precision: elementwise work in fp32 (fp64 for fp64 inputs); the gate's square roots and divisions are IEEE-rounded
(``sqrt_rn`` / ``div_rn``), as is the final ``acc / l``. fp16 / bf16 dots take their operands in the input dtype
(tensor cores, fp32 accumulation). fp32 dots use ``tf32x3`` on GPUs (three TF32 tensor-core products: about fp32
accuracy at tensor-core speed; plain ``ieee`` fp32 never reaches the tensor cores and spills). The softmax's exp2 is
the hardware's approximate ``ex2``, as in every flash-attention kernel. The interpreter ignores the dot precision and
computes bf16 arithmetic wrongly, so there every tile is cast to fp32 after loading.

Determinism: no atomics. The per-(b, h) vector gradients are written as per-key-block partial sums and reduced with
``torch.sum``, so results are bitwise reproducible run to run.

GQA: query head ``j`` reads KV head ``j // group``; nothing is repeated in memory.

Offsets: every element offset is 64-bit (program ids and row indices are widened before they meet a stride), so
``b * stride_b``, ``h * stride_h`` and ``row * stride_row`` never overflow, causal or not
(tests/kernels/test_triton_offsets.py runs a view whose offsets pass 2^31 elements).

Compilation: lengths and counts are not specialised (``do_not_specialize``), so Lq = 1, a length divisible by 16 and
any other length share one binary per (dtype, head-dim bucket, flags, tile); strides keep Triton's divisibility
specialisation, which gives the vectorised loads (with a head dim that is a multiple of 16 every stride of a
contiguous tensor is, whatever the length).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import accumulator_dtype
from .triton_common import Launch, interpreter_active, tl_accumulator, tl_dtype
from .triton_configs import (
    DECODE_ROWS,
    DECODE_SPLIT_MAX_GROUP,
    INTERPRETER,
    TileConfig,
    choose,
    decode_splits,
    decode_tile,
    elementwise_rows,
    exact_config,
    multiprocessor_count,
)

LOG2E = 1.4426950408889634
COSINE_EPS: tl.constexpr = tl.constexpr(1e-8)  # jit functions may only read constexpr globals

# Integer arguments that must not be specialised on their value (== 1, % 16): lengths and counts.
_LENGTHS = ["Hq", "Hkv", "Lq", "Lk", "NUM_M_BLOCKS", "NUM_N_BLOCKS"]


# --------------------------------------------------------------------------------------------------------------------
# Shared device functions
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root (``sqrt_rn`` is fp32 only; fp64 ``sqrt`` is already correctly rounded)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    """IEEE-rounded division (``div_rn`` is fp32 only; fp64 division is already correctly rounded)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _load_vectors(KM, KA, VM, VA, vec_off, offs_d, D, ACC: tl.constexpr):
    """Load the four (D,) infusion vectors of one (b, h) and return them with ``|v_add|`` and ``max(|v_add|, eps)``."""
    mask_d = offs_d < D
    k_mul = tl.load(KM + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    k_add = tl.load(KA + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    v_mul = tl.load(VM + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    v_add = tl.load(VA + vec_off + offs_d, mask=mask_d, other=0.0).to(ACC)
    norm_a = _sqrt(tl.sum(v_add * v_add, axis=0))
    return k_mul, k_add, v_mul, v_add, norm_a, tl.maximum(norm_a, COSINE_EPS)


@triton.jit
def _load_tile(ptr, offs_n, offs_d, stride_n, L, D, ACC: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_D) tile of rows ``offs_n`` (zero outside [0, L) x [0, D)) and cast it to ACC. Row
    offsets are 64-bit."""
    mask = (offs_n[:, None] < L) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_tile(ptr, x, offs_n, offs_d, stride_n, L, D, extra_mask):
    """Store a (BLOCK_N, BLOCK_D) tile at rows ``offs_n`` (64-bit offsets), inside [0, L) x [0, D) and where
    ``extra_mask`` (BLOCK_N,) holds, converting to the pointer's dtype."""
    mask = (offs_n[:, None] < L) & (offs_d[None, :] < D) & extra_mask[:, None]
    tl.store(ptr + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate(v, v_add, clamped_norm_a, head_logit, RESCALE: tl.constexpr):
    """Per-token gate g (BLOCK_N,), cosine c, ``|v_t|`` and ``max(|v_t|, eps)`` from a value tile v (BLOCK_N, BLOCK_D).
    Square root and division are IEEE-rounded (no flush of tiny norms, roundoff agreement with torch)."""
    norm_v = _sqrt(tl.sum(v * v, axis=1))
    clamped_norm_v = tl.maximum(norm_v, COSINE_EPS)
    cos = _div(tl.sum(v * v_add[None, :], axis=1), clamped_norm_v * clamped_norm_a)
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
def _nonfinite_rows(x):
    """(ROWS,) bool: the row of x (ROWS, COLS) holds a NaN or an Inf."""
    return tl.max((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=1) > 0


@triton.jit
def _visible_dot(acc, a, b, allowed, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` over the allowed pairs only (the exact variants' product): ``acc_id + sum_j a_ij b_jd`` for
    ``allowed[i, j]``, where ``a`` is 0 at every pair that is not allowed and ``b`` may hold NaN / Inf. A plain
    ``tl.dot`` would turn a hidden pair into ``0 * NaN = NaN``; here the non-finite entries of ``b`` are taken out of
    the product and added back over the allowed pairs with IEEE semantics (``a_ij * Inf`` is ±Inf, or NaN for
    ``a_ij = 0``), by indicator products."""
    finite = tl.abs(b) < float("inf")  # False for NaN and ±Inf
    acc += tl.dot(a.to(DOT), tl.where(finite, b, 0.0).to(DOT), input_precision=PRECISION, out_dtype=ACC)
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
    return tl.where(nan_hits > 0.0, float("nan"), acc)


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
    ok = (offs_m[:, None] < Lq) & kv_keep[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return ok


@triton.jit
def _allowed_t(offs_n, offs_m, kv_keep, Lq, Lk, CAUSAL: tl.constexpr):
    """(BLOCK_N, BLOCK_M): :func:`_allowed` transposed (keys along rows), for the dK'/dV' pass."""
    ok = kv_keep[:, None] & (offs_m[None, :] < Lq)
    if CAUSAL:
        ok = ok & (offs_n[:, None] <= offs_m[None, :] + (Lk - Lq))
    return ok


@triton.jit
def _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK: tl.constexpr):
    """(BLOCK_N,) bool: the key may be attended (inside [0, Lk) and, with a padding mask, marked True there)."""
    keep = offs_n < Lk
    if HAS_KV_MASK:
        keep = keep & (tl.load(KVM + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
    return keep


@triton.jit
def _first_kept(first, keep, offs_n, Lk):
    """The smallest attendable key index seen so far: ``min(first, min{n in offs_n : keep[n]})`` (Lk when none)."""
    return tl.minimum(first, tl.min(tl.where(keep, offs_n, Lk), axis=0))


@triton.jit
def _row_sees_a_key(offs_m, first, Lq, Lk, CAUSAL: tl.constexpr):
    """(BLOCK_M,) bool: query row i sees at least one key, given the first attendable key ``first`` (a property of the
    masks alone: never read from the softmax statistics, which NaN / Inf can corrupt)."""
    seen = (offs_m < Lq) & (first < Lk)
    if CAUSAL:
        seen = seen & (first <= offs_m + (Lk - Lq))
    return seen


@triton.jit
def _any_marked(MARK, row_base, offs, L):
    """The exact variants' switch: True when any row ``offs`` of this program was marked non-finite by the fast
    variant."""
    return tl.max(tl.load(MARK + row_base + offs, mask=offs < L, other=0).to(tl.int32), axis=0) > 0


# --------------------------------------------------------------------------------------------------------------------
# Infusion pre-pass
# --------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_LENGTHS)
def _infuse_kv_kernel(
    K, V, KM, KA, VM, VA, HL, KI, VI,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    Hkv, Lk, D, NUM_N_BLOCKS,
    RESCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """K', V' of one block of keys of one (b, h), written contiguous (B, Hkv, Lk, D) in the inputs' dtype."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_N_BLOCKS).to(tl.int64)
    offs_n = (pid % NUM_N_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    k_mul, k_add, v_mul, v_add, _norm_a, clamped_norm_a = _load_vectors(KM, KA, VM, VA, pid_bh * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    k = _load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, Lk, D, ACC)
    v = _load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, Lk, D, ACC)
    gate = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)[0]
    every = offs_n >= 0
    _store_tile(KI + pid_bh * Lk * D, _infuse(k, k_mul, k_add, gate), offs_n, offs_d, D, Lk, D, every)
    _store_tile(VI + pid_bh * Lk * D, _infuse(v, v_mul, v_add, gate), offs_n, offs_d, D, Lk, D, every)


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_LENGTHS)
def _attn_fwd_kernel(
    Q, K, V, KM, KA, VM, VA, HL, KVM, O, LSE, MARK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    Hq, Hkv, Lq, Lk, D, NUM_M_BLOCKS, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, RESCALE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    INFUSE: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """O and lse2 of one block of query rows of one query head. K, V are K', V' (the pre-pass's output) unless INFUSE,
    in which case they are the raw keys and values (decode), infused tile by tile, or with SPLIT (fast variant, 16-row
    tiles) distributed over the products. MARK (B*Hq*Lq int8): written by the fast variant (1 = the row came out
    non-finite), read by the exact one."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_M_BLOCKS).to(tl.int64)
    pid_m = NUM_M_BLOCKS - 1 - pid % NUM_M_BLOCKS  # the longest causal rows start first
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    hi = Lk
    if CAUSAL:  # the last query of this block sees keys j <= (pid_m + 1) * BLOCK_M - 1 + Lk - Lq
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    todo = offs_m >= 0
    if EXACT:  # only a program with a marked row does any work
        run = _any_marked(MARK, pid_bh * Lq, offs_m, Lq)
        todo = todo & run
        hi = tl.where(run, hi, 0)
    q_acc = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qm, Lq, D, ACC)
    q = q_acc.to(DOT)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if INFUSE:
        k_mul, k_add, v_mul, v_add, _norm_a, clamped_norm_a = _load_vectors(
            KM, KA, VM, VA, (b * Hkv + h) * D, offs_d, D, ACC
        )
        head_logit = tl.load(HL + h).to(ACC)
    scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)[1]

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if SPLIT:
        # Decode on 16-row tiles (mma.sync targets): the infusion distributed over the products, so raw K / V tiles
        # feed the tensor cores straight from the load pipeline (no infused copy is staged in shared memory):
        #   q . K'_t = q . k_t + g_t ((q * k_mul) . k_t + q . k_add)
        #   sum_t p_t V'_t = sum_t p_t v_t + (sum_t p_t g_t v_t) * v_mul + (sum_t p_t g_t) v_add
        q_kmul = (q_acc * k_mul[None, :]).to(DOT)
        q_kadd = tl.sum(q_acc * k_add[None, :], axis=1)
        acc_g = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        l_g = tl.zeros([BLOCK_M], ACC)
    first = Lk * 0  # the first attendable key (int32, like the loop's offsets); without a padding mask, key 0
    if HAS_KV_MASK:
        first = Lk + 0
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)
        if SPLIT:
            k = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, DOT)
            v = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, DOT)
            gate = _gate(v.to(ACC), v_add, clamped_norm_a, head_logit, RESCALE)[0]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
            s_mul = tl.dot(q_kmul, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
            s = (s + gate[None, :] * (s_mul + q_kadd[:, None])) * scale_log2
        else:
            if INFUSE:  # exact decode: K', V' rounded to the inputs' dtype, as the pre-pass stores them
                v_raw = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, ACC)
                gate = _gate(v_raw, v_add, clamped_norm_a, head_logit, RESCALE)[0]
                k_raw = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC)
                k = _infuse(k_raw, k_mul, k_add, gate).to(K.dtype.element_ty).to(DOT)
                v = _infuse(v_raw, v_mul, v_add, gate).to(V.dtype.element_ty).to(DOT)
            else:
                k = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, DOT)
                v = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, DOT)
            if EXACT:  # a padded key's V' row is zeroed: its p = 0 would otherwise meet a NaN / Inf there
                v = tl.where(keep[:, None], v, 0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale_log2

        allowed = _allowed(offs_m, offs_n, keep, Lq, Lk, CAUSAL)
        s = tl.where(allowed, s, float("-inf"))
        if HAS_KV_MASK:
            first = _first_kept(first, keep, offs_n, Lk)
        if EXACT:  # NaN-propagating maxima: a NaN score makes its row NaN, as in the reference's softmax
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_nan), propagate_nan=tl.PropagateNan.ALL)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, never NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EXACT:
            acc = _visible_dot(acc * alpha[:, None], tl.where(allowed, p, 0.0), v, allowed, ACC, DOT, PRECISION)
        else:
            acc = tl.dot(p.to(DOT), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            if SPLIT:
                p_gate = p * gate[None, :]
                acc_g = tl.dot(p_gate.to(DOT), v, acc_g * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
                l_g = l_g * alpha + tl.sum(p_gate, axis=1)
        m_i = m_new
    if SPLIT:
        acc = acc + acc_g * v_mul[None, :] + l_g[:, None] * v_add[None, :]

    # A row that sees no key gives 0 (lse2 = +inf); one that sees keys keeps what its statistics give: NaN for NaN
    # scores or values, and NaN when all its visible scores are -inf (l = 0).
    seen = _row_sees_a_key(offs_m, first, Lq, Lk, CAUSAL)
    no_mass = l_i == 0.0
    l_safe = tl.where(no_mass, 1.0, l_i)
    out = tl.where(seen[:, None], tl.where(no_mass[:, None], float("nan"), _div(acc, l_safe[:, None])), 0.0)
    lse2 = tl.where(seen, tl.where(no_mass, float("nan"), m_i + tl.math.log2(l_safe)), float("inf"))
    _store_tile(O + b * stride_ob + hq * stride_oh, out, offs_m, offs_d, stride_om, Lq, D, todo)
    tl.store(LSE + pid_bh * Lq + offs_m, lse2.to(LSE.dtype.element_ty), mask=(offs_m < Lq) & todo)
    if not EXACT:
        marked = _nonfinite_rows(out) | (seen & ~(tl.abs(lse2) < float("inf")))
        tl.store(MARK + pid_bh * Lq + offs_m, marked.to(tl.int8), mask=offs_m < Lq)


# --------------------------------------------------------------------------------------------------------------------
# Decode step (one query row): split over the keys, all query heads of a KV head in one program
# --------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["Hkv", "Lk", "NUM_SPLITS", "SPLIT_LEN"])
def _attn_decode_split_kernel(
    Q, K, V, KM, KA, VM, VA, HL, KVM, M_PART, L_PART, SEEN_PART, ACC_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    Hkv, Lk, D, NUM_SPLITS, SPLIT_LEN, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, RESCALE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial softmax statistics of keys [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) for the GROUP query heads of one
    KV head (rows of the tile; Lq = 1, so every key is causally visible)::

        s_t = (q . K'_t) scale log2(e)
        m_s = max_t s_t      l_s = sum_t 2^(s_t - m_s)      acc_s = sum_t 2^(s_t - m_s) V'_t

    K', V' are infused tile by tile as they are loaded (rounded to the inputs' dtype, as the pre-pass stores them), so
    each key of the cache is read and infused once per step for the whole group. SEEN_PART: the split holds a key the
    padding mask keeps (a property of the mask alone)."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_SPLITS).to(tl.int64)
    split = pid % NUM_SPLITS
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    hq = (h * GROUP + rows).to(tl.int64)
    q_ptrs = Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(rows[:, None] < GROUP) & (offs_d[None, :] < D), other=0.0).to(ACC).to(DOT)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k_mul, k_add, v_mul, v_add, _norm_a, clamped_norm_a = _load_vectors(KM, KA, VM, VA, pid_bh * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)[1]

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    seen = Lk * 0  # int32: 1 once a kept key was met
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, Lk)
    start, end = lo, hi
    if HAS_KV_MASK:
        # Only the blocks from the first to the last key the padding mask keeps are loaded (a static cache's empty
        # slots, left padding): the others' keys would get p = 0, and a key nobody sees has no influence
        # (docs/semantics.md), NaN / Inf included. A pass over the mask alone finds them; the loop below keeps its
        # plain, pipelined body.
        first = hi
        last = lo - 1
        for start_m in range(lo, hi, BLOCK_N):
            offs_m = start_m + tl.arange(0, BLOCK_N)
            kept = _key_keep(KVM, b, offs_m, Lk, HAS_KV_MASK) & (offs_m < hi)
            first = _first_kept(first, kept, offs_m, hi)  # (hi when none)
            last = tl.maximum(last, tl.max(tl.where(kept, offs_m, lo - 1), axis=0))
        start = lo + (first - lo) // BLOCK_N * BLOCK_N  # (first = hi when none: no block)
        end = tl.maximum(last + 1, start)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK) & (offs_n < hi)
        v_raw = _load_tile(v_base, offs_n, offs_d, stride_vn, Lk, D, ACC)
        gate = _gate(v_raw, v_add, clamped_norm_a, head_logit, RESCALE)[0]
        v = _infuse(v_raw, v_mul, v_add, gate).to(V.dtype.element_ty).to(DOT)  # fp32 V dies before K is loaded
        k_raw = _load_tile(k_base, offs_n, offs_d, stride_kn, Lk, D, ACC)
        k = _infuse(k_raw, k_mul, k_add, gate).to(K.dtype.element_ty).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale_log2
        s = tl.where(keep[None, :], s, float("-inf"))
        seen = tl.maximum(seen, tl.max(keep.to(tl.int32), axis=0))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2 gives 0, never NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(DOT), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    part = (
        pid_bh * GROUP + rows
    ) * NUM_SPLITS + split  # rows of (B * Hq, NUM_SPLITS): b * Hq + hq = pid_bh * GROUP + r
    row_ok = rows < GROUP
    tl.store(M_PART + part, m_i, mask=row_ok)
    tl.store(L_PART + part, l_i, mask=row_ok)
    tl.store(SEEN_PART + part, (rows * 0 + seen).to(tl.int8), mask=row_ok)
    _store_tile(ACC_PART, acc, part, offs_d, D, (pid_bh + 1) * GROUP * NUM_SPLITS, D, row_ok)  # (B Hq NUM_SPLITS, D)


@triton.jit(do_not_specialize=["Hq", "NUM_SPLITS"])
def _attn_decode_combine_kernel(
    M_PART, L_PART, SEEN_PART, ACC_PART, O, LSE, MARK,
    stride_ob, stride_oh,
    Hq, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """O and lse2 of one query row from the splits' partials (flash-decoding's reduction)::

        m = max_s m_s      l = sum_s 2^(m_s - m) l_s      O = sum_s 2^(m_s - m) acc_s / l      lse2 = m + log2(l)

    A row whose splits saw no kept key gives 0 (lse2 = +inf); MARK = 1 where the row came out non-finite (the exact
    decode variant then recomputes it)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // Hq
    hq = row % Hq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = row * NUM_SPLITS
    m = tl.full([BLOCK_S], float("-inf"), ACC)
    seen = tl.zeros([BLOCK_S], tl.int32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        ok = s0 + offs_s < NUM_SPLITS
        m = tl.maximum(m, tl.load(M_PART + base + s0 + offs_s, mask=ok, other=float("-inf")))
        seen = tl.maximum(seen, tl.load(SEEN_PART + base + s0 + offs_s, mask=ok, other=0).to(tl.int32))
    m_row = tl.max(m, axis=0)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_vec = tl.zeros([BLOCK_S], ACC)
    acc = tl.zeros([BLOCK_S, BLOCK_D], ACC)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        ok = s0 + offs_s < NUM_SPLITS
        m_s = tl.load(M_PART + base + s0 + offs_s, mask=ok, other=float("-inf"))
        w = tl.math.exp2(m_s - m_safe)
        l_vec += w * tl.load(L_PART + base + s0 + offs_s, mask=ok, other=0.0)
        acc += w[:, None] * _load_tile(ACC_PART + base * D, s0 + offs_s, offs_d, D, NUM_SPLITS, D, ACC)
    l_row = tl.sum(l_vec, axis=0)
    out = tl.sum(acc, axis=0)
    seen_row = tl.max(seen, axis=0) > 0
    no_mass = l_row == 0.0
    l_safe = tl.where(no_mass, 1.0, l_row)
    out = tl.where(seen_row, tl.where(no_mass, float("nan"), _div(out, l_safe)), 0.0)
    lse2 = tl.where(seen_row, tl.where(no_mass, float("nan"), m_row + tl.math.log2(l_safe)), float("inf"))
    tl.store(O + b * stride_ob + hq * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + row, lse2.to(LSE.dtype.element_ty))
    bad = tl.max((~(tl.abs(out) < float("inf"))).to(tl.int32), axis=0) > 0
    tl.store(MARK + row, (bad | (seen_row & ~(tl.abs(lse2) < float("inf")))).to(tl.int8))


# --------------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_LENGTHS)
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    Hq, Lq, D, NUM_M_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d O_id * dO_id, per query row (fp32; fp64 for fp64 inputs)."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_M_BLOCKS).to(tl.int64)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    offs_m = (pid % NUM_M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + hq * stride_oh, offs_m, offs_d, stride_om, Lq, D, ACC)
    do = _load_tile(DO + b * stride_dob + hq * stride_doh, offs_m, offs_d, stride_dom, Lq, D, ACC)
    tl.store(DELTA + pid_bh * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@triton.jit(do_not_specialize=_LENGTHS)
def _attn_bwd_dq_kernel(
    Q, K, V, KVM, DO, LSE, DELTA, DQ, MARK,
    stride_qb, stride_qh, stride_qm,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    Hq, Hkv, Lq, Lk, D, NUM_M_BLOCKS, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq_i = scale * sum_t dS_it K'_t for one block of queries of one query head; K, V are K', V' (contiguous)."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_M_BLOCKS).to(tl.int64)
    pid_m = NUM_M_BLOCKS - 1 - pid % NUM_M_BLOCKS
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    todo = offs_m >= 0
    if EXACT:
        run = _any_marked(MARK, pid_bh * Lq, offs_m, Lq)
        todo = todo & run
        hi = tl.where(run, hi, 0)
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qm, Lq, D, ACC).to(DOT)
    do = _load_tile(DO + b * stride_dob + hq * stride_doh, offs_m, offs_d, stride_dom, Lq, D, ACC).to(DOT)
    lse2 = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf")).to(ACC)
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0).to(ACC)
    k_base = K + (b * Hkv + h) * Lk * D
    v_base = V + (b * Hkv + h) * Lk * D
    scale, scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)
        k = _load_tile(k_base, offs_n, offs_d, D, Lk, D, DOT)
        v = _load_tile(v_base, offs_n, offs_d, D, Lk, D, DOT)
        if EXACT:  # a padded key's K' row is zeroed: dS = 0 there, and 0 * NaN in dS K' would reach dq
            k = tl.where(keep[:, None], k, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale_log2
        allowed = _allowed(offs_m, offs_n, keep, Lq, Lk, CAUSAL)
        p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        if EXACT:
            ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
            dq = _visible_dot(dq, ds, k, allowed, ACC, DOT, PRECISION)
        else:
            dq = tl.dot((p * (dp - delta[:, None])).to(DOT), k, dq, input_precision=PRECISION, out_dtype=ACC)

    dq = dq * scale
    _store_tile(DQ + b * stride_dqb + hq * stride_dqh, dq, offs_m, offs_d, stride_dqm, Lq, D, todo)
    if not EXACT:
        tl.store(MARK + pid_bh * Lq + offs_m, _nonfinite_rows(dq).to(tl.int8), mask=offs_m < Lq)


@triton.jit(do_not_specialize=_LENGTHS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, KVM, DO, LSE, DELTA, DKI, DVI, MARK,
    stride_qb, stride_qh, stride_qm,
    stride_dob, stride_doh, stride_dom,
    Hq, Hkv, Lq, Lk, D, NUM_N_BLOCKS, scale_hi, scale_lo, scale_log2_hi, scale_log2_lo,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK', dV' (fp32, contiguous) of one block of keys of one KV head, summed over the group's query heads. Computed
    transposed (keys along rows): ``s^T = K' q^T``, so no computed tile is transposed."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_N_BLOCKS).to(tl.int64)
    pid_n = pid % NUM_N_BLOCKS
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keep = _key_keep(KVM, b, offs_n, Lk, HAS_KV_MASK)
    k = _load_tile(K + pid_bh * Lk * D, offs_n, offs_d, D, Lk, D, DOT)
    v = _load_tile(V + pid_bh * Lk * D, offs_n, offs_d, D, Lk, D, DOT)
    scale, scale_log2 = _scales(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo, ACC)

    lo = 0
    if CAUSAL:  # query i sees key j iff i >= j - (Lk - Lq): skip query blocks entirely before that
        lo = tl.maximum(0, pid_n * BLOCK_N - (Lk - Lq))
        lo = (lo // BLOCK_M) * BLOCK_M
    todo = offs_n >= 0
    hi = Lq
    if EXACT:
        run = _any_marked(MARK, pid_bh * Lk, offs_n, Lk)
        todo = todo & run
        hi = tl.where(run, hi, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for g in range(GROUP):
        hq = h * GROUP + g
        q_base = Q + b * stride_qb + hq * stride_qh
        do_base = DO + b * stride_dob + hq * stride_doh
        row_base = (b * Hq + hq) * Lq
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, offs_m, offs_d, stride_qm, Lq, D, DOT)
            do = _load_tile(do_base, offs_m, offs_d, stride_dom, Lq, D, DOT)
            lse2 = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=float("inf")).to(ACC)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Lq, other=0.0).to(ACC)

            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC) * scale_log2
            allowed_t = _allowed_t(offs_n, offs_m, keep, Lq, Lk, CAUSAL)
            p_t = tl.where(allowed_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
            if EXACT:
                dv = _visible_dot(dv, p_t, do, allowed_t, ACC, DOT, PRECISION)
                ds_t = tl.where(allowed_t, p_t * (dp_t - delta[None, :]), 0.0)
                dk = _visible_dot(dk, ds_t, q, allowed_t, ACC, DOT, PRECISION)
            else:
                dv = tl.dot(p_t.to(DOT), do, dv, input_precision=PRECISION, out_dtype=ACC)
                dk = tl.dot((p_t * (dp_t - delta[None, :])).to(DOT), q, dk, input_precision=PRECISION, out_dtype=ACC)
    # A padded key gets exactly zero dK', dV' (0 * NaN in dS^T Q would put a NaN query row there).
    dk = tl.where(keep[:, None], dk * scale, 0.0)
    dv = tl.where(keep[:, None], dv, 0.0)
    _store_tile(DKI + pid_bh * Lk * D, dk, offs_n, offs_d, D, Lk, D, todo)
    _store_tile(DVI + pid_bh * Lk * D, dv, offs_n, offs_d, D, Lk, D, todo)
    if not EXACT:
        marked = _nonfinite_rows(dk) | _nonfinite_rows(dv)
        tl.store(MARK + pid_bh * Lk + offs_n, marked.to(tl.int8), mask=offs_n < Lk)


@triton.jit(do_not_specialize=_LENGTHS)
def _infusion_bwd_kernel(
    K, V, KM, KA, VM, VA, HL, DKI, DVI,
    DK, DV, DKM_PART, DKA_PART, DVM_PART, DVA_PART, DHL_PART,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    Hkv, Lk, D, NUM_N_BLOCKS,
    RESCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One block of keys of one (b, h): dK', dV' through the infusion to dk, dv, and this block's partial sums of
    dk_mul, dk_add, dv_mul, dv_add and dlambda (module docstring)."""
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_N_BLOCKS).to(tl.int64)
    pid_n = pid % NUM_N_BLOCKS
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    k_mul, k_add, v_mul, v_add, norm_a, clamped_norm_a = _load_vectors(KM, KA, VM, VA, pid_bh * D, offs_d, D, ACC)
    head_logit = tl.load(HL + h).to(ACC)
    k = _load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, Lk, D, ACC)
    v = _load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, Lk, D, ACC)
    dk_inf = _load_tile(DKI + pid_bh * Lk * D, offs_n, offs_d, D, Lk, D, ACC)
    dv_inf = _load_tile(DVI + pid_bh * Lk * D, offs_n, offs_d, D, Lk, D, ACC)
    gate, cos, norm_v, clamped_norm_v = _gate(v, v_add, clamped_norm_a, head_logit, RESCALE)

    dk = dk_inf * (1.0 + gate[:, None] * k_mul[None, :])
    dv = dv_inf * (1.0 + gate[:, None] * v_mul[None, :])
    part = pid_bh * NUM_N_BLOCKS + pid_n
    tl.store(DKM_PART + part * D + offs_d, tl.sum(gate[:, None] * dk_inf * k, axis=0), mask=mask_d)
    tl.store(DKA_PART + part * D + offs_d, tl.sum(gate[:, None] * dk_inf, axis=0), mask=mask_d)
    tl.store(DVM_PART + part * D + offs_d, tl.sum(gate[:, None] * dv_inf * v, axis=0), mask=mask_d)
    dv_add = tl.sum(gate[:, None] * dv_inf, axis=0)
    if RESCALE:
        dgate = tl.sum(
            dk_inf * (k * k_mul[None, :] + k_add[None, :]) + dv_inf * (v * v_mul[None, :] + v_add[None, :]), axis=1
        )
        dz = dgate * gate * (1.0 - gate)  # d loss / d(lambda + c_t)
        tl.store(DHL_PART + part, tl.sum(dz, axis=0))
        # d c / d v_t = a / (n_v n_a) - c v_t / (|v_t| n_v);  d c / d a = v_t / (n_v n_a) - c a / (|a| n_a)
        inv_norm_v = tl.where(norm_v > 0.0, _div(norm_v * 0.0 + 1.0, tl.where(norm_v > 0.0, norm_v, 1.0)), 0.0)
        inv_norm_a = tl.where(norm_a > 0.0, _div(norm_a * 0.0 + 1.0, tl.where(norm_a > 0.0, norm_a, 1.0)), 0.0)
        w = _div(dz, clamped_norm_v * clamped_norm_a)
        dv += w[:, None] * v_add[None, :] - _div(dz * cos * inv_norm_v, clamped_norm_v)[:, None] * v
        dv_add += tl.sum(w[:, None] * v, axis=0) - _div(tl.sum(dz * cos, axis=0) * inv_norm_a, clamped_norm_a) * v_add
    tl.store(DVA_PART + part * D + offs_d, dv_add, mask=mask_d)
    every = offs_n >= 0
    _store_tile(DK + b * stride_dkb + h * stride_dkh, dk, offs_n, offs_d, stride_dkn, Lk, D, every)
    _store_tile(DV + b * stride_dvb + h * stride_dvh, dv, offs_n, offs_d, stride_dvn, Lk, D, every)


# --------------------------------------------------------------------------------------------------------------------
# Launch plans: every kernel launch of a call, built without launching (the compile check compiles exactly these)
# --------------------------------------------------------------------------------------------------------------------


def dot_settings(dtype: torch.dtype) -> dict:
    """Accumulator dtype, tl.dot operand dtype and precision for inputs of ``dtype`` (module docstring: Precision)."""
    acc = tl_accumulator(dtype)
    interpreted = interpreter_active()
    dot = tl_dtype(dtype) if dtype in (torch.float16, torch.bfloat16) and not interpreted else acc
    precision = "tf32x3" if dtype == torch.float32 and not interpreted else "ieee"
    return {"ACC": acc, "DOT": dot, "PRECISION": precision}


def block_d_of(d: int) -> int:
    """The head-dim bucket: D rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


@functools.lru_cache(maxsize=64)
def _split_scales(scale: float) -> tuple[float, float, float, float]:
    """(scale_hi, scale_lo, scale_log2_hi, scale_log2_lo): fp32 halves whose sum is the fp64 value to ~1e-14."""
    out = []
    for x in (scale, scale * LOG2E):
        hi = float(torch.tensor(x, dtype=torch.float32))
        out += [hi, x - hi]
    return tuple(out)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class _Inputs:
    """The inputs of one call, normalised (last dim contiguous, vectors contiguous), with the shared launch values."""

    def __init__(self, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale):
        self.q, self.k, self.v = (_last_dim_contiguous(x) for x in (q, k, v))
        self.vectors = tuple(x.contiguous() for x in (k_mul, k_add, v_mul, v_add))
        self.head_logit = head_logit.contiguous()
        self.batch, self.hq, self.lq, self.d = q.shape
        self.hkv, self.lk = k.shape[1], k.shape[2]
        self.group = self.hq // self.hkv
        self.block_d = block_d_of(self.d)
        self.causal, self.rescale, self.scale = bool(causal), bool(rescale), float(scale)
        self.has_kv_mask = kv_mask is not None
        self.kvm = kv_mask.contiguous().view(torch.uint8) if kv_mask is not None else self.q
        self.dots = dot_settings(q.dtype)
        self.interpreted = interpreter_active()
        self.tune_key = (q.dtype, self.group, self.causal, self.rescale, self.has_kv_mask)

    def infuse_launch(self) -> tuple[Launch, torch.Tensor, torch.Tensor]:
        """The pre-pass, and the K', V' it writes (contiguous, (B, Hkv, Lk, D), the inputs' dtype)."""
        k_inf = torch.empty(self.batch, self.hkv, self.lk, self.d, device=self.k.device, dtype=self.k.dtype)
        v_inf = torch.empty(self.batch, self.hkv, self.lk, self.d, device=self.v.device, dtype=self.v.dtype)
        rows = elementwise_rows(self.interpreted)
        n_blocks = triton.cdiv(self.lk, rows)
        launch = Launch(
            "infuse", _infuse_kv_kernel, (n_blocks * self.batch * self.hkv,),
            (self.k, self.v, *self.vectors, self.head_logit, k_inf, v_inf,
             *_strides(self.k), *_strides(self.v), self.hkv, self.lk, self.d, n_blocks),
            {"RESCALE": self.rescale, "BLOCK_N": rows, "BLOCK_D": self.block_d, "ACC": self.dots["ACC"],
             **_warps(self.interpreted)},
        )  # fmt: skip
        return launch, k_inf, v_inf


def _warps(interpreted: bool, num_warps: int = 4) -> dict:
    return {} if interpreted else {"num_warps": num_warps}


class ForwardPlan(_Inputs):
    """The forward's launches: [pre-pass,] fast attention, exact attention. ``attention(config, exact)`` builds one."""

    def __init__(self, *args):
        super().__init__(*args)
        self.decode = self.lq <= DECODE_ROWS
        self.out = torch.empty_like(self.q, memory_format=torch.contiguous_format)
        rows = (self.batch, self.hq, self.lq)
        self.lse2 = torch.empty(rows, device=self.q.device, dtype=accumulator_dtype(self.q.dtype))
        self.marks = torch.empty(rows, device=self.q.device, dtype=torch.int8)
        # a generation step: split over the keys, the group's query heads as the rows of one tile (decode_launches)
        self.one_query = self.lq == 1 and self.group <= DECODE_SPLIT_MAX_GROUP
        self.k_src, self.v_src, self.pre = self.k, self.v, None
        if not self.decode:
            self.pre, self.k_src, self.v_src = self.infuse_launch()

    def attention(self, config: TileConfig, exact: bool = False) -> Launch:
        """The attention pass on ``config`` (RESCALE is passed only to the infusing decode variant, which computes the
        gate: the other variants compile once for both settings)."""
        n_m = triton.cdiv(self.lq, config.block_m)
        return Launch(
            "fwd_exact" if exact else "fwd", _attn_fwd_kernel, (n_m * self.batch * self.hq,),
            (self.q, self.k_src, self.v_src, *self.vectors, self.head_logit, self.kvm, self.out, self.lse2, self.marks,
             *_strides(self.q), *_strides(self.k_src), *_strides(self.v_src), *_strides(self.out),
             self.hq, self.hkv, self.lq, self.lk, self.d, n_m, *_split_scales(self.scale)),
            {"GROUP": self.group, "CAUSAL": self.causal, "HAS_KV_MASK": self.has_kv_mask, "INFUSE": self.decode,
             "RESCALE": self.rescale and self.decode, "EXACT": exact, "BLOCK_D": self.block_d, **self.dots,
             "SPLIT": self.decode and not exact and config.block_m <= 16,
             **config.launch_args(self.interpreted)},
            config,
        )  # fmt: skip

    def launches(self, config: TileConfig) -> list[Launch]:
        exact = exact_config(config, "fwd")
        if self.one_query:
            return [*self.decode_launches(), self.attention(self.decode_exact_config(), exact=True)]
        return [*([self.pre] if self.pre else []), self.attention(config), self.attention(exact, exact=True)]

    def decode_exact_config(self) -> TileConfig:
        """The exact variant's tile after a split decode (the fast variant's rows are one query row per head)."""
        return exact_config(INTERPRETER if self.interpreted else TileConfig(16, 32, 4, 1), "fwd")

    def decode_launches(self) -> list[Launch]:
        """A decode step's fast variant (Lq = 1): the split pass (one program per (b, KV head, key split), the group's
        query heads as tile rows) and the combine pass (one program per query row), which writes out, lse2 and the
        marks the exact variant reads."""
        tile = decode_tile(self.block_d, self.group, self.interpreted)
        processors = multiprocessor_count(self.q.device)
        splits, split_len = decode_splits(self.batch * self.hkv, self.lk, tile.block_n, processors, self.interpreted)
        rows = self.batch * self.hq
        acc_dtype = accumulator_dtype(self.q.dtype)
        dev = self.q.device
        m_part = torch.empty((rows, splits), device=dev, dtype=acc_dtype)
        l_part = torch.empty_like(m_part)
        seen_part = torch.empty((rows, splits), device=dev, dtype=torch.int8)
        acc_part = torch.empty((rows, splits, self.d), device=dev, dtype=acc_dtype)
        split = Launch(
            "decode_split", _attn_decode_split_kernel, (self.batch * self.hkv * splits,),
            (self.q, self.k, self.v, *self.vectors, self.head_logit, self.kvm, m_part, l_part, seen_part, acc_part,
             self.q.stride(0), self.q.stride(1), *_strides(self.k), *_strides(self.v),
             self.hkv, self.lk, self.d, splits, split_len, *_split_scales(self.scale)),
            {"GROUP": self.group, "RESCALE": self.rescale, "HAS_KV_MASK": self.has_kv_mask, "BLOCK_D": self.block_d,
             **self.dots, **tile.launch_args(self.interpreted)},
            tile,
        )  # fmt: skip
        combine = Launch(
            "decode_combine", _attn_decode_combine_kernel, (rows,),
            (m_part, l_part, seen_part, acc_part, self.out, self.lse2, self.marks,
             self.out.stride(0), self.out.stride(1), self.hq, self.d, splits),
            {"BLOCK_S": 16, "BLOCK_D": self.block_d, "ACC": self.dots["ACC"], **_warps(self.interpreted)},
        )  # fmt: skip
        return [split, combine]


class BackwardPlan(_Inputs):
    """The backward's launches: pre-pass, delta, dq (fast, exact), dK'dV' (fast, exact), infusion backward."""

    def __init__(self, grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse2, causal, scale,
                 rescale):  # fmt: skip
        super().__init__(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)
        self.grad_out, self.out, self.lse2 = _last_dim_contiguous(grad_out), _last_dim_contiguous(out), lse2
        dev, acc = self.q.device, accumulator_dtype(self.q.dtype)
        self.pre, self.k_inf, self.v_inf = self.infuse_launch()
        self.delta = torch.empty((self.batch, self.hq, self.lq), device=dev, dtype=acc)
        self.dq = torch.empty_like(self.q, memory_format=torch.contiguous_format)
        self.dq_marks = torch.empty((self.batch, self.hq, self.lq), device=dev, dtype=torch.int8)
        self.dk_inf = torch.empty((self.batch, self.hkv, self.lk, self.d), device=dev, dtype=acc)
        self.dv_inf = torch.empty_like(self.dk_inf)
        self.kv_marks = torch.empty((self.batch, self.hkv, self.lk), device=dev, dtype=torch.int8)
        self.dk = torch.empty_like(self.k, memory_format=torch.contiguous_format)
        self.dv = torch.empty_like(self.v, memory_format=torch.contiguous_format)
        self.rows = elementwise_rows(self.interpreted)
        self.n_parts = triton.cdiv(self.lk, self.rows)
        self.parts = [
            torch.empty((self.batch, self.hkv, self.n_parts, self.d), device=dev, dtype=acc) for _ in range(4)
        ]
        self.dhl_part = torch.zeros((self.batch, self.hkv, self.n_parts), device=dev, dtype=acc)
        self.common = {"GROUP": self.group, "CAUSAL": self.causal, "HAS_KV_MASK": self.has_kv_mask,
                       "BLOCK_D": self.block_d, **self.dots}  # fmt: skip

    def delta_launch(self) -> Launch:
        n_m = triton.cdiv(self.lq, self.rows)
        return Launch(
            "delta", _attn_bwd_delta_kernel, (n_m * self.batch * self.hq,),
            (self.out, self.grad_out, self.delta, *_strides(self.out), *_strides(self.grad_out),
             self.hq, self.lq, self.d, n_m),
            {"BLOCK_M": self.rows, "BLOCK_D": self.block_d, "ACC": self.dots["ACC"], **_warps(self.interpreted)},
        )  # fmt: skip

    def dq_launch(self, config: TileConfig, exact: bool = False) -> Launch:
        n_m = triton.cdiv(self.lq, config.block_m)
        return Launch(
            "bwd_dq_exact" if exact else "bwd_dq", _attn_bwd_dq_kernel, (n_m * self.batch * self.hq,),
            (self.q, self.k_inf, self.v_inf, self.kvm, self.grad_out, self.lse2, self.delta, self.dq, self.dq_marks,
             *_strides(self.q), *_strides(self.grad_out), *_strides(self.dq),
             self.hq, self.hkv, self.lq, self.lk, self.d, n_m, *_split_scales(self.scale)),
            {**self.common, "EXACT": exact, **config.launch_args(self.interpreted)},
            config,
        )  # fmt: skip

    def dkdv_launch(self, config: TileConfig, exact: bool = False) -> Launch:
        n_n = triton.cdiv(self.lk, config.block_n)
        return Launch(
            "bwd_dkdv_exact" if exact else "bwd_dkdv", _attn_bwd_dkdv_kernel, (n_n * self.batch * self.hkv,),
            (self.q, self.k_inf, self.v_inf, self.kvm, self.grad_out, self.lse2, self.delta, self.dk_inf, self.dv_inf,
             self.kv_marks, *_strides(self.q), *_strides(self.grad_out),
             self.hq, self.hkv, self.lq, self.lk, self.d, n_n, *_split_scales(self.scale)),
            {**self.common, "EXACT": exact, **config.launch_args(self.interpreted)},
            config,
        )  # fmt: skip

    def infusion_launch(self) -> Launch:
        return Launch(
            "infusion_bwd", _infusion_bwd_kernel, (self.n_parts * self.batch * self.hkv,),
            (self.k, self.v, *self.vectors, self.head_logit, self.dk_inf, self.dv_inf,
             self.dk, self.dv, *self.parts, self.dhl_part,
             *_strides(self.k), *_strides(self.v), *_strides(self.dk), *_strides(self.dv),
             self.hkv, self.lk, self.d, self.n_parts),
            {"RESCALE": self.rescale, "BLOCK_N": self.rows, "BLOCK_D": self.block_d, "ACC": self.dots["ACC"],
             **_warps(self.interpreted, 8)},  # four fp32 (rows, D) tiles live at once: 8 warps keep them in registers
        )  # fmt: skip

    def gradients(self) -> tuple[torch.Tensor, ...]:
        dk_mul, dk_add, dv_mul, dv_add = (p.sum(dim=2).to(self.q.dtype) for p in self.parts)
        dhead_logit = self.dhl_part.sum(dim=(0, 2)).to(self.head_logit.dtype)
        return self.dq, self.dk, self.dv, dk_mul, dk_add, dv_mul, dv_add, dhead_logit


# --------------------------------------------------------------------------------------------------------------------
# Entry points (torch.library ops call these; inputs are validated there)
# --------------------------------------------------------------------------------------------------------------------


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
    """Run the forward. Returns ``out`` (B, Hq, Lq, D) in q's dtype and ``lse2`` (B, Hq, Lq) fp32 (base-2 log-sum-exp
    of the scaled scores; +inf for rows that see no key). Inputs are assumed validated."""
    plan = ForwardPlan(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)
    if plan.one_query:
        for launch in plan.decode_launches():
            launch()
        if _exact_pass_needed(plan, plan.marks):
            plan.attention(plan.decode_exact_config(), exact=True)()
        return plan.out, plan.lse2
    if plan.pre is not None:
        plan.pre()
    config = choose(
        "fwd", plan.block_d, plan.q, plan.tune_key, lambda c: plan.attention(c)(), decode=plan.decode,
        interpreter=plan.interpreted,
    )  # fmt: skip
    plan.attention(config)()
    if _exact_pass_needed(plan, plan.marks):
        plan.attention(exact_config(config, "fwd"), exact=True)()
    return plan.out, plan.lse2


def _exact_pass_needed(plan, marks: torch.Tensor) -> bool:
    """Whether to launch an exact variant after its fast one. Always on a GPU: its programs with no marked row return
    at once, and reading ``marks`` on the host would cost a sync. Under the interpreter only when a row was marked:
    there every program of a launch runs in numpy whether it returns at once or not, and reading costs nothing."""
    return not plan.interpreted or bool(marks.any())


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
    """Run the backward. Returns (dq, dk, dv, dk_mul, dk_add, dv_mul, dv_add, dhead_logit) in the inputs' dtypes.

    Deterministic: the (B, Hkv, D) vector gradients and dhead_logit are per-key-block partial sums (fp32) reduced by
    ``torch.sum``; no atomics are used anywhere."""
    plan = BackwardPlan(
        grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse2, causal, scale, rescale
    )
    plan.pre()
    plan.delta_launch()()
    tune = {"interpreter": plan.interpreted}
    dq_config = choose("bwd_dq", plan.block_d, plan.q, plan.tune_key, lambda c: plan.dq_launch(c)(), **tune)
    plan.dq_launch(dq_config)()
    if _exact_pass_needed(plan, plan.dq_marks):
        plan.dq_launch(exact_config(dq_config, "bwd_dq"), exact=True)()
    dkdv_config = choose("bwd_dkdv", plan.block_d, plan.q, plan.tune_key, lambda c: plan.dkdv_launch(c)(), **tune)
    plan.dkdv_launch(dkdv_config)()
    if _exact_pass_needed(plan, plan.kv_marks):
        plan.dkdv_launch(exact_config(dkdv_config, "bwd_dkdv"), exact=True)()
    plan.infusion_launch()()
    return plan.gradients()


__all__ = [
    "BackwardPlan",
    "ForwardPlan",
    "Launch",
    "block_d_of",
    "dot_settings",
    "mit_attention_triton_bwd",
    "mit_attention_triton_fwd",
]
