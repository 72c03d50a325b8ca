"""The fused attention and FFN gate as torch.library ops, for every backend (``triton``, ``cpu``): schema / fake /
autograd registration (opcheck), FLOP counting (also on the meta device), torch.compile with fullgraph."""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE, make_attention_inputs, make_kv_mask
from torch.utils.flop_counter import FlopCounterMode

import mit_kernels  # noqa: F401  (registers the ops)
from mit_kernels import mit_attention
from mit_kernels.dispatch import cpu_backend_available

OPS = {  # backend -> (attention forward op, FFN gate forward op, device)
    "triton": ("attention_triton_fwd", "ffn_gate_triton_fwd", DEVICE),
    "cpu": ("attention_cpu_fwd", "ffn_gate_cpu_fwd", torch.device("cpu")),
}


@pytest.fixture(params=sorted(OPS))
def backend(request) -> str:
    if request.param == "cpu" and not cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?)")
    return request.param


def op(name: str):
    return getattr(torch.ops.mit_kernels, name).default


def test_opcheck(backend):
    attention, ffn_gate, device = OPS[backend]
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 4, 2, 5, 9, 16, torch.float32, device=device)]
    kv_mask = make_kv_mask(1, 9, "random", device=device)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op(attention), (*inputs, kv_mask, True, 0.25, True), test_utils=utils)
    gen = torch.Generator().manual_seed(0)
    ffn_inputs = [torch.randn(*s, generator=gen).to(device).requires_grad_() for s in ((2, 3, 5), (2, 3, 5), (2, 5))]
    torch.library.opcheck(op(ffn_gate), tuple(ffn_inputs), test_utils=utils)


@pytest.mark.parametrize("batch, hq, hkv, lq, lk, d", [(2, 4, 2, 7, 33, 32), (1, 9, 3, 1, 40, 64)])
def test_flop_counter_counts_the_matmuls(backend, batch, hq, hkv, lq, lk, d):
    """Forward 4 B Hq Lq Lk D (the reference's two matmuls) and backward 10 B Hq Lq Lk D (torch's convention for the
    scaled_dot_product_attention backward, score recomputation included), with Hq heads."""
    inputs = make_attention_inputs(batch, hq, hkv, lq, lk, d, torch.float32, device=OPS[backend][2])
    inputs = [x.requires_grad_() for x in inputs]
    with FlopCounterMode(display=False) as counter:
        out = mit_attention(*inputs, causal=False, backend=backend)
    assert counter.get_total_flops() == 4 * batch * hq * lq * lk * d
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.ones_like(out))
    assert counter.get_total_flops() == 10 * batch * hq * lq * lk * d

    with FlopCounterMode(display=False) as reference_counter:
        mit_attention(*inputs, causal=False, backend="reference")
    assert reference_counter.get_total_flops() == 4 * batch * hq * lq * lk * d  # the reference's two matmuls


def test_flop_counter_on_meta_device(backend):
    """The fake implementation lets FLOPs be counted without memory or compute (benchmarks/flops.py relies on it)."""
    inputs = make_attention_inputs(1, 32, 8, 128, 128, 128, torch.float32, device=torch.device("cpu"))
    meta = [x.to("meta") for x in inputs]
    with FlopCounterMode(display=False) as counter:
        out = op(OPS[backend][0])(*meta, None, True, 128**-0.5, True)[0]
    assert out.device.type == "meta" and out.shape == (1, 32, 128, 128)
    assert counter.get_total_flops() == 4 * 32 * 128 * 128 * 128


def test_torch_compile_fullgraph_forward_and_backward(backend):
    device = OPS[backend][2]
    inputs = make_attention_inputs(2, 4, 2, 9, 9, 32, torch.float32, device=device)
    kv_mask = make_kv_mask(2, 9, "left_pad", device=device)

    def layer(q, k, v, k_mul, k_add, v_mul, v_add, head_logit):
        return mit_attention(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask=kv_mask, backend=backend) * 2

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


def test_output_is_contiguous_and_on_input_device(backend):
    device = OPS[backend][2]
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    inputs = make_attention_inputs(1, 2, 1, 3, 5, 16, dtype, device=device)
    out = mit_attention(*inputs, backend=backend)
    assert out.is_contiguous() and out.device.type == device.type and out.dtype == dtype
