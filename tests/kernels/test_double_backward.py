"""Second-order gradients (create_graph=True): exact through the reference (gradgradcheck), a clear RuntimeError
through the fused backends and the sdpa backend (torch's SDPA backward has no derivative), never silently 0."""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE, make_attention_inputs

from mit_kernels import mit_attention
from mit_kernels.dispatch import cpu_backend_available
from mit_kernels.ffn import mit_ffn_gate


def _device(backend: str) -> torch.device:
    if backend == "cpu" and not cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?)")
    return torch.device("cpu") if backend in ("cpu", "reference") else DEVICE


def _attention_leaves(device):
    inputs = make_attention_inputs(1, 2, 1, 3, 4, 5, torch.float64, device=device)
    return [x.clone().requires_grad_() for x in inputs]


def _ffn_leaves(device):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 4), (1, 3, 4), (1, 4)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_() for s in shapes]


def test_reference_attention_passes_gradgradcheck():
    leaves = _attention_leaves(torch.device("cpu"))
    mask = torch.tensor([[False, True, True, True]])

    def op(*xs):
        return mit_attention(*xs, kv_mask=mask, backend="reference")

    assert torch.autograd.gradgradcheck(op, leaves)


def test_reference_ffn_gate_passes_gradgradcheck():
    assert torch.autograd.gradgradcheck(lambda *xs: mit_ffn_gate(*xs, backend="reference"), _ffn_leaves("cpu"))


def test_reference_second_order_gradient_is_not_zero():
    """The issue's symptom: a nonzero second-order gradient (the C++ op returned exactly 0)."""
    leaves = _attention_leaves(torch.device("cpu"))
    out = mit_attention(*leaves, backend="reference")
    first = torch.autograd.grad((out**2).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in first), leaves[0])[0]
    assert second.abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_attention_refuses_double_backward(backend):
    leaves = _attention_leaves(_device(backend))
    out = mit_attention(*leaves, backend=backend)
    op = f"mit_kernels::attention_{backend}_fwd \\(backend='{backend}'\\) does not support double backward"
    with pytest.raises(RuntimeError, match=op + r".*Use backend='reference'"):
        first = torch.autograd.grad((out**2).sum(), leaves, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in first), leaves[0])
    # A plain backward (no create_graph) still works.
    out = mit_attention(*leaves, backend=backend)
    grads = torch.autograd.grad((out**2).sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_ffn_gate_refuses_double_backward(backend):
    leaves = _ffn_leaves(_device(backend))
    y = mit_ffn_gate(*leaves, backend=backend)
    op = f"mit_kernels::ffn_gate_{backend}_fwd \\(backend='{backend}'\\) does not support double backward"
    with pytest.raises(RuntimeError, match=op + r".*Use backend='reference'"):
        first = torch.autograd.grad((y**2).sum(), leaves, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in first), leaves[0])


@pytest.mark.parametrize("nonfinite", [False, True])
def test_sdpa_attention_refuses_double_backward(nonfinite):
    """torch's SDPA backward kernels have no derivative (on CPU and CUDA); the sdpa backend refuses like the fused
    backends, also when non-finite inputs send it to the reference path, so the answer does not depend on the data."""
    leaves = _attention_leaves(DEVICE)
    if nonfinite:
        with torch.no_grad():
            leaves[2][0, 0, 1, 0] = float("nan")
    out = mit_attention(*leaves, backend="sdpa")
    op = r"torch\.nn\.functional\.scaled_dot_product_attention \(backend='sdpa'\) does not support double backward"
    with pytest.raises(RuntimeError, match=op + r".*Use backend='reference'"):
        first = torch.autograd.grad((out**2).sum(), leaves, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in first), leaves[0])
    # A plain backward (no create_graph) still works.
    out = mit_attention(*leaves, backend="sdpa")
    grads = torch.autograd.grad((out**2).sum(), leaves)
    assert nonfinite or all(torch.isfinite(g).all() for g in grads)
