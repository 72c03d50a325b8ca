"""Triton kernels for MiT's FFN infusion gate: a fused SwiGLU with a per-sample multiplier.

For gate, up (B, L, F) and ffn_mul (B, F), with ``m = ffn_mul[b]`` broadcast over the sequence::

    s = sigmoid(gate)        silu(gate) = gate * s
    y = silu(gate) * up * (1 + m)

Backward (given dy), recomputing s and silu from the saved inputs (no intermediate is stored)::

    silu'(gate) = s * (1 + gate * (1 - s))
    d gate      = dy * (1 + m) * up * silu'(gate)
    d up        = dy * (1 + m) * silu(gate)
    d m[b, f]   = sum_l dy[b, l, f] * silu(gate[b, l, f]) * up[b, l, f]

Every tile is cast to fp32 right after it is loaded (fp64 for fp64 inputs, so gradcheck is exact) and cast back to the
output dtype when stored.

Tiling: a program owns a (BLOCK_L, BLOCK_F) tile of one sample (forward), or a chunk of ``CHUNK_L`` rows of one sample
walked BLOCK_L rows at a time (backward). Program axis 0 enumerates (sample, row block) pairs, so it is the one that
grows with B * L (axis 0 allows 2^31 - 1 programs, the others 65535); axis 1 enumerates feature blocks.

Determinism: no atomics. Each backward program writes the partial sum of d m over its row chunk (fp32) into a
(B, n_chunks, F) buffer, which ``torch.sum`` reduces afterwards, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import accumulator_dtype
from .triton_common import Launch, interpreter_active, tl_accumulator

# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(ptr, b, offs_l, offs_f, stride_b, stride_l):
    """Pointers of a (BLOCK_L, BLOCK_F) tile of sample b; 64-bit offsets, so B * L * F may exceed 2^31."""
    return ptr + b.to(tl.int64) * stride_b + offs_l.to(tl.int64)[:, None] * stride_l + offs_f[None, :]


@triton.jit(do_not_specialize=["L", "F", "NUM_L_BLOCKS"])
def _ffn_gate_fwd_kernel(
    G, U, M, Y,
    stride_gb, stride_gl,
    stride_ub, stride_ul,
    stride_yb, stride_yl,
    L, F, NUM_L_BLOCKS,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """y = silu(gate) * up * (1 + m) on one (BLOCK_L, BLOCK_F) tile of one sample."""
    pid = tl.program_id(0)
    b = pid // NUM_L_BLOCKS
    offs_l = (pid % NUM_L_BLOCKS) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    mask = (offs_l[:, None] < L) & mask_f[None, :]

    scale = 1.0 + tl.load(M + b.to(tl.int64) * F + offs_f, mask=mask_f, other=0.0).to(ACC)
    g = tl.load(_row_offsets(G, b, offs_l, offs_f, stride_gb, stride_gl), mask=mask, other=0.0).to(ACC)
    u = tl.load(_row_offsets(U, b, offs_l, offs_f, stride_ub, stride_ul), mask=mask, other=0.0).to(ACC)
    y = g * tl.sigmoid(g) * u * scale[None, :]
    tl.store(_row_offsets(Y, b, offs_l, offs_f, stride_yb, stride_yl), y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["L", "F", "NUM_CHUNKS"])
def _ffn_gate_bwd_kernel(
    DY, G, U, M, DG, DU, DM_PART,
    stride_dyb, stride_dyl,
    stride_gb, stride_gl,
    stride_ub, stride_ul,
    stride_dgb, stride_dgl,
    stride_dub, stride_dul,
    L, F, NUM_CHUNKS,
    CHUNK_L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """d gate and d up for rows [chunk * CHUNK_L, (chunk + 1) * CHUNK_L) of one sample and one feature block, and
    that chunk's partial sum of d m (written to DM_PART[b, chunk, :])."""
    pid = tl.program_id(0)
    b = pid // NUM_CHUNKS
    chunk = pid % NUM_CHUNKS
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F

    scale = 1.0 + tl.load(M + b.to(tl.int64) * F + offs_f, mask=mask_f, other=0.0).to(ACC)
    dm = tl.zeros([BLOCK_F], ACC)
    row_start = chunk * CHUNK_L
    row_end = tl.minimum(row_start + CHUNK_L, L)
    for start_l in range(row_start, row_end, BLOCK_L):
        offs_l = start_l + tl.arange(0, BLOCK_L)
        mask = (offs_l[:, None] < L) & mask_f[None, :]
        # Masked elements load as 0, so they add nothing to dm and are never stored.
        dy = tl.load(_row_offsets(DY, b, offs_l, offs_f, stride_dyb, stride_dyl), mask=mask, other=0.0).to(ACC)
        g = tl.load(_row_offsets(G, b, offs_l, offs_f, stride_gb, stride_gl), mask=mask, other=0.0).to(ACC)
        u = tl.load(_row_offsets(U, b, offs_l, offs_f, stride_ub, stride_ul), mask=mask, other=0.0).to(ACC)
        s = tl.sigmoid(g)
        silu = g * s
        dy_scaled = dy * scale[None, :]
        dg = dy_scaled * u * (s * (1.0 + g * (1.0 - s)))
        du = dy_scaled * silu
        dm += tl.sum(dy * silu * u, axis=0)
        tl.store(_row_offsets(DG, b, offs_l, offs_f, stride_dgb, stride_dgl), dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(_row_offsets(DU, b, offs_l, offs_f, stride_dub, stride_dul), du.to(DU.dtype.element_ty), mask=mask)
    part = b.to(tl.int64) * NUM_CHUNKS + chunk
    tl.store(DM_PART + part * F + offs_f, dm, mask=mask_f)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """(torch, triton) accumulator dtypes (:func:`mit_kernels.reference.accumulator_dtype`)."""
    return accumulator_dtype(dtype), tl_accumulator(dtype)


def _config(l: int, f: int) -> dict:
    """Fixed tile sizes (no autotuning: deterministic, and safe under pytest).

    Tiles hold ~4096 elements on a GPU (BLOCK_F up to 512 features, BLOCK_L the rest); a backward program walks 8 row
    blocks, so the (B, n_chunks, F) buffer of d m partial sums stays ~1/64 of the gradient's element count. The
    interpreter runs each program as numpy ops, so there tiles are as large as possible."""
    if interpreter_active():
        block_f = min(max(16, triton.next_power_of_2(f)), 1024)
        block_l = min(max(1, triton.next_power_of_2(l)), 32)
        return {"BLOCK_L": block_l, "BLOCK_F": block_f, "CHUNK_L": 2 * block_l}
    block_f = min(max(16, triton.next_power_of_2(f)), 512)
    block_l = min(max(1, triton.next_power_of_2(l)), max(1, 4096 // block_f))
    return {"BLOCK_L": block_l, "BLOCK_F": block_f, "CHUNK_L": 8 * block_l}


def _launch_options(cfg: dict) -> dict:
    """num_warps for a GPU launch (the interpreter takes none): 8 for full 4096-element tiles, else 4."""
    if interpreter_active():
        return {}
    return {"num_warps": 8 if cfg["BLOCK_L"] * cfg["BLOCK_F"] >= 4096 else 4}


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def ffn_gate_fwd_launch(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> tuple[Launch, torch.Tensor]:
    """The forward's launch (not run) and the output it writes."""
    gate, up = _last_dim_contiguous(gate), _last_dim_contiguous(up)
    ffn_mul = ffn_mul.contiguous()
    batch, l, f = gate.shape
    out = torch.empty((batch, l, f), device=gate.device, dtype=gate.dtype)
    cfg = _config(l, f)
    num_l_blocks = triton.cdiv(l, cfg["BLOCK_L"])
    launch = Launch(
        "ffn_fwd", _ffn_gate_fwd_kernel, (batch * num_l_blocks, triton.cdiv(f, cfg["BLOCK_F"])),
        (gate, up, ffn_mul, out,
         gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), out.stride(0), out.stride(1),
         l, f, num_l_blocks),
        {"BLOCK_L": cfg["BLOCK_L"], "BLOCK_F": cfg["BLOCK_F"], "ACC": _acc(gate.dtype)[1], **_launch_options(cfg)},
    )  # fmt: skip
    return launch, out


def ffn_gate_bwd_launch(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor
) -> tuple[Launch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The backward's launch (not run) and the d gate, d up and d m partial-sum buffers it writes."""
    grad_out, gate, up = (_last_dim_contiguous(x) for x in (grad_out, gate, up))
    ffn_mul = ffn_mul.contiguous()
    batch, l, f = gate.shape
    acc_torch, acc_tl = _acc(gate.dtype)
    d_gate = torch.empty((batch, l, f), device=gate.device, dtype=gate.dtype)
    d_up = torch.empty((batch, l, f), device=gate.device, dtype=up.dtype)
    cfg = _config(l, f)
    num_chunks = triton.cdiv(l, cfg["CHUNK_L"])
    dm_part = torch.empty((batch, num_chunks, f), device=gate.device, dtype=acc_torch)
    launch = Launch(
        "ffn_bwd", _ffn_gate_bwd_kernel, (batch * num_chunks, triton.cdiv(f, cfg["BLOCK_F"])),
        (grad_out, gate, up, ffn_mul, d_gate, d_up, dm_part,
         grad_out.stride(0), grad_out.stride(1), gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
         d_gate.stride(0), d_gate.stride(1), d_up.stride(0), d_up.stride(1),
         l, f, num_chunks),
        {**cfg, "ACC": acc_tl, **_launch_options(cfg)},
    )  # fmt: skip
    return launch, (d_gate, d_up, dm_part)


def ffn_gate_triton_fwd(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """Launch the forward. Returns ``silu(gate) * up * (1 + ffn_mul[:, None, :])``, (B, L, F) contiguous in gate's
    dtype. Inputs are assumed validated: gate and up (B, L, F), ffn_mul (B, F), one float dtype, one device."""
    launch, out = ffn_gate_fwd_launch(gate, up, ffn_mul)
    if out.numel():
        launch()
    return out


def ffn_gate_triton_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns (d gate, d up, d ffn_mul) in the inputs' dtypes, recomputing silu from gate.

    Deterministic: d ffn_mul is reduced over L from per-chunk partial sums (fp32; fp64 for fp64 inputs) by
    ``torch.sum``; no atomics are used."""
    launch, (d_gate, d_up, dm_part) = ffn_gate_bwd_launch(grad_out, gate, up, ffn_mul)
    if d_gate.numel() == 0:
        return d_gate, d_up, torch.zeros_like(ffn_mul)
    launch()
    return d_gate, d_up, dm_part.sum(dim=1).to(ffn_mul.dtype)
