"""The yardstick of the compile check: a plain flash-attention-2 forward and backward in Triton, without infusion,
padding mask or NaN / Inf handling.

``python -m mit_kernels compile-check`` compiles these on the same tiles, dtypes and targets as MiT's kernels, so
that every MiT kernel's registers, spill, shared memory and tensor-core instruction count stand next to what a plain
kernel of the same shape costs. They are never launched by the package (and are not tested for speed here).

Forward (per block of query rows; base-2 online softmax)::

    s = q K^T * scale * log2(e);  m' = max(m, rowmax s);  p = exp2(s - m')
    l = l exp2(m - m') + rowsum p;  acc = acc exp2(m - m') + p V;  O = acc / l

Backward (dq per query block; dK, dV per key block, transposed), with ``delta_i = O_i . dO_i``::

    p = exp2(s - lse2);  dV = p^T dO;  dP = dO V^T;  dS = p (dP - delta);  dK = scale dS^T q;  dq = scale dS K
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _plain_load(ptr, offs_n, offs_d, stride_n, L, D):
    mask = (offs_n[:, None] < L) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["Lq", "Lk", "NUM_M_BLOCKS"])
def plain_fwd_kernel(
    Q, K, V, O, LSE, Hq, Lq, Lk, D, NUM_M_BLOCKS, scale_log2,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_M_BLOCKS).to(tl.int64)
    pid_m = NUM_M_BLOCKS - 1 - pid % NUM_M_BLOCKS
    kv_bh = pid_bh // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _plain_load(Q + pid_bh * Lq * D, offs_m, offs_d, D, Lq, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _plain_load(K + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
        v = _plain_load(V + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        ok = offs_n[None, :] < Lk
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    o_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o_ptrs = O + pid_bh * Lq * D + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + pid_bh * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Lq)


@triton.jit(do_not_specialize=["Lq", "Lk", "NUM_M_BLOCKS"])
def plain_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Lq, Lk, D, NUM_M_BLOCKS, scale, scale_log2,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_bh = (pid // NUM_M_BLOCKS).to(tl.int64)
    pid_m = NUM_M_BLOCKS - 1 - pid % NUM_M_BLOCKS
    kv_bh = pid_bh // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _plain_load(Q + pid_bh * Lq * D, offs_m, offs_d, D, Lq, D)
    do = _plain_load(DO + pid_bh * Lq * D, offs_m, offs_d, D, Lq, D)
    lse2 = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _plain_load(K + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
        v = _plain_load(V + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        ok = (offs_n[None, :] < Lk) & (offs_m[:, None] < Lq)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq, input_precision=PRECISION)
    dq_ptrs = DQ + pid_bh * Lq * D + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=["Hq", "Lq", "Lk", "NUM_N_BLOCKS"])
def plain_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Hq, Lq, Lk, D, NUM_N_BLOCKS, scale, scale_log2,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kv_bh = (pid // NUM_N_BLOCKS).to(tl.int64)
    pid_n = pid % NUM_N_BLOCKS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _plain_load(K + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
    v = _plain_load(V + kv_bh * Lk * D, offs_n, offs_d, D, Lk, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - (Lk - Lq))
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        q_bh = kv_bh * GROUP + g
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _plain_load(Q + q_bh * Lq * D, offs_m, offs_d, D, Lq, D)
            do = _plain_load(DO + q_bh * Lq * D, offs_m, offs_d, D, Lq, D)
            lse2 = tl.load(LSE + q_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(DELTA + q_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
            ok = (offs_n[:, None] < Lk) & (offs_m[None, :] < Lq)
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + (Lk - Lq))
            p_t = tl.where(ok, tl.math.exp2(s_t - lse2[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dk = tl.dot((p_t * (dp_t - delta[None, :])).to(q.dtype), q, dk, input_precision=PRECISION)
    mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
    offs = kv_bh * Lk * D + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


YARDSTICK = {"fwd": plain_fwd_kernel, "bwd_dq": plain_bwd_dq_kernel, "bwd_dkdv": plain_bwd_dkdv_kernel}


def yardstick_launch_args(pass_name: str, q, k, out, lse, group: int, causal: bool, config, precision: str):
    """(grid, args, kwargs) of the plain kernel of ``pass_name`` on contiguous q (B, Hq, Lq, D), k (B, Hkv, Lk, D)
    (``out``, ``lse`` stand in for every other tensor of the same shape), for the compile check."""
    batch, hq, lq, d = q.shape
    lk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    tiles = {"GROUP": group, "CAUSAL": causal, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
             "BLOCK_D": block_d, "PRECISION": precision, "num_warps": config.num_warps,
             "num_stages": config.num_stages}  # fmt: skip
    if pass_name == "fwd":
        n_m = triton.cdiv(lq, config.block_m)
        return (n_m * batch * hq,), (q, k, k, out, lse, hq, lq, lk, d, n_m, 0.18), tiles
    if pass_name == "bwd_dq":
        n_m = triton.cdiv(lq, config.block_m)
        return (n_m * batch * hq,), (q, k, k, out, lse, lse, out, lq, lk, d, n_m, 0.125, 0.18), tiles
    n_n = triton.cdiv(lk, config.block_n)
    return (n_n * batch * k.shape[1],), (q, k, k, out, lse, lse, k, k, hq, lq, lk, d, n_n, 0.125, 0.18), tiles
