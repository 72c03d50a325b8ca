"""The Triton forward's two decode paths against the reference: with 16-row tiles (mma.sync GPUs) the infusion is
distributed over the products (raw K / V feed the tensor cores), with 64-row tiles (wgmma GPUs) each K / V tile is
infused in registers. The interpreter's own tile takes the first; the second is forced here by its tile."""

from __future__ import annotations

import pytest
import torch
from attention_cases import check_parity, make_attention_inputs, make_kv_mask

from mit_kernels import dispatch, triton_configs
from mit_kernels.triton_configs import TileConfig

pytestmark = pytest.mark.skipif(not dispatch.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1 (conftest)")


@pytest.fixture(params=["split products (16 rows)", "infused tile (32 rows)"])
def decode_rows(request, monkeypatch):
    if request.param.startswith("infused"):  # a forward decode tile of more than 16 rows: no SPLIT
        original = triton_configs.choose

        def choose(pass_name, *args, decode=False, **kwargs):
            if pass_name == "fwd" and decode:
                return TileConfig(32, 16)
            return original(pass_name, *args, decode=decode, **kwargs)

        from mit_kernels import triton_attention

        monkeypatch.setattr(triton_attention, "choose", choose)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("lq", "lk", "mask", "causal", "rescale"), [
    (1, 37, "left_pad", True, True),
    (3, 21, "random", False, True),
    (16, 40, "none", True, False),
    (5, 3, "left_pad", True, True),  # rows that see no key (Lq > Lk under the bottom-right causal mask)
])  # fmt: skip
def test_decode_paths_agree_with_the_reference(decode_rows, dtype, lq, lk, mask, causal, rescale):
    inputs = make_attention_inputs(2, 6, 2, lq, lk, 32, dtype)
    check_parity(inputs, dtype, "triton", causal=causal, kv_mask=make_kv_mask(2, lk, mask), rescale=rescale)


def test_decode_paths_keep_nan_out_of_rows_that_do_not_see_it(decode_rows):
    """A NaN value in a padded key (and a NaN key past the causal edge of the first query) never reaches a row:
    the fast path marks its rows, the exact path recomputes them."""
    q, k, v, *rest = make_attention_inputs(1, 2, 1, 2, 9, 16, torch.float32)
    k, v = k.detach().clone(), v.detach().clone()
    v[0, 0, 0, 3] = float("nan")  # key 0: padded
    k[0, 0, 8, 1] = float("nan")  # key 8: visible to the second query only (bottom-right causal)
    kv_mask = torch.ones(1, 9, dtype=torch.bool)
    kv_mask[0, 0] = False
    from mit_kernels import mit_attention, mit_attention_reference

    args = (q.detach(), k, v, *(x.detach() for x in rest))
    got = mit_attention(*args, causal=True, kv_mask=kv_mask, backend="triton")
    want = mit_attention_reference(*args, causal=True, kv_mask=kv_mask)
    assert torch.isfinite(got[:, :, 0]).all() and torch.isnan(got[:, :, 1]).all()
    torch.testing.assert_close(got[:, :, 0], want[:, :, 0])
