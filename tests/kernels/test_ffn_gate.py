"""The FFN infusion gate ``silu(gate) * up * (1 + ffn_mul)``: the reference against closed-form gradients, the Triton
kernels (the interpreter on CPU, the real thing on a GPU) against the fp64 reference, the torch.library registration,
backend selection and input validation."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from attention_cases import DEVICE, assert_within_low_precision_rule
from torch.utils.flop_counter import FlopCounterMode

import mit_kernels
from mit_kernels import dispatch
from mit_kernels.dispatch import cpu_backend_available
from mit_kernels.ffn import mit_ffn_gate, resolve_ffn_backend
from mit_kernels.reference import mit_ffn_gate_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEATURES = [1, 17, 96, 1536]
SEQ_LENS = [1, 7, 33]
BATCHES = [1, 3]
GRAD_NAMES = ("gate", "up", "ffn_mul")


def make_ffn_inputs(
    batch: int, l: int, f: int, dtype: torch.dtype, *, seed: int = 0, zero_mul: bool = False
) -> list[torch.Tensor]:
    """[gate, up, ffn_mul]: gate spans silu's curved region (std 2), ffn_mul is O(0.5) (0 with zero_mul)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return [rand(batch, l, f, scale=2.0), rand(batch, l, f), rand(batch, f, scale=0.0 if zero_mul else 0.5)]


