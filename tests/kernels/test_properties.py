"""Property-based tests (hypothesis): every backend against the reference, the oracle, on random cases.

Random shapes (batch, GQA ratio, Lq <= Lk both equal and not, head dims including 1 and non-powers of two), strides
(inputs that are transposed views), dtypes, kv_mask patterns (none, random, left padding, a fully masked sample),
causal and rescale on or off, and NaN / ±Inf placed anywhere: the forward and all gradients must agree with the
reference, NaN and Inf exactly where the reference puts them and the finite parts by the tolerance rule of
tests/attention_cases.py. The FFN gate gets the same treatment (on the fused backends: with "sdpa" it runs the
reference). Examples are derandomised and bounded so the file runs in about a minute on two cores (the Triton backend
runs in its interpreter without a GPU). The sdpa backend keeps NaN / Inf exact by running the reference when q, K' or
V' hold one, so its non-finite cases check that routing as much as the arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE, INPUT_NAMES, check_parity, run_attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mit_kernels import mit_attention
from mit_kernels.dispatch import cpu_backend_available
from mit_kernels.ffn import mit_ffn_gate

FUSED_BACKENDS = ["cpu", "triton"]
BACKENDS = [*FUSED_BACKENDS, "sdpa"]
# Per backend: examples of the finite / non-finite attention properties (the interpreter is slow).
EXAMPLES = {"cpu": (60, 80), "triton": (8, 12), "sdpa": (60, 80)}
LOW_PRECISION = {"cpu": torch.bfloat16, "triton": torch.float16, "sdpa": torch.bfloat16}


def _settings(n: int):
    return settings(derandomize=True, max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _device(backend: str) -> torch.device:
    if backend == "cpu" and not cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?): kernel properties are never skipped")
    return torch.device("cpu") if backend == "cpu" else DEVICE


@st.composite
def attention_cases(draw, dtypes):
    """(inputs, kwargs): random MiT attention inputs, some of them transposed views, and the op's keywords."""
    batch = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    lk = draw(st.integers(1, 11))
    lq = draw(st.sampled_from([lk, draw(st.integers(1, lk))]))
    d = draw(st.sampled_from([1, 3, 8, 12, 16]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, transposed=False, dt=dtype):
        if transposed:  # a (B, L, H, D) buffer seen as (B, H, L, D): non-contiguous strides
            x = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=gen, dtype=torch.float64)
            return (x * scale).to(dt).transpose(1, 2)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    q = rand(batch, hq, lq, d, transposed=draw(st.booleans()))
    k = rand(batch, hkv, lk, d, transposed=draw(st.booleans()))
    v = rand(batch, hkv, lk, d, transposed=draw(st.booleans()))
    vectors = [rand(batch, hkv, d, scale=0.5) for _ in range(4)]
    head_logit = rand(hkv, dt=dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    mask_kind = draw(st.sampled_from(["none", "random", "left_pad", "one_sample_masked"]))
    kv_mask = None
    if mask_kind == "random":
        kv_mask = torch.rand(batch, lk, generator=gen) > 0.3
    elif mask_kind == "left_pad":
        kv_mask = torch.arange(lk)[None, :] >= torch.randint(0, lk + 1, (batch, 1), generator=gen)
    elif mask_kind == "one_sample_masked":
        kv_mask = torch.ones(batch, lk, dtype=torch.bool)
        kv_mask[-1] = False
    kwargs = {"causal": draw(st.booleans()), "rescale": draw(st.booleans()), "kv_mask": kv_mask}
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    return [q, k, v, *vectors, head_logit], kwargs


def _to(inputs, kwargs, device):
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return [x.to(device) for x in inputs], moved


def _check_finite_case(backend: str, case) -> None:
    inputs, kwargs = _to(*case, _device(backend))
    check_parity(inputs, inputs[0].dtype, backend, flash_rounding=True, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_agrees_with_the_reference(backend):
    dtypes = [torch.float32, torch.float64, LOW_PRECISION[backend]]

    @_settings(EXAMPLES[backend][0])
    @given(case=attention_cases(dtypes))
    def prop(case):
        _check_finite_case(backend, case)

    prop()


def _assert_same_nonfinite(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN and ±Inf exactly where the reference has them; the finite entries agree (both fp64)."""
    assert torch.equal(got.isnan(), ref.isnan()), (
        f"{name}: NaN at {int(got.isnan().sum())} entries, the reference at {int(ref.isnan().sum())}"
    )
    for sign in (1, -1):
        assert torch.equal(got == sign * float("inf"), ref == sign * float("inf")), f"{name}: {sign:+d}Inf differs"
    finite = ref.isfinite()
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@st.composite
def nonfinite_attention_cases(draw):
    """An fp64 attention case with NaN, +Inf or -Inf written at one random entry of one random input."""
    inputs, kwargs = draw(attention_cases([torch.float64]))
    which = draw(st.integers(0, len(inputs) - 1))
    x = inputs[which].contiguous().clone()
    flat = draw(st.integers(0, x.numel() - 1))
    x.view(-1)[flat] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    inputs[which] = x
    return inputs, kwargs, f"{INPUT_NAMES[which]}[{flat}]"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_land_where_the_reference_puts_them(backend):
    """Forward and the eight gradients: a NaN / Inf is neither dropped (turned into 0 or a finite value) nor spread
    beyond where the reference has it, e.g. to rows that do not see the key it sits in."""

    @_settings(EXAMPLES[backend][1])
    @given(case=nonfinite_attention_cases())
    def prop(case):
        inputs, kwargs, where = case
        inputs, kwargs = _to(inputs, kwargs, _device(backend))
        grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grad_out = grad_out.to(inputs[0].device)
        ref_out, ref_grads = run_attention(inputs, grad_out, "reference", **kwargs)
        out, grads = run_attention(inputs, grad_out, backend, **kwargs)
        for name, got, ref in zip(["out", *(f"d{n}" for n in INPUT_NAMES)], [out, *grads], [ref_out, *ref_grads]):
            _assert_same_nonfinite(f"{name} (non-finite {where}, {kwargs})", got.cpu(), ref.cpu())

    prop()


@st.composite
def ffn_cases(draw, nonfinite: bool):
    batch, length, features = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    gate = torch.randn(batch, length, features, generator=gen, dtype=torch.float64) * 3
    up = torch.randn(batch, length, features, generator=gen, dtype=torch.float64)
    ffn_mul = torch.randn(batch, features, generator=gen, dtype=torch.float64) * 0.5
    if draw(st.booleans()):  # a chunk of a fused gate-up projection: strided rows
        fused = torch.cat([gate, up], dim=-1)
        gate, up = fused.chunk(2, dim=-1)
    tensors = [gate, up, ffn_mul]
    if nonfinite:
        which = draw(st.integers(0, 2))
        x = tensors[which].contiguous().clone()
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -1e400]))
        tensors[which] = x
    return tensors


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_ffn_gate_agrees_with_the_reference(backend, nonfinite):
    device = _device(backend)

    @_settings(15)
    @given(tensors=ffn_cases(nonfinite))
    def prop(tensors):
        tensors = [x.to(device) for x in tensors]
        grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        results = []
        for which in ("reference", backend):
            leaves = [x.detach().clone().requires_grad_() for x in tensors]
            y = mit_ffn_gate(*leaves, backend=which)
            y.backward(grad_out.to(device))
            results.append([y.detach().cpu(), *(x.grad.cpu() for x in leaves)])
        for name, ref, got in zip(["y", "dgate", "dup", "dffn_mul"], *results):
            _assert_same_nonfinite(name, got, ref)

    prop()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 40])  # the C++ decode kernel and its blocked kernel
def test_inf_value_of_a_visible_key_whose_probability_underflows(backend, lq):
    """A key every row sees, with p = exp(s - m) = 0 exactly (score 1e4 below the others) and an infinite value: the
    reference's 0 * Inf = NaN must come out (a kernel that skips p = 0 would give a finite row), in every row."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, 1, lq, 8, generator=gen, dtype=torch.float64) + 1.0  # positive: q . k_3 is very negative
    k = torch.randn(1, 1, 70, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, 70, 8, generator=gen, dtype=torch.float64)
    k[0, 0, 3] = -1e4
    v[0, 0, 3, 5] = float("inf")
    vectors = [torch.zeros(1, 1, 8, dtype=torch.float64) for _ in range(4)]
    inputs = [x.to(device) for x in (q, k, v, *vectors, torch.ones(1, dtype=torch.float64))]
    ref = mit_attention(*inputs, causal=False, rescale=False, backend="reference")
    got = mit_attention(*inputs, causal=False, rescale=False, backend=backend)
    assert ref[..., 5].isnan().all() and ref[..., :5].isfinite().all()
    _assert_same_nonfinite("out", got.cpu(), ref.cpu())
