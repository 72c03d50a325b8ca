"""Every fused backend against the fp64 reference: forward and all eight gradients, over dtypes, head dims, odd
sequence lengths, GQA ratios, causal, rescale, padding and zero infusion; fp64 gradcheck; zero infusion equals plain
attention; rows that see no key; determinism.

Backends: ``triton`` (the Triton interpreter on CPU, the real thing on a GPU), ``cpu`` (the C++ kernels, compiled
for the running torch at install or first use) and ``sdpa`` (the infusion in PyTorch + torch's
scaled_dot_product_attention, on the GPU when there is one). Each test runs for all three (determinism for the fused
two only: torch's SDPA backward makes no such promise on a GPU); the interpreter is slow, so the Triton matrix keeps
shorter sequences than the C++ one, which also spans the C++ kernels' block sizes and its decode kernel. The sdpa
matrix is small: its masks (bottom-right causal with Lq < Lk and Lq > Lk, rows that see no key, padding) and GQA are
what it adds to torch's SDPA.

Under the interpreter (every Triton program run in numpy, one at a time) the Triton cases are covering designs rather
than full products, so that this file runs in about a minute: the matrix crosses dtype x sequence lengths in full and
assigns head dims by a Latin square (every dtype / head dim and head dim / lengths pair still meets), and the switches
take, for each GQA ratio, the half of the 2^4 causal / rescale / padding / zero-infusion product whose four switches
have an even sum (any three of the four then appear in all eight combinations). On a GPU, and for the C++ and sdpa
backends (milliseconds a case), both are full products.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    DEVICE,
    INPUT_NAMES,
    assert_within_low_precision_rule,
    check_parity,
    make_attention_inputs,
    make_kv_mask,
    max_abs_err,
    run_attention,
)

from mit_kernels import mit_attention
from mit_kernels.dispatch import cpu_backend_available

FUSED_BACKENDS = ["triton", "cpu"]
BACKENDS = [*FUSED_BACKENDS, "sdpa"]
HEADS = [(2, 2), (3, 1), (4, 1)]  # (Hq, Hkv): GQA ratios 1, 3, 4
MASK_KINDS = ["none", "left_pad", "random"]
HEAD_DIMS = [32, 64, 128]
# Per backend: dtypes and (Lq, Lk) pairs; the C++ list adds lengths that span several of its key / query blocks and
# the split-key decode kernel (few query rows).
DTYPES = {
    "triton": [torch.float32, torch.float16, torch.bfloat16],
    "cpu": [torch.float32, torch.bfloat16],
    "sdpa": [torch.float32, torch.float16, torch.bfloat16],
}
SEQ_LENS = {
    "triton": [(1, 1), (1, 33), (7, 7), (33, 33), (7, 113), (33, 7)],
    "cpu": [(1, 1), (1, 33), (7, 7), (33, 33), (7, 113), (113, 7), (1, 600), (140, 300)],
    "sdpa": [(1, 1), (1, 33), (33, 33), (7, 113), (33, 7)],
}


def device_of(backend: str) -> torch.device:
    return DEVICE if backend in ("triton", "sdpa") else torch.device("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require(request.param)


def require(backend: str) -> str:
    if backend == "cpu" and not cpu_backend_available():  # compiled at first use when needed: a compiler is missing
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?): kernel parity is never skipped")
    return backend


# The Triton interpreter runs covering designs (module docstring); on a GPU it runs the full products.
INTERPRETED = DEVICE.type == "cpu"


def _dtype_dim_lengths(backend: str) -> list:
    """(dtype, head dim, (Lq, Lk)) triples: the full product, or for the interpreted Triton backend every dtype x
    lengths pair with the head dim ``HEAD_DIMS[(dtype index + lengths index) % 3]`` (a Latin square: all pairs meet)."""
    if backend == "triton" and INTERPRETED:
        return [
            (dt, HEAD_DIMS[(a + s) % len(HEAD_DIMS)], lengths)
            for a, dt in enumerate(DTYPES[backend])
            for s, lengths in enumerate(SEQ_LENS[backend])
        ]
    return list(itertools.product(DTYPES[backend], HEAD_DIMS, SEQ_LENS[backend]))


def _matrix(backend: str) -> list:
    """Dtype x head dim x sequence-length cases (:func:`_dtype_dim_lengths`); the remaining switches are cycled so
    that each of their values meets every dtype (the switches' own product is test_parity_switches)."""
    return [
        pytest.param(backend, dt, d, lq, lk, HEADS[i % 3], bool(i % 2), i % 5 != 0, MASK_KINDS[i % 3], i % 7 == 3)
        for i, (dt, d, (lq, lk)) in enumerate(_dtype_dim_lengths(backend))
    ]


def _switches(backend: str) -> list:
    """GQA ratio x causal x rescale x padding x zero infusion, alternately with a decode-sized and a prefill-sized
    query block; for the interpreted Triton backend the half of each ratio's 2^4 product with an even switch sum."""
    combos = itertools.product(HEADS, [False, True], [False, True], ["none", "left_pad"], [False, True])
    cases = [(*combo, 2 if i % 2 == 0 else 37) for i, combo in enumerate(combos)]
    if backend == "triton" and INTERPRETED:
        cases = [c for c in cases if (c[1] + c[2] + (c[3] != "none") + c[4]) % 2 == 0]
    return [pytest.param(backend, *case) for case in cases]


@pytest.mark.parametrize(
    "backend, dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion",
    _matrix("triton") + _matrix("cpu") + _matrix("sdpa"),
)
def test_parity_matrix(backend, dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion):
    hq, hkv = heads
    device = device_of(require(backend))
    inputs = make_attention_inputs(
        2, hq, hkv, lq, lk, d, dtype, zero_infusion=zero_infusion, seed=lq * 131 + lk, device=device
    )
    kv_mask = make_kv_mask(2, lk, mask_kind, device=device)
    check_parity(inputs, dtype, backend, causal=causal, rescale=rescale, kv_mask=kv_mask)


@pytest.mark.parametrize(
    "backend, heads, causal, rescale, mask_kind, zero_infusion, lq",
    _switches("triton") + _switches("cpu") + _switches("sdpa"),
)
def test_parity_switches(backend, heads, causal, rescale, mask_kind, zero_infusion, lq):
    hq, hkv = heads
    device = device_of(require(backend))
    inputs = make_attention_inputs(2, hq, hkv, lq, 21, 32, torch.float32, zero_infusion=zero_infusion, device=device)
    kv_mask = make_kv_mask(2, 21, mask_kind, device=device)
    check_parity(inputs, torch.float32, backend, causal=causal, rescale=rescale, kv_mask=kv_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("lq, lk", [(1, 40), (45, 45)])
def test_parity_other_dtypes(backend, dtype, lq, lk):
    device = device_of(backend)
    inputs = make_attention_inputs(2, 3, 1, lq, lk, 16, dtype, device=device)
    check_parity(inputs, dtype, backend, causal=True, kv_mask=make_kv_mask(2, lk, "random", device=device))


@pytest.mark.parametrize("d", [8, 16, 20, 72, 96])
def test_parity_other_head_dims(backend, d):
    """Head dims that are not powers of two, below a tile, or not a multiple of the C++ kernels' vector width."""
    device = device_of(backend)
    for lq in (1, 17):
        inputs = make_attention_inputs(1, 4, 2, lq, 30, d, torch.float32, seed=d, device=device)
        check_parity(inputs, torch.float32, backend, causal=True, kv_mask=make_kv_mask(1, 30, "random", device=device))


def test_parity_custom_scale_and_strided_inputs(backend):
    """Non-default scale, and q/k/v given as transposed views of (B, L, H, D) storage, as transformers produces."""
    inputs = make_attention_inputs(2, 4, 2, 13, 40, 32, torch.float32, device=device_of(backend))
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:3])
    assert not q.is_contiguous()
    check_parity([q, k, v, *inputs[3:]], torch.float32, backend, causal=True, scale=0.3)
    check_parity([q[:, :, :1], k, v, *inputs[3:]], torch.float32, backend, causal=True, scale=0.3)  # a decode step


