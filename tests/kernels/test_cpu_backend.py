"""The compiled C++ CPU backend (``backend="cpu"``, ``mit_kernels.cpu_backend``): the build, the FFN gate's parity and
gradcheck, no-grad calls, backend selection and input errors. Its attention parity, gradcheck, determinism and op
registration are tested with every backend in tests/test_parity.py and tests/kernels/test_op_registration.py.

The kernels are compiled for the running torch by ``pip install .`` or at first use. Unless MIT_SKIP_CPU_EXT is set, a
missing build is a failure (test_extension_is_built), not a skip."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    assert_within_low_precision_rule,
    make_attention_inputs,
)

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


# Attention parity, gradcheck, determinism, opcheck, FLOP counting and torch.compile of the C++ kernels run with the
# Triton kernels' in tests/test_parity.py and tests/kernels/test_op_registration.py, parametrised over backends.


@requires_ext
def test_cpu_no_grad_call_matches_and_builds_no_graph():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 3, 1, 1, 50, 32, torch.float32, device=CPU)]
    with torch.no_grad():
        out = mit_attention(*inputs, backend="cpu")
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, mit_attention_reference(*inputs).detach(), rtol=1e-5, atol=1e-6)


@requires_ext
@pytest.mark.parametrize("lq", [1, 40])  # the decode kernel and the blocked one
def test_cpu_ops_without_a_graph_compute_what_the_recording_call_computes(lq):
    """The autograd kernels of the C++ ops skip torch's autograd Function when no graph is recorded (no_grad,
    inference mode, or no input requiring grad): the forward must be bit for bit the recording call's, and only the
    recording call may return a graph."""
    from mit_kernels import cpu_backend, mit_ffn_gate

    inputs = [x.requires_grad_() for x in make_attention_inputs(2, 6, 2, lq, 50, 32, torch.float32, device=CPU)]
    recorded = cpu_backend.attention(*inputs, None, True, None, True)
    assert recorded.grad_fn is not None
    detached = [x.detach() for x in inputs]
    gate, up = torch.randn(2, lq, 96), torch.randn(2, lq, 96)
    ffn_mul = torch.randn(2, 96, requires_grad=True)
    recorded_ffn = mit_ffn_gate(gate, up, ffn_mul, backend="cpu")
    assert recorded_ffn.grad_fn is not None
    for context in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with context():
            out = cpu_backend.attention(*(detached if context is torch.enable_grad else inputs), None, True, None, True)
            ffn = mit_ffn_gate(gate, up, ffn_mul.detach() if context is torch.enable_grad else ffn_mul, backend="cpu")
        assert out.grad_fn is None and not out.requires_grad and ffn.grad_fn is None, context
        assert torch.equal(out, recorded.detach()) and torch.equal(ffn, recorded_ffn.detach()), context


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
