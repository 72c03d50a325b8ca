"""Triton kernels (the interpreter on CPU, the real thing on a GPU) against the fp64 reference: forward and all eight
gradients, over dtypes, head dims, odd sequence lengths, GQA ratios, causal, rescale, padding and zero infusion."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    DEVICE,
    INPUT_NAMES,
    assert_within_low_precision_rule,
    make_attention_inputs,
    make_kv_mask,
    max_abs_err,
    reduction_magnitudes,
    run_attention,
)

from mit_kernels import mit_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]
SEQ_LENS = [(1, 1), (1, 33), (7, 7), (33, 33), (7, 113), (33, 7)]
# (Hq, Hkv): GQA ratios 1, 3, 4.
HEADS = [(2, 2), (3, 1), (4, 1)]
MASK_KINDS = ["none", "left_pad", "random"]


def check_parity(inputs, dtype, **kwargs):
    """Triton in ``dtype`` vs the reference in ``dtype`` and in fp64, by the low-precision tolerance rule."""
    gen = torch.Generator().manual_seed(1)
    # Every run sees the same values: the fp64 reference gets the low-precision inputs and grad_out upcast.
    grad_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    out64, grads64 = run_attention([x.double() for x in inputs], grad_out.double(), "reference", **kwargs)
    out_low, grads_low = run_attention(inputs, grad_out, "reference", **kwargs)
    out_tri, grads_tri = run_attention(inputs, grad_out, "triton", **kwargs)
    assert out_tri.dtype == dtype and out_tri.shape == inputs[0].shape
    magnitude = max(x.abs().max().item() for x in (out64, *grads64))
    sums = reduction_magnitudes([x.double() for x in inputs], grad_out.double(), **kwargs)
    assert_within_low_precision_rule("out", out_tri, out_low, out64, magnitude)
    for name, got, low, ref, sum_mag in zip(INPUT_NAMES, grads_tri, grads_low, grads64, sums):
        assert got.dtype == low.dtype and got.shape == low.shape, name
        assert_within_low_precision_rule(f"d{name}", got, low, ref, max(magnitude, sum_mag), compute_dtype=dtype)


# Every dtype x head dim x sequence-length pair; the remaining switches are cycled so that each of their values meets
# every dtype. The full product of the switches is covered at fp32 by test_parity_switches below.
_MATRIX = list(itertools.product(DTYPES, HEAD_DIMS, SEQ_LENS))


@pytest.mark.parametrize(
    "dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion",
    [
        (dt, d, lq, lk, HEADS[i % 3], bool(i % 2), i % 5 != 0, MASK_KINDS[i % 3], i % 7 == 3)
        for i, (dt, d, (lq, lk)) in enumerate(_MATRIX)
    ],
)
def test_parity_matrix(dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion):
    hq, hkv = heads
    batch = 2
    inputs = make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, zero_infusion=zero_infusion, seed=lq * 131 + lk)
    kv_mask = make_kv_mask(batch, lk, mask_kind)
    check_parity(inputs, dtype, causal=causal, rescale=rescale, kv_mask=kv_mask)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "left_pad"])
@pytest.mark.parametrize("zero_infusion", [False, True])
def test_parity_switches(heads, causal, rescale, mask_kind, zero_infusion):
    hq, hkv = heads
    inputs = make_attention_inputs(2, hq, hkv, 9, 21, 32, torch.float32, zero_infusion=zero_infusion)
    check_parity(inputs, torch.float32, causal=causal, rescale=rescale, kv_mask=make_kv_mask(2, 21, mask_kind))


@pytest.mark.parametrize("d", [16, 96])
def test_parity_other_head_dims(d):
    """Head dims that are not powers of two, or below a tile (masked head-dim lanes)."""
    inputs = make_attention_inputs(1, 3, 1, 17, 17, d, torch.float32, seed=d)
    check_parity(inputs, torch.float32, causal=True, kv_mask=make_kv_mask(1, 17, "random"))


def test_parity_custom_scale_and_strided_inputs():
    """Non-default scale, and q/k/v given as transposed views of (B, L, H, D) storage, as transformers produces."""
    inputs = make_attention_inputs(2, 4, 2, 13, 13, 32, torch.float32)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:3])
    assert not q.is_contiguous()
    check_parity([q, k, v, *inputs[3:]], torch.float32, causal=True, scale=0.3)


@pytest.mark.parametrize("causal, mask_kind", [(True, "left_pad"), (False, "random")])
def test_gradcheck_through_triton_fp64(causal, mask_kind):
    inputs = [x.requires_grad_() for x in make_attention_inputs(2, 4, 2, 6, 10, 16, torch.float64)]
    kv_mask = make_kv_mask(2, 10, mask_kind)

    def fn(*xs):
        return mit_attention(*xs, causal=causal, kv_mask=kv_mask, backend="triton")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.slow
def test_gradcheck_through_triton_fp64_full_mode():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 2, 1, 5, 7, 16, torch.float64)]
    assert torch.autograd.gradcheck(lambda *xs: mit_attention(*xs, backend="triton"), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal, lq, lk", [(True, 17, 17), (True, 5, 40), (False, 17, 9)])
def test_zero_infusion_is_plain_attention(dtype, causal, lq, lk):
    """With all four infusion vectors zero the op is ordinary attention, whatever lambda is: compare with torch's
    scaled_dot_product_attention under the same (bottom-right causal + padding) mask, at the precision the same
    math has in ``dtype``."""
    batch, hq, hkv, d = 2, 4, 2, 32
    inputs = make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, zero_infusion=True)
    inputs[-1] = inputs[-1] * 10  # any lambda
    q, k, v = inputs[:3]
    kv_mask = torch.ones(batch, lk, dtype=torch.bool, device=DEVICE)
    kv_mask[1, -2:] = False  # right padding: every query keeps at least one key
    allowed = kv_mask[:, None, None, :]
    if causal:
        i = torch.arange(lq, device=DEVICE)[:, None]
        j = torch.arange(lk, device=DEVICE)[None, :]
        allowed = allowed & (j <= i + lk - lq)
    assert allowed.any(-1).all()

    def sdpa(q, k, v):
        rep = hq // hkv
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed
        )

    out = mit_attention(*inputs, causal=causal, kv_mask=kv_mask, backend="triton")
    expected_low = sdpa(q, k, v)
    expected64 = sdpa(q.double(), k.double(), v.double())
    assert_within_low_precision_rule("out", out, expected_low, expected64)
    if dtype == torch.float32:
        assert max_abs_err(out, expected64) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zero_and_no_nan(dtype):
    batch, hq, hkv, lq, lk, d = 2, 4, 2, 6, 4, 32
    inputs = [x.requires_grad_() for x in make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype)]
    kv_mask = torch.tensor([[False, False, True, True], [False] * 4], device=DEVICE)
    out = mit_attention(*inputs, causal=True, kv_mask=kv_mask, backend="triton")
    # Sample 1 sees nothing. In sample 0 query i sees keys j <= i - 2 and keys 0, 1 are padding: queries 0-3 see none.
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert out[0, :, 4:].abs().sum() > 0
    out.float().square().sum().backward()
    for name, x in zip(INPUT_NAMES, inputs):
        assert torch.isfinite(x.grad).all(), name
    dq = inputs[0].grad
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dq[0, :, :4], torch.zeros_like(dq[0, :, :4]))
    # Keys 0 and 1 of sample 0 and all keys of sample 1 are never attended: no gradient reaches them.
    assert inputs[1].grad[1].abs().sum() == 0 and inputs[1].grad[0, :, :2].abs().sum() == 0


def test_backward_is_deterministic():
    inputs = make_attention_inputs(2, 4, 2, 40, 40, 32, torch.float32)
    grad_out = torch.randn_like(inputs[0])
    _, first = run_attention(inputs, grad_out, "triton", causal=True)
    _, second = run_attention(inputs, grad_out, "triton", causal=True)
    for name, a, b in zip(INPUT_NAMES, first, second):
        assert torch.equal(a, b), name
