"""The compiled C++ CPU backend (``backend="cpu"``, ``mit_kernels.cpu_backend``): forward and all eight attention
gradients against the fp64 reference, fp64 gradcheck through the C++ code, the FFN gate, determinism, the torch.library
registration, backend selection and input errors.

The extension is built by ``pip install .`` (or ``python setup.py build_ext --inplace`` in a checkout). Unless
MIT_SKIP_CPU_EXT is set, a missing extension is a failure (test_extension_is_built), not a skip."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    INPUT_NAMES,
    assert_within_low_precision_rule,
    make_attention_inputs,
    make_kv_mask,
    max_abs_err,
    reduction_magnitudes,
    run_attention,
)
from torch.utils.flop_counter import FlopCounterMode

import mit_kernels
from mit_kernels import mit_attention, resolve_backend
from mit_kernels.dispatch import cpu_backend_available
from mit_kernels.reference import mit_attention_reference

CPU = torch.device("cpu")
SKIP_REQUESTED = os.environ.get("MIT_SKIP_CPU_EXT", "").strip().lower() in ("1", "true", "yes", "on")

requires_ext = pytest.mark.skipif(
    not cpu_backend_available(), reason="the C++ CPU kernels cannot be built here (no compiler?)"
)


def test_extension_is_built():
    """Without MIT_SKIP_CPU_EXT the install builds the extension, and "auto" then runs it for CPU tensors."""
    if SKIP_REQUESTED:
        pytest.skip("MIT_SKIP_CPU_EXT is set: the install skipped the C++ extension on purpose")
    from mit_kernels import cpu_backend

    assert cpu_backend.available(), cpu_backend.unavailable_reason()
    info = cpu_backend.extension_info()
    assert info["built"] and info["num_threads"] >= 1 and "-O3" in info["compile_flags"]
    assert resolve_backend("auto", CPU) == "cpu"


# --------------------------------------------------------------------------------------------------------------------
# Attention parity with the fp64 reference
# --------------------------------------------------------------------------------------------------------------------


def check_parity(inputs, dtype, **kwargs):
    """The C++ backend in ``dtype`` vs the reference in ``dtype`` and in fp64, by the low-precision tolerance rule
    (for fp32 that rule is tight: twice the fp32 reference's own error plus a few ulps)."""
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(dtype)
    out64, grads64 = run_attention([x.double() for x in inputs], grad_out.double(), "reference", **kwargs)
    out_low, grads_low = run_attention(inputs, grad_out, "reference", **kwargs)
    out_cpu, grads_cpu = run_attention(inputs, grad_out, "cpu", **kwargs)
    assert out_cpu.dtype == dtype and out_cpu.shape == inputs[0].shape and out_cpu.is_contiguous()
    magnitude = max(x.abs().max().item() for x in (out64, *grads64))
    sums = reduction_magnitudes([x.double() for x in inputs], grad_out.double(), **kwargs)
    assert_within_low_precision_rule("out", out_cpu, out_low, out64, magnitude)
    for name, got, low, ref, sum_mag in zip(INPUT_NAMES, grads_cpu, grads_low, grads64, sums):
        assert got.dtype == low.dtype and got.shape == low.shape, name
        assert_within_low_precision_rule(f"d{name}", got, low, ref, max(magnitude, sum_mag))


HEADS = [(2, 2), (3, 1), (4, 1)]  # GQA ratios 1, 3, 4
MASK_KINDS = ["none", "left_pad", "random"]
# Decode-sized rows (few query rows: the split-key decode kernel) and prefill-sized ones (the blocked kernel), odd
# lengths, Lq < Lk and Lq > Lk, and lengths spanning several key / query blocks of both kernels.
SEQ_LENS = [(1, 1), (1, 33), (7, 7), (33, 33), (7, 113), (113, 7), (1, 600), (140, 300)]
_MATRIX = list(itertools.product([torch.float32, torch.bfloat16], [32, 64, 128], SEQ_LENS))


@requires_ext
@pytest.mark.parametrize(
    "dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion",
    [
        (dt, d, lq, lk, HEADS[i % 3], bool(i % 2), i % 5 != 0, MASK_KINDS[i % 3], i % 7 == 3)
        for i, (dt, d, (lq, lk)) in enumerate(_MATRIX)
    ],
)
def test_cpu_parity_matrix(dtype, d, lq, lk, heads, causal, rescale, mask_kind, zero_infusion):
    hq, hkv = heads
    inputs = make_attention_inputs(
        2, hq, hkv, lq, lk, d, dtype, zero_infusion=zero_infusion, seed=lq * 131 + lk, device=CPU
    )
    kv_mask = make_kv_mask(2, lk, mask_kind, device=CPU)
    check_parity(inputs, dtype, causal=causal, rescale=rescale, kv_mask=kv_mask)


@requires_ext
@pytest.mark.parametrize(
    "heads, causal, rescale, mask_kind, zero_infusion, lq",
    [
        (*combo, 2 if i % 2 == 0 else 37)  # alternately the decode and the blocked kernel
        for i, combo in enumerate(
            itertools.product(HEADS, [False, True], [False, True], ["none", "left_pad"], [False, True])
        )
    ],
)
def test_cpu_parity_switches(heads, causal, rescale, mask_kind, zero_infusion, lq):
    hq, hkv = heads
    inputs = make_attention_inputs(2, hq, hkv, lq, 21, 32, torch.float32, zero_infusion=zero_infusion, device=CPU)
    check_parity(inputs, torch.float32, causal=causal, rescale=rescale, kv_mask=make_kv_mask(2, 21, mask_kind))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("lq, lk", [(1, 40), (45, 45)])
def test_cpu_parity_other_dtypes(dtype, lq, lk):
    inputs = make_attention_inputs(2, 3, 1, lq, lk, 16, dtype, device=CPU)
    check_parity(inputs, dtype, causal=True, kv_mask=make_kv_mask(2, lk, "random"))


@requires_ext
@pytest.mark.parametrize("d", [8, 20, 72])
def test_cpu_parity_head_dims_not_multiple_of_vector_width(d):
    for lq in (1, 50):
        inputs = make_attention_inputs(1, 4, 2, lq, 30, d, torch.float32, seed=d, device=CPU)
        check_parity(inputs, torch.float32, causal=True, kv_mask=make_kv_mask(1, 30, "random"))


@requires_ext
def test_cpu_custom_scale_and_strided_inputs():
    """Non-default scale, and q/k/v given as transposed views of (B, L, H, D) storage, as transformers produces."""
    inputs = make_attention_inputs(2, 4, 2, 13, 40, 32, torch.float32, device=CPU)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:3])
    assert not q.is_contiguous()
    check_parity([q, k, v, *inputs[3:]], torch.float32, causal=True, scale=0.3)
    check_parity([q[:, :, :1], k, v, *inputs[3:]], torch.float32, causal=True, scale=0.3)  # decode kernel


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [6, 40])
def test_cpu_fully_masked_rows_give_zero_and_no_nan(dtype, lq):
    batch, hq, hkv, lk, d = 2, 4, 2, 4, 32
    inputs = [x.requires_grad_() for x in make_attention_inputs(batch, hq, hkv, lq, lk, d, dtype, device=CPU)]
    kv_mask = torch.tensor([[False, False, True, True], [False] * 4])
    out = mit_attention(*inputs, causal=True, kv_mask=kv_mask, backend="cpu")
    # Sample 1 sees nothing; in sample 0, query i sees keys j <= i + 4 - lq, and keys 0, 1 are padding.
    empty = lq - 2  # queries 0 .. lq - 3 see no key
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :empty], torch.zeros_like(out[0, :, :empty]))
    assert out[0, :, empty:].abs().sum() > 0
    out.float().square().sum().backward()
    for name, x in zip(INPUT_NAMES, inputs):
        assert torch.isfinite(x.grad).all(), name
    dq = inputs[0].grad
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(
        dq[0, :, :empty], torch.zeros_like(dq[0, :, :empty])
    )
    # Keys 0 and 1 of sample 0 and all keys of sample 1 are never attended: no gradient reaches them.
    for grad in (inputs[1].grad, inputs[2].grad):
        assert grad[1].abs().sum() == 0 and grad[0, :, :2].abs().sum() == 0