@pytest.mark.parametrize(
    "lq, lk, causal, mask_kind, rescale",
    [(6, 10, True, "left_pad", True), (1, 10, True, "random", True), (9, 5, False, "random", False)],
)
def test_gradcheck_fp64(backend, lq, lk, causal, mask_kind, rescale):
    device = device_of(backend)
    # GQA ratio 2; batch 2 (masks that differ per sample) but 1 under the interpreter (a program per sample and head).
    batch = 1 if backend == "triton" and INTERPRETED else 2
    inputs = [x.requires_grad_() for x in make_attention_inputs(batch, 2, 1, lq, lk, 16, torch.float64, device=device)]
    kv_mask = make_kv_mask(batch, lk, mask_kind, device=device)

    def fn(*xs):
        return mit_attention(*xs, causal=causal, kv_mask=kv_mask, rescale=rescale, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gradcheck_fp64_long_keys_cpu():
    """Keys spanning several of the C++ kernels' key blocks (the Triton interpreter would take minutes)."""
    require("cpu")
    inputs = [x.requires_grad_() for x in make_attention_inputs(2, 4, 2, 12, 140, 16, torch.float64, device="cpu")]
    assert torch.autograd.gradcheck(lambda *xs: mit_attention(*xs, causal=True, backend="cpu"), inputs, fast_mode=True)


@pytest.mark.parametrize("backend_name", [pytest.param("triton", marks=pytest.mark.slow), "cpu", "sdpa"])
def test_gradcheck_fp64_full_mode(backend_name):
    backend = require(backend_name)
    inputs = make_attention_inputs(1, 2, 1, 5, 7, 8, torch.float64, device=device_of(backend))
    inputs = [x.requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(lambda *xs: mit_attention(*xs, backend=backend), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal, lq, lk", [(True, 17, 17), (True, 5, 40), (False, 17, 9), (True, 1, 33)])
def test_zero_infusion_is_plain_attention(backend, dtype, causal, lq, lk):
    """With all four infusion vectors zero the op is ordinary attention, whatever lambda is: compare with torch's
    scaled_dot_product_attention under the same (bottom-right causal + padding) mask, at the precision the same
    math has in ``dtype``."""
    batch, hq, hkv, d = 2, 4, 2, 32
    device = device_of(backend)
    inputs = make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, zero_infusion=True, device=device)
    inputs[-1] = inputs[-1] * 10  # any lambda
    q, k, v = inputs[:3]
    kv_mask = torch.ones(batch, lk, dtype=torch.bool, device=device)
    kv_mask[1, -2:] = False  # right padding: every query keeps at least one key
    allowed = kv_mask[:, None, None, :]
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        allowed = allowed & (j <= i + lk - lq)
    assert allowed.any(-1).all()

    def sdpa(q, k, v):
        rep = hq // hkv
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed
        )

    out = mit_attention(*inputs, causal=causal, kv_mask=kv_mask, backend=backend)
    expected_low = sdpa(q, k, v)
    expected64 = sdpa(q.double(), k.double(), v.double())
    assert_within_low_precision_rule("out", out, expected_low, expected64)
    if dtype == torch.float32:
        assert max_abs_err(out, expected64) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [6, 40])
