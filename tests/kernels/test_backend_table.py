"""The kernel front end's two patterns (docs/extending.md): one backend table that both public ops read, so that a
backend is one entry; and one torch.library registration for every fused op pair (fake kernel, autograd with the
double-backward refusal and the ``fallback`` path, FLOP formulas, all from the operator's kind)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_attention_inputs
from torch.utils.flop_counter import FlopCounterMode

import mit_kernels
from mit_kernels import backends, dispatch, mit_attention, mit_ffn_gate
from mit_kernels.backends import BACKEND_TABLE, Backend
from mit_kernels.op_kinds import FFN_GATE
from mit_kernels.reference import mit_attention_reference, mit_ffn_gate_reference
from mit_kernels.registration import Fallback, define_op_pair

CPU = torch.device("cpu")


def _ffn_inputs(batch=2, length=3, features=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, length, features), (batch, length, features), (batch, features))
    return [torch.randn(*shape, generator=gen, dtype=dtype) for shape in shapes]


# --------------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------------


def test_the_names_backend_accepts_are_auto_and_the_table():
    assert tuple(BACKEND_TABLE) == ("reference", "triton", "cpu", "sdpa")
    assert mit_kernels.BACKENDS == backends.BACKENDS == ("auto", *BACKEND_TABLE)


def test_a_backend_is_one_table_entry(monkeypatch):
    """An entry (two functions and a refusal) is all both public ops need: they run it, resolve checks its refusal,
    the unknown-name error lists it."""
    calls = []

    def attention(*args, **kwargs):
        calls.append("attention")
        return mit_attention_reference(*args, **kwargs)

    def ffn_gate(gate, up, ffn_mul):
        calls.append("ffn_gate")
        return mit_ffn_gate_reference(gate, up, ffn_mul)

    def refusal(device, head_dim):
        return None if head_dim is None or head_dim <= 16 else f"backend='toy' supports D <= 16, got D={head_dim}"

    monkeypatch.setitem(BACKEND_TABLE, "toy", Backend(attention=attention, ffn_gate=ffn_gate, refusal=refusal))
    monkeypatch.setattr(backends, "BACKENDS", (*backends.BACKENDS, "toy"))
    inputs = make_attention_inputs(1, 2, 1, 3, 5, 16, torch.float64, device=CPU)
    assert torch.equal(mit_attention(*inputs, backend="toy"), mit_attention_reference(*inputs))
    gate = _ffn_inputs()
    assert torch.equal(mit_ffn_gate(*gate, backend="toy"), mit_ffn_gate_reference(*gate))
    assert calls == ["attention", "ffn_gate"]
    wide = make_attention_inputs(1, 2, 1, 3, 5, 32, torch.float64, device=CPU)
    with pytest.raises(ValueError, match=r"backend='toy' supports D <= 16, got D=32"):
        mit_attention(*wide, backend="toy")
    with pytest.raises(ValueError, match=r"backend must be one of \(.*'sdpa', 'toy'\), got 'nope'"):
        mit_ffn_gate(*gate, backend="nope")


def test_auto_runs_the_backend_s_auto_functions_only_under_auto():
    triton = BACKEND_TABLE["triton"]
    assert triton.attention_for("auto") is triton.attention_under_auto
    assert triton.attention_for("triton") is triton.attention
    assert triton.ffn_gate_for("auto") is triton.ffn_gate_under_auto
    assert triton.ffn_gate_for("triton") is triton.ffn_gate
    reference = BACKEND_TABLE["reference"]
    assert reference.attention_for("auto") is reference.attention is mit_attention_reference
    assert reference.ffn_gate_for("auto") is reference.ffn_gate is mit_ffn_gate_reference


# --------------------------------------------------------------------------------------------------------------------
# Every registered op pair: fake kernels and FLOP formulas on the meta device
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["attention_triton", "attention_cpu", "reference_attention"])
def test_attention_op_pairs_run_on_meta_and_count_flops(name):
    if name == "attention_cpu" and not dispatch.cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?)")
    b, hq, hkv, lq, lk, d = 2, 4, 2, 3, 7, 16
    inputs = [x.to("meta") for x in make_attention_inputs(b, hq, hkv, lq, lk, d, torch.float32, device=CPU)]
    forward, backward = (getattr(torch.ops.mit_kernels, f"{name}_{s}") for s in ("fwd", "bwd"))
    q, k, v = inputs[:3]
    grad_out = torch.empty_like(q)
    with FlopCounterMode(display=False) as counter:
        if name == "reference_attention":
            out = forward(q, k, v, None, True, 0.25)
            grads = backward(grad_out, q, k, v, None, True, 0.25)
            like = (q, k, v)
        else:
            out, lse = forward(*inputs, None, True, 0.25, True)
            assert lse.shape == (b, hq, lq) and lse.dtype == torch.float32 and lse.device.type == "meta"
            grads = backward(grad_out, *inputs, None, out, lse, True, 0.25, True)
            like = inputs
    assert out.shape == q.shape and out.device.type == "meta"
    assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in like]
    assert counter.get_total_flops() == (4 + 10) * b * hq * lq * lk * d


@pytest.mark.parametrize("name", ["ffn_gate_triton", "ffn_gate_cpu"])
def test_ffn_gate_op_pairs_run_on_meta_and_count_flops(name):
    if name == "ffn_gate_cpu" and not dispatch.cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?)")
    gate, up, ffn_mul = (x.to("meta") for x in _ffn_inputs(2, 3, 5, torch.bfloat16))
    forward, backward = (getattr(torch.ops.mit_kernels, f"{name}_{s}") for s in ("fwd", "bwd"))
    with FlopCounterMode(display=False) as counter:
        out = forward(gate, up, ffn_mul)
        grads = backward(torch.empty_like(out), gate, up, ffn_mul)
    assert out.shape == gate.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert [g.shape for g in grads] == [gate.shape, up.shape, ffn_mul.shape]
    assert counter.get_total_flops() == (6 + 15) * 2 * 3 * 5


# --------------------------------------------------------------------------------------------------------------------
# define_op_pair on a toy backend's FFN gate: what a new backend gets from one call
# --------------------------------------------------------------------------------------------------------------------


class ToyKernelError(RuntimeError):
    """The toy backward kernel "cannot be launched"."""


TOY = {"fail": False, "recorded": []}


def _toy_forward(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor, fallback: bool = False) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up * (1 + ffn_mul[:, None, :])


def _toy_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if TOY["fail"]:
        raise ToyKernelError("no kernel image")
    s = torch.sigmoid(gate)
    scale = 1 + ffn_mul[:, None, :]
    d_gate = grad_out * up * scale * s * (1 + gate * (1 - s))
    return d_gate, grad_out * gate * s * scale, (grad_out * gate * s * up).sum(dim=1)


toy_fwd, toy_bwd = define_op_pair(
    "mit_kernels_test::ffn_gate_toy", FFN_GATE, _toy_forward, _toy_backward, backend="toy",
    fallback=Fallback(
        is_failure=lambda exc: isinstance(exc, ToyKernelError),
        record=lambda device, exc: TOY["recorded"].append((str(device), str(exc))),
        forward=mit_ffn_gate_reference,
    ),
)  # fmt: skip


@pytest.fixture
def toy():
    TOY.update(fail=False, recorded=[])
    yield TOY
    TOY.update(fail=False, recorded=[])


def test_define_op_pair_gives_schema_fake_autograd_and_flops(toy):
    inputs = [x.requires_grad_() for x in _ffn_inputs()]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mit_kernels_test.ffn_gate_toy_fwd.default, tuple(inputs), test_utils=utils)
    assert torch.autograd.gradcheck(toy_fwd, inputs)
    with FlopCounterMode(display=False) as counter:
        toy_fwd(*inputs).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.mit_kernels_test.ffn_gate_toy_fwd] == 6 * 2 * 3 * 5
    assert counts[torch.ops.mit_kernels_test.ffn_gate_toy_bwd] == 15 * 2 * 3 * 5


def test_a_failing_backward_falls_back_only_when_the_forward_said_so(toy):
    inputs = _ffn_inputs()
    expected = torch.autograd.grad(mit_ffn_gate_reference(*[x.requires_grad_() for x in inputs]), inputs, inputs[0])
    toy["fail"] = True
    leaves = [x.detach().requires_grad_() for x in inputs]
    got = torch.autograd.grad(toy_fwd(*leaves, True), leaves, inputs[0].detach())
    assert toy["recorded"] == [("cpu", "no kernel image")]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    leaves = [x.detach().requires_grad_() for x in inputs]
    with pytest.raises(ToyKernelError, match="no kernel image"):
        toy_fwd(*leaves).sum().backward()
    assert len(toy["recorded"]) == 1


def test_double_backward_is_refused_naming_the_op_and_backend(toy):
    leaves = [x.requires_grad_() for x in _ffn_inputs()]
    out = toy_fwd(*leaves)
    with pytest.raises(RuntimeError, match=r"mit_kernels_test::ffn_gate_toy_fwd \(backend='toy'\) does not support"):
        torch.autograd.grad(out.sum(), leaves, create_graph=True)