@requires_ext
@pytest.mark.parametrize("lq, lk", [(1, 33), (17, 17), (5, 40)])
def test_cpu_zero_infusion_is_plain_attention(lq, lk):
    """All four infusion vectors zero: ordinary attention whatever lambda is (torch's SDPA, same bottom-right mask)."""
    inputs = make_attention_inputs(2, 4, 2, lq, lk, 32, torch.float32, zero_infusion=True, device=CPU)
    inputs[-1] = inputs[-1] * 10
    q, k, v = inputs[:3]
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    expected = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=j <= i + lk - lq
    )
    out = mit_attention(*inputs, causal=True, backend="cpu")
    assert max_abs_err(out, expected) < 2e-6


# --------------------------------------------------------------------------------------------------------------------
# gradcheck through the C++ code, determinism
# --------------------------------------------------------------------------------------------------------------------


@requires_ext
@pytest.mark.parametrize(
    "lq, lk, causal, mask_kind, rescale",
    [
        (6, 10, True, "left_pad", True),
        (1, 10, True, "random", True),
        (9, 5, False, "random", False),
        (12, 140, True, "none", True),
    ],
)
def test_cpu_gradcheck_fp64(lq, lk, causal, mask_kind, rescale):
    inputs = [x.requires_grad_() for x in make_attention_inputs(2, 4, 2, lq, lk, 16, torch.float64, device=CPU)]
    kv_mask = make_kv_mask(2, lk, mask_kind, device=CPU)

    def fn(*xs):
        return mit_attention(*xs, causal=causal, kv_mask=kv_mask, rescale=rescale, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@requires_ext
def test_cpu_gradcheck_fp64_full_mode():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 2, 1, 5, 7, 8, torch.float64, device=CPU)]
    assert torch.autograd.gradcheck(lambda *xs: mit_attention(*xs, backend="cpu"), inputs)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_is_deterministic(dtype):
    """GQA heads add their dK', dV' contributions in a fixed order and the vector gradients are reduced in a fixed
    order: two runs agree bit for bit."""
    inputs = make_attention_inputs(2, 6, 2, 300, 300, 32, dtype, device=CPU)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    kv_mask = make_kv_mask(2, 300, "random", device=CPU)
    first_out, first = run_attention(inputs, grad_out, "cpu", causal=True, kv_mask=kv_mask)
    second_out, second = run_attention(inputs, grad_out, "cpu", causal=True, kv_mask=kv_mask)
    assert torch.equal(first_out, second_out)
    for name, a, b in zip(INPUT_NAMES, first, second):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------------


