"""The Triton decode step (Lq = 1): keys split across programs, the GQA group's query heads as the rows of one tile,
the splits' partial softmax statistics combined by a second pass (flash-decoding), against the reference.

Under the interpreter the split rule sees 4 "multiprocessors" and takes splits of a single tile, so short caches
reach many splits, splits whose keys are all padded, and a last split that is cut short."""

from __future__ import annotations

import math

import pytest
import torch
from attention_cases import check_parity, make_attention_inputs

from mit_kernels import dispatch, mit_attention, mit_attention_reference
from mit_kernels.triton_configs import decode_splits, decode_tile

pytestmark = pytest.mark.skipif(not dispatch.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1 (conftest)")


def _splits(batch: int, hkv: int, lk: int, d: int, group: int) -> int:
    return decode_splits(batch * hkv, lk, decode_tile(d, group, interpreted=True).block_n, 4, interpreted=True)[0]


@pytest.mark.parametrize(
    ("batch", "hkv", "group", "lk", "mask"),
    [
        (1, 1, 1, 37, "none"),  # 3 splits, the last one cut short
        (1, 1, 8, 130, "left_pad"),  # 5 splits of two tiles, the first three all padding, the last cut short
        (2, 1, 3, 70, "left_pad"),  # a group that is not a power of two; sample 1 fully padded
        (1, 2, 16, 50, "random"),  # the largest group the split decode takes: 16 query heads as the tile's rows
        (1, 1, 20, 37, "random"),  # a larger group: the per-query-head decode (still exact)
        (2, 2, 4, 9, "random"),  # fewer keys than one tile
        (2, 1, 4, 150, "static"),  # static caches: splits holding only empty slots, a split kept from its middle on
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_decode_agrees_with_the_reference(batch, hkv, group, lk, mask, dtype):
    inputs = make_attention_inputs(batch, hkv * group, hkv, 1, lk, 32, dtype)
    kv_mask = None
    if mask == "left_pad":  # sample b: its first 100 keys (or all of them) padded, so whole splits see no key
        kv_mask = torch.ones(batch, lk, dtype=torch.bool)
        kv_mask[0, : min(100, lk - 1)] = False
        if batch > 1:
            kv_mask[1:] = False
    elif mask == "random":
        kv_mask = torch.rand(batch, lk, generator=torch.Generator().manual_seed(3)) > 0.5
    elif mask == "static":  # sample 0 holds keys 0-44, sample 1 keys 49-89 (left padding) but for a hole at 60-64;
        # the empty slots hold junk no row may see (the split kernel skips their blocks)
        kv_mask = torch.zeros(batch, lk, dtype=torch.bool)
        kv_mask[0, :45], kv_mask[1, 49:90] = True, True
        kv_mask[1, 60:65] = False
        for x in inputs[1:3]:
            x.masked_fill_(~kv_mask[:, None, :, None], 1e4)
    check_parity(inputs, dtype, "triton", causal=True, kv_mask=kv_mask)


def test_the_cases_above_reach_several_splits():
    """The parametrisation above is only a test of the combine pass if it splits: it does, down to one-tile splits."""
    assert _splits(1, 1, 37, 32, 1) == 3
    assert _splits(1, 1, 130, 32, 8) == 5
    assert _splits(2, 2, 9, 32, 4) == 1


@pytest.mark.parametrize("units", [1, 3, 8, 32, 264, 1000])
@pytest.mark.parametrize("keys", [0, 1, 63, 64, 65, 1000, 4099, 131072])
@pytest.mark.parametrize("interpreted", [False, True])
def test_split_rule_covers_every_key_once(units, keys, interpreted):
    block_n, processors = 64, 132
    splits, split_len = decode_splits(units, keys, block_n, processors, interpreted)
    assert splits >= 1 and split_len % block_n == 0 and split_len > 0
    if keys:
        assert (splits - 1) * split_len < keys <= splits * split_len  # no split is empty, none is missing
        tiles = math.ceil(keys / block_n)
        # about two programs per multiprocessor, never more splits than the minimum split length allows
        assert units * splits <= max(units, 2 * processors + units)
        assert split_len // block_n >= min(tiles, 1 if interpreted else 4)


def test_split_decode_fp64_gradcheck():
    """The backward reads the lse2 the combine pass writes: fp64 gradcheck through a 3-split decode step."""
    inputs = make_attention_inputs(1, 2, 1, 1, 40, 16, torch.float64)
    q, k, v, k_mul, k_add, v_mul, v_add, lam = (x.detach() for x in inputs)
    kv_mask = torch.ones(1, 40, dtype=torch.bool)
    kv_mask[0, :5] = False
    assert _splits(1, 1, 40, 16, 2) == 3
    # q, the vectors and lambda (k and v would multiply the interpreter's runs by 20 for no other path); fast_mode (a
    # random projection of the Jacobian, as the parity suite's Triton gradchecks): a few interpreted runs, not ~100
    leaves = [x.requires_grad_() for x in (q, k_mul, k_add, v_mul, v_add, lam)]

    def fn(q, k_mul, k_add, v_mul, v_add, lam):
        return mit_attention(q, k, v, k_mul, k_add, v_mul, v_add, lam, kv_mask=kv_mask, backend="triton")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_split_decode_keeps_nan_and_inf_where_the_semantics_put_them():
    """A NaN value in a padded key, alone in its split, never reaches the row (the combine marks the row, the exact
    pass recomputes it); an Inf key that a row sees gives the reference's NaN / Inf; a fully padded sample gives 0."""
    q, k, v, *rest = (x.detach() for x in make_attention_inputs(3, 2, 1, 1, 40, 16, torch.float32))
    k, v = k.clone(), v.clone()
    kv_mask = torch.ones(3, 40, dtype=torch.bool)
    kv_mask[0, :20] = False
    v[0, 0, 3, 5] = float("nan")  # sample 0: padded key 3, in a split that holds padded keys only
    k[1, 0, 33, :] = float("inf")  # sample 1: a visible infinite key
    kv_mask[2] = False  # sample 2: no key at all
    v[2, 0, 7, 0] = float("inf")
    args = (q, k, v, *rest)
    got = mit_attention(*args, kv_mask=kv_mask, backend="triton")
    want = mit_attention_reference(*(x.double() for x in args), kv_mask=kv_mask)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()
    assert (got[2] == 0).all()
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.isnan(want[1]).any() or torch.isinf(want[1]).any()  # the Inf key does reach sample 1's rows