def test_fully_masked_rows_give_zero_and_no_nan(backend, dtype, lq):
    batch, hq, hkv, lk, d = 2, 4, 2, 4, 32
    device = device_of(backend)
    inputs = [x.requires_grad_() for x in make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, device=device)]
    kv_mask = torch.tensor([[False, False, True, True], [False] * 4], device=device)
    out = mit_attention(*inputs, causal=True, kv_mask=kv_mask, backend=backend)
    # Sample 1 sees nothing; in sample 0, query i sees keys j <= i + 4 - lq, and keys 0, 1 are padding.
    empty = lq - 2  # queries 0 .. lq - 3 see no key
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :empty], torch.zeros_like(out[0, :, :empty]))
    assert out[0, :, empty:].abs().sum() > 0
    out.float().square().sum().backward()
    for name, x in zip(INPUT_NAMES, inputs):
        assert torch.isfinite(x.grad).all(), name
    dq = inputs[0].grad
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dq[0, :, :empty], torch.zeros_like(dq[0, :, :empty]))
    # Keys 0 and 1 of sample 0 and all keys of sample 1 are never attended: no gradient reaches them.
    for grad in (inputs[1].grad, inputs[2].grad):
        assert grad[1].abs().sum() == 0 and grad[0, :, :2].abs().sum() == 0