@requires_ext
def test_cpu_opcheck():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 4, 2, 5, 9, 16, torch.float32, device=CPU)]
    kv_mask = make_kv_mask(1, 9, "random", device=CPU)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.mit_kernels.attention_cpu_fwd.default, (*inputs, kv_mask, True, 0.25, True), test_utils=utils
    )
    ffn_inputs = [
        torch.randn(2, 3, 5, requires_grad=True),
        torch.randn(2, 3, 5, requires_grad=True),
        torch.randn(2, 5, requires_grad=True),
    ]
    torch.library.opcheck(torch.ops.mit_kernels.ffn_gate_cpu_fwd.default, tuple(ffn_inputs), test_utils=utils)


@requires_ext
@pytest.mark.parametrize("lq", [1, 7])
def test_cpu_flop_counter(lq):
    batch, hq, hkv, lk, d = 2, 4, 2, 33, 32
    inputs = [x.requires_grad_() for x in make_attention_inputs(batch, hq, hkv, lq, lk, d, torch.float32, device=CPU)]
    with FlopCounterMode(display=False) as counter:
        out = mit_attention(*inputs, causal=False, backend="cpu")
    assert counter.get_total_flops() == 4 * batch * hq * lq * lk * d
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.ones_like(out))
    assert counter.get_total_flops() == 10 * batch * hq * lq * lk * d


@requires_ext
def test_cpu_flop_counter_on_meta_device():
    meta = [x.to("meta") for x in make_attention_inputs(1, 8, 2, 64, 64, 64, torch.float32, device=CPU)]
    with FlopCounterMode(display=False) as counter:
        out = torch.ops.mit_kernels.attention_cpu_fwd(*meta, None, True, 0.125, True)[0]
    assert out.device.type == "meta" and out.shape == (1, 8, 64, 64)
    assert counter.get_total_flops() == 4 * 8 * 64 * 64 * 64


@requires_ext
def test_cpu_torch_compile_fullgraph_forward_and_backward():
    inputs = make_attention_inputs(2, 4, 2, 9, 9, 32, torch.float32, device=CPU)
    kv_mask = make_kv_mask(2, 9, "left_pad", device=CPU)

    def layer(q, k, v, k_mul, k_add, v_mul, v_add, head_logit):
        return mit_attention(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask=kv_mask, backend="cpu") * 2

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    eager_leaves = [x.clone().requires_grad_() for x in inputs]
    compiled_leaves = [x.clone().requires_grad_() for x in inputs]
    expected = layer(*eager_leaves)
    got = compiled(*compiled_leaves)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected.sum().backward()
    got.sum().backward()
    for a, b in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