def run_ffn(inputs, grad_out, backend):
    """Output and the three gradients of mit_ffn_gate."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = mit_ffn_gate(*leaves, backend=backend)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def check_parity(inputs, dtype, backend="triton"):
    """``backend`` in ``dtype`` vs the reference in ``dtype`` and in fp64, by the low-precision tolerance rule."""
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(inputs[0].device)
    out64, grads64 = run_ffn([x.double() for x in inputs], grad_out, "reference")
    out_low, grads_low = run_ffn(inputs, grad_out.to(dtype), "reference")
    out_got, grads_got = run_ffn(inputs, grad_out.to(dtype), backend)
    assert out_got.dtype == dtype and out_got.shape == inputs[0].shape
    assert_within_low_precision_rule("out", out_got, out_low, out64)
    # d ffn_mul sums L terms that may cancel: its roundoff floor is set by the sum of their magnitudes.
    g, u = (x.double() for x in inputs[:2])
    sum_of_terms = (grad_out.to(dtype).double() * F.silu(g) * u).abs().sum(dim=1).max().item()
    for name, got, low, ref in zip(GRAD_NAMES, grads_got, grads_low, grads64):
        assert got.dtype == dtype and got.shape == ref.shape, name
        magnitude = sum_of_terms if name == "ffn_mul" else 1.0
        assert_within_low_precision_rule(f"d{name}", got, low, ref, magnitude)


# --------------------------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------------------------


def test_reference_matches_closed_form_gradients():
    """The reference (plain autograd) against the docstring's equations, written out by hand in fp64."""
    gate, up, ffn_mul = make_ffn_inputs(2, 5, 7, torch.float64)
    dy = torch.randn(gate.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    s = 1.0 / (1.0 + torch.exp(-gate))
    scale = 1.0 + ffn_mul[:, None, :]
    out, (d_gate, d_up, d_mul) = run_ffn([gate, up, ffn_mul], dy, "reference")
    torch.testing.assert_close(out, gate * s * up * scale, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(d_gate, dy * scale * up * s * (1 + gate * (1 - s)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_up, dy * scale * gate * s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_mul, (dy * gate * s * up).sum(dim=1), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Triton against the fp64 reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, f, l, batch", list(itertools.product(DTYPES, FEATURES, SEQ_LENS, BATCHES)), ids=lambda x: str(x)
)
def test_triton_parity(dtype, f, l, batch):
    check_parity(make_ffn_inputs(batch, l, f, dtype, seed=f * 131 + l), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_parity_many_row_blocks(dtype):
    """L spanning several backward row chunks (the last one a single row) and F spanning several feature blocks, so
    the d ffn_mul partial sums are really summed over chunks."""
    check_parity(make_ffn_inputs(2, 130, 1100, dtype, seed=5), dtype)


def test_triton_parity_fp64():
    check_parity(make_ffn_inputs(2, 9, 40, torch.float64, seed=2), torch.float64)


def test_triton_strided_inputs():
    """gate and up as halves of a fused gate-up projection (row stride 2F, no copy), ffn_mul and gate with a
    non-unit last-dim stride (copied), and an expanded (stride 0) grad_out from ``out.sum()``."""
    batch, l, f = 2, 11, 37
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(batch, l, 2 * f, generator=gen).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    ffn_mul = (torch.randn(f, batch, generator=gen) * 0.5).to(DEVICE).t()
    gate_t = gate.transpose(1, 2).contiguous().transpose(1, 2)
    assert gate.stride(1) == 2 * f and ffn_mul.stride(-1) != 1 and gate_t.stride(-1) != 1
    for g in (gate, gate_t):
        leaves = [x.detach().clone().requires_grad_() for x in (g, up, ffn_mul)]
        ref_leaves = [x.detach().clone().double().requires_grad_() for x in (g, up, ffn_mul)]
        out = mit_ffn_gate(*leaves, backend="triton")
        ref = mit_ffn_gate_reference(*ref_leaves)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_triton_empty_sequence():
    """L = 0: an empty output, empty gate/up gradients and a zero ffn_mul gradient (an empty sum)."""
    inputs = make_ffn_inputs(2, 0, 5, torch.float32)
    out, (d_gate, d_up, d_mul) = run_ffn(inputs, torch.empty(2, 0, 5, device=DEVICE), "triton")
    assert out.shape == (2, 0, 5) and d_gate.shape == (2, 0, 5) and d_up.shape == (2, 0, 5)
    assert torch.equal(d_mul, torch.zeros(2, 5, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 5, 19), (1, 70, 3)])
def test_gradcheck_through_triton_fp64(shape):
    inputs = [x.requires_grad_() for x in make_ffn_inputs(*shape, torch.float64, seed=7)]
    assert torch.autograd.gradcheck(lambda *xs: mit_ffn_gate(*xs, backend="triton"), inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_zero_ffn_mul_is_plain_swiglu(dtype):
    """With ffn_mul = 0 the op is silu(gate) * up: the reference bitwise (``* 1`` is exact), and Triton within one
    rounding of the output for fp16/bf16 (it computes in fp32 and rounds once) or the few roundings of its own
    arithmetic for fp32/fp64; the gradients are the plain SwiGLU ones. d ffn_mul is still sum_l dy * silu(gate) * up,
    not zero."""
    gate, up, ffn_mul = make_ffn_inputs(2, 9, 33, dtype, zero_mul=True)
    assert torch.equal(mit_ffn_gate(gate, up, ffn_mul, backend="reference"), F.silu(gate) * up)

    dy = torch.randn(gate.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    out, (d_gate, d_up, d_mul) = run_ffn([gate, up, ffn_mul], dy.to(dtype), "triton")
    g, u, dy = gate.double(), up.double(), dy.to(dtype).double()
    sig = torch.sigmoid(g)
    silu = g * sig
    rtol = torch.finfo(dtype).eps * (4 if dtype in (torch.float32, torch.float64) else 1)
    tol = {"rtol": rtol, "atol": rtol * 1e-3}
    torch.testing.assert_close(out.double(), (silu * u).to(dtype).double(), **tol)
    torch.testing.assert_close(d_up.double(), (dy * silu).to(dtype).double(), **tol)
    # silu' = s (1 + g (1 - s)) cancels near g = -1.28: d gate's roundoff is relative to its terms' magnitude.
    d_gate_tol = {"rtol": rtol, "atol": rtol * (dy * u * sig * (1 + (g * (1 - sig)).abs())).abs().max().item()}
    torch.testing.assert_close(d_gate.double(), (dy * u * sig * (1 + g * (1 - sig))).to(dtype).double(), **d_gate_tol)
    terms = dy * silu * u
    sum_tol = {"rtol": rtol, "atol": rtol * terms.abs().sum(dim=1).max().item()}
    torch.testing.assert_close(d_mul.double(), terms.sum(dim=1).to(dtype).double(), **sum_tol)


def test_backward_is_deterministic():
    """Two backward runs give bitwise-equal gradients (no atomics; the d ffn_mul partial sums are reduced by
    torch.sum in a fixed order)."""
    inputs = make_ffn_inputs(2, 130, 600, torch.float32, seed=9)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    _, first = run_ffn(inputs, grad_out, "triton")
    _, second = run_ffn(inputs, grad_out, "triton")
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


def test_saves_only_inputs():
    """The Triton path keeps exactly gate, up and ffn_mul for the backward: no activation is stored."""
    inputs = [x.requires_grad_() for x in make_ffn_inputs(2, 4, 8, torch.float32)]
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        mit_ffn_gate(*inputs, backend="triton")
    assert len(saved) == 3
    assert all(s.data_ptr() == x.data_ptr() and s.shape == x.shape for s, x in zip(saved, inputs))


# --------------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------------


def test_opcheck_forward():
    inputs = [x.requires_grad_() for x in make_ffn_inputs(2, 5, 24, torch.float32)]
    torch.library.opcheck(torch.ops.mit_kernels.ffn_gate_triton_fwd.default, tuple(inputs))


def test_opcheck_backward():
    gate, up, ffn_mul = make_ffn_inputs(2, 5, 24, torch.float32)
    grad_out = torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.library.opcheck(torch.ops.mit_kernels.ffn_gate_triton_bwd.default, (grad_out, gate, up, ffn_mul))


def test_flop_counter_sees_the_ops():
    """FlopCounterMode counts the forward as 6 B L F and the backward as 15 B L F (the documented elementwise
    convention in mit_kernels.ffn)."""
    batch, l, f = 2, 3, 10
    inputs = [x.requires_grad_() for x in make_ffn_inputs(batch, l, f, torch.float32)]
    with FlopCounterMode(display=False) as counter:
        mit_ffn_gate(*inputs, backend="triton").sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.mit_kernels.ffn_gate_triton_fwd] == 6 * batch * l * f
    assert counts[torch.ops.mit_kernels.ffn_gate_triton_bwd] == 15 * batch * l * f
    assert counter.get_total_flops() == 21 * batch * l * f


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


def _install_fake_cpu_backend(monkeypatch, *, available: bool):
    """Stand-in for the compiled ``mit_kernels.cpu_backend`` (its contract: available(), ffn_gate() and, once resolved,
    loaded_ffn_gate() and decoding_ffn_gate())."""
    module = types.ModuleType("mit_kernels.cpu_backend")
    module.calls = []
    module.available = lambda compile_if_missing=True: available
    module.unavailable_reason = lambda: None if available else "fake: no build"

    def ffn_gate(gate, up, ffn_mul):
        module.calls.append(gate.shape)
        return mit_ffn_gate_reference(gate, up, ffn_mul)

    module.ffn_gate = module.loaded_ffn_gate = module.decoding_ffn_gate = ffn_gate
    module.loaded_attention = module.decoding_attention = lambda *args, **kwargs: pytest.fail(
        "the FFN gate test called attention"
    )
    monkeypatch.setitem(sys.modules, "mit_kernels.cpu_backend", module)
    monkeypatch.setattr(mit_kernels, "cpu_backend", module, raising=False)
    return module


def _remove_cpu_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "mit_kernels.cpu_backend", None)  # makes the import raise ImportError
    monkeypatch.delattr(mit_kernels, "cpu_backend", raising=False)


def test_auto_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_ffn_backend("auto", cpu) == ("cpu" if cpu_backend_available() else "reference")
    _remove_cpu_backend(monkeypatch)
    assert resolve_ffn_backend("auto", cpu) == "reference"
    _install_fake_cpu_backend(monkeypatch, available=False)
    assert resolve_ffn_backend("auto", cpu) == "reference"
    fake = _install_fake_cpu_backend(monkeypatch, available=True)
    assert resolve_ffn_backend("auto", cpu) == "cpu"
    mit_ffn_gate(*(x.cpu() for x in make_ffn_inputs(1, 2, 3, torch.float32)))
    assert fake.calls == [(1, 2, 3)]
    if torch.cuda.is_available():  # Triton where it can run on the device, else sdpa (the gate: the reference)
        usable = dispatch.triton_unusable_reason(torch.device("cuda")) is None
        assert resolve_ffn_backend("auto", torch.device("cuda")) == ("triton" if usable else "sdpa")


@pytest.fixture
def cpu_backend():
    module = pytest.importorskip(
        "mit_kernels.cpu_backend",
        reason="mit_kernels.cpu_backend cannot be imported (not in this checkout, or it failed to load)",
    )
    if not module.available():
        pytest.skip("the compiled CPU extension is not built (pip install . builds it)")
    return module


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("f, l", [(17, 7), (1536, 33)])
def test_cpu_backend_parity(cpu_backend, dtype, f, l):
    check_parity([x.cpu() for x in make_ffn_inputs(2, l, f, dtype, seed=f + l)], dtype, backend="cpu")


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def _good():
    return make_ffn_inputs(2, 3, 4, torch.float32)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda g, u, m: ([g.tolist(), u, m], {}), r"gate must be a torch\.Tensor, got list"),
        (lambda g, u, m: ([g, 1.0, m], {}), r"up must be a torch\.Tensor, got float"),
        (lambda g, u, m: ([g, u, None], {}), r"ffn_mul must be a torch\.Tensor, got NoneType"),
        (lambda g, u, m: ([g[0], u[0], m], {}), r"gate must have 3 dimensions \(B, L, F\), got shape \(3, 4\)"),
        (lambda g, u, m: ([g, u[:, :2], m], {}), r"up must have shape .* = \(2, 3, 4\), got shape \(2, 2, 4\)"),
        (lambda g, u, m: ([g, u, m[:, :3]], {}), r"ffn_mul must have shape \(B, F\).* = \(2, 4\), got shape \(2, 3\)"),
        (lambda g, u, m: ([g, u, m[:, None]], {}), r"ffn_mul must have shape .* got shape \(2, 1, 4\)"),
        (lambda g, u, m: ([g, u.half(), m], {}), r"up must have gate's dtype torch\.float32, got torch\.float16"),
        (
            lambda g, u, m: ([g, u, m.double()], {}),
            r"ffn_mul must have gate's dtype torch\.float32, got torch\.float64",
        ),
        (lambda g, u, m: ([g, u.to("meta"), m], {}), r"up must be on gate's device .*, got meta"),
        (
            lambda g, u, m: ([x.to(torch.int32) for x in (g, u, m)], {}),
            r"gate must be float16, bfloat16, float32 or float64, got torch\.int32",
        ),
        (lambda g, u, m: ([g, u, m], {"backend": "cuda"}), r"backend must be one of .*, got 'cuda'"),
        (
            lambda g, u, m: ([x.to("meta") for x in (g, u, m)], {"backend": "cpu"}),
            r"backend='cpu' needs CPU tensors, got device meta",
        ),
        (
            lambda g, u, m: ([x.to("meta") for x in (g, u, m)], {"backend": "triton"}),
            r"backend='triton' runs on CUDA .*, got device meta",
        ),
    ],
)
def test_bad_input_raises(make, match):
    args, kwargs = make(*_good())
    with pytest.raises(ValueError, match=match):
        mit_ffn_gate(*args, **kwargs)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreter_active", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' got CPU tensors, but the Triton interpreter is off"):
        mit_ffn_gate(*(x.cpu() for x in _good()), backend="triton")


def test_cpu_backend_missing_raises(monkeypatch):
    _remove_cpu_backend(monkeypatch)
    with pytest.raises(ValueError, match=r"backend='cpu' needs the compiled C\+\+ kernels.*cannot be imported"):
        mit_ffn_gate(*(x.cpu() for x in _good()), backend="cpu")
    _install_fake_cpu_backend(monkeypatch, available=False)
    with pytest.raises(
        ValueError, match=r"needs the compiled C\+\+ kernels.*fake: no build.*python -m mit_kernels build"
    ):
        mit_ffn_gate(*(x.cpu() for x in _good()), backend="cpu")