def static_cache_mask(batch: int, lk: int, used: list[int], device: torch.device) -> torch.Tensor:
    """(B, Lk) key mask of a static KV cache of ``lk`` slots: sample b holds ``used[b]`` keys, after b * 5 slots of
    left padding; its unused tail is masked, and sample 1 has a masked hole in the middle (a custom mask)."""
    mask = torch.zeros(batch, lk, dtype=torch.bool)
    for b in range(batch):
        mask[b, b * 5 : b * 5 + used[b]] = True
    mask[1, 9:12] = False
    return mask.to(device)


@pytest.mark.parametrize("lq", [1, 3])
def test_static_cache_masked_keys_change_nothing(backend, lq):
    """A static cache's unused slots and left padding, filled with junk (huge finite values): output and gradients
    as the reference's (the fused decode kernels never read those keys), and the same output as the cache cut to the
    slots in use (bit for bit for the C++ kernel at batch 1: the same keys in the same order)."""
    batch, hq, hkv, d, dtype = 3, 3, 1, 32, torch.float32  # G * Lq <= 32: the decode kernels
    lk, used = (700, [40, 300, 3]) if backend == "cpu" else (80, [20, 50, 3])  # (C++: several key splits)
    device = device_of(backend)
    inputs = make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, seed=5, device=device)
    kv_mask = static_cache_mask(batch, lk, used, device)
    for x in inputs[1:3]:
        x.masked_fill_(~kv_mask[:, None, :, None], 1e4)
    check_parity(inputs, dtype, backend, causal=True, kv_mask=kv_mask)
    # Non-finite junk: the decoding call (no grad) is still the reference's, and nothing non-finite leaks.
    for x in inputs[1:3]:
        x.masked_fill_(~kv_mask[:, None, :, None], float("nan"))
    inputs[1][0, 0, -1] = float("inf")
    with torch.no_grad():
        out = mit_attention(*inputs, causal=True, kv_mask=kv_mask, backend=backend)
        expected = mit_attention(*[x.double() for x in inputs], causal=True, kv_mask=kv_mask, backend="reference")
    assert torch.isfinite(out).all()
    assert max_abs_err(out, expected) < 1e-5
    if backend == "cpu":
        cut = [x[:1, :, : used[0]] if i in (1, 2) else x[:1] for i, x in enumerate(inputs)]
        with torch.no_grad():
            whole = mit_attention(*[x[:1] for x in inputs], causal=True, kv_mask=kv_mask[:1], backend=backend)
            # (bottom-right causal on the cut cache would hide its last keys from the first rows: every row of the
            # whole cache sees all of them)
            short = mit_attention(*cut, causal=lq == 1, kv_mask=kv_mask[:1, : used[0]], backend=backend)
        assert torch.equal(whole, short)


@pytest.mark.parametrize("backend_name", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(backend_name, dtype):
    """GQA heads add their dK', dV' contributions in a fixed order and the vector gradients are reduced in a fixed
    order (no atomics): two runs agree bit for bit."""
    backend = require(backend_name)
    length = 40 if backend == "triton" else 300  # several key / query tiles either way
    # Heads sharing a KV head add up (GQA ratio 3; 2 on one sample under the interpreter: a program per sample / head).
    batch, hq = (1, 4) if backend == "triton" and INTERPRETED else (2, 6)
    device = device_of(backend)
    inputs = make_attention_inputs(batch, hq, 2, length, length, 32, dtype, device=device)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    kv_mask = make_kv_mask(batch, length, "random", device=device)
    first_out, first = run_attention(inputs, grad_out, backend, causal=True, kv_mask=kv_mask)
    second_out, second = run_attention(inputs, grad_out, backend, causal=True, kv_mask=kv_mask)
    assert torch.equal(first_out, second_out)
    for name, a, b in zip(INPUT_NAMES, first, second):
        assert torch.equal(a, b), name