@requires_ext
def test_cpu_no_grad_call_matches_and_builds_no_graph():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 3, 1, 1, 50, 32, torch.float32, device=CPU)]
    with torch.no_grad():
        out = mit_attention(*inputs, backend="cpu")
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, mit_attention_reference(*inputs).detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# FFN gate
# --------------------------------------------------------------------------------------------------------------------


def _ffn_inputs(batch, l, f, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    return [rand(batch, l, f, scale=2.0), rand(batch, l, f), rand(batch, f, scale=0.5)]


def _ffn_run(inputs, grad_out, fn):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, l, f", [(1, 1, 1), (2, 7, 17), (3, 65, 1031), (1, 130, 2053)])
def test_cpu_ffn_gate_parity(dtype, batch, l, f):
    """Odd L and F, L spanning several d ffn_mul partial-sum chunks (64 rows) and F several column chunks (1024)."""
    from mit_kernels import cpu_backend
    from mit_kernels.reference import mit_ffn_gate_reference

    inputs = _ffn_inputs(batch, l, f, dtype, seed=l + f)
    grad_out = torch.randn(batch, l, f, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out64, grads64 = _ffn_run([x.double() for x in inputs], grad_out, mit_ffn_gate_reference)
    out_low, grads_low = _ffn_run(inputs, grad_out.to(dtype), mit_ffn_gate_reference)
    out_cpu, grads_cpu = _ffn_run(inputs, grad_out.to(dtype), cpu_backend.ffn_gate)
    assert_within_low_precision_rule("out", out_cpu, out_low, out64)
    g, u = (x.double() for x in inputs[:2])
    sum_of_terms = (grad_out.to(dtype).double() * F.silu(g) * u).abs().sum(dim=1).max().item()
    for name, got, low, ref in zip(("gate", "up", "ffn_mul"), grads_cpu, grads_low, grads64):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_within_low_precision_rule(f"d{name}", got, low, ref, sum_of_terms if name == "ffn_mul" else 1.0)


@requires_ext
def test_cpu_ffn_gate_gradcheck_fp64_and_strided_inputs():
    from mit_kernels import cpu_backend

    inputs = [x.requires_grad_() for x in _ffn_inputs(2, 5, 7, torch.float64)]
    assert torch.autograd.gradcheck(cpu_backend.ffn_gate, inputs)
    # gate / up as halves of a fused projection (row stride 2F), a transposed ffn_mul, an expanded grad_out.
    gate_up = torch.randn(2, 11, 2 * 37, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    ffn_mul = torch.randn(37, 2, dtype=torch.float64).t()
    leaves = [x.detach().clone().requires_grad_() for x in (gate, up, ffn_mul)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in (gate, up, ffn_mul)]
    cpu_backend.ffn_gate(*leaves).sum().backward()
    (F.silu(ref_leaves[0]) * ref_leaves[1] * (1 + ref_leaves[2][:, None, :])).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Backend selection and errors
# --------------------------------------------------------------------------------------------------------------------


def test_cpu_backend_rejects_non_cpu_tensors():
    meta = [x.to("meta") for x in make_attention_inputs(1, 2, 1, 3, 4, 8, torch.float32, device=CPU)]
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, got device meta"):
        mit_attention(*meta, backend="cpu")


def test_cpu_backend_missing_extension_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mit_kernels.cpu_backend", None)  # makes the import raise ImportError
    monkeypatch.delattr(mit_kernels, "cpu_backend", raising=False)
    assert resolve_backend("auto", CPU) == "reference"
    with pytest.raises(
        ValueError, match=r"backend='cpu' needs the compiled C\+\+ kernels.*python -m mit_kernels build"
    ):
        mit_attention(*make_attention_inputs(1, 2, 1, 3, 4, 8, torch.float32, device=CPU), backend="cpu")


def test_unknown_backend_lists_cpu():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cpu'"):
        resolve_backend("cuda", CPU)


def test_main_module_reports_backends(capsys):
    from mit_kernels.__main__ import main

    assert main([]) == 0
    text = capsys.readouterr().out
    assert "torch:" in text and "C++ extension:" in text and "auto picks:" in text
    assert ("CPU tensors -> 'cpu'" in text) == cpu_backend_available()
