"""The exact "sdpa" backend (infusion in PyTorch + torch's scaled_dot_product_attention) and backend="auto"'s fallback
to it when a Triton kernel cannot be compiled or launched.

Its parity with the reference over dtypes, head dims, GQA, masks and lengths is in tests/test_parity.py, its NaN / Inf
behaviour on random cases in tests/kernels/test_properties.py and its double-backward refusal in
tests/kernels/test_double_backward.py. Here: the mask alignment, rows that see no key, which path finite and
non-finite inputs take, and the fallback (no GPU here: CPU tensors are resolved as if they were on a CUDA device of
compute capability 9.0, and the Triton entry points are replaced by functions that raise Triton's errors).
"""

from __future__ import annotations

import ast
import warnings

import pytest
import torch
import torch.nn.functional as F
from attention_cases import DEVICE, INPUT_NAMES, check_parity, make_attention_inputs, make_kv_mask, run_attention
from torch.nn.attention.bias import CausalBias
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from mit_kernels import backends, dispatch, mit_attention, mit_attention_reference, sdpa_attention
from mit_kernels.dispatch import MitKernelFallbackWarning
from mit_kernels.ffn import mit_ffn_gate
from mit_kernels.reference import infuse, infusion_gate, mit_ffn_gate_reference

CPU = torch.device("cpu")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of torch's SDPA and of the reference made by mit_kernels.sdpa_attention, and records the
    tensors (q, K', V') and the mask arguments SDPA got."""
    counts = {"sdpa": 0, "reference": 0, "masks": [], "qkv": []}
    sdpa, reference = sdpa_attention.scaled_dot_product_attention, sdpa_attention.mit_attention_reference

    def spy_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        counts["masks"].append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        counts["qkv"].append([x.detach() for x in args[:3]])
        return sdpa(*args, **kwargs)

    def spy_reference(*args, **kwargs):
        counts["reference"] += 1
        return reference(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(sdpa_attention, "mit_attention_reference", spy_reference)
    return counts


def _infused(inputs, rescale=True):
    """K', V' by the reference's equations (fp64 inputs), repeated to the query heads."""
    q, k, v, k_mul, k_add, v_mul, v_add, head_logit = inputs
    gate = infusion_gate(v, v_add, head_logit, rescale)
    group = q.shape[1] // k.shape[1]
    return [infuse(x, m, a, gate).repeat_interleave(group, dim=1) for x, m, a in ((k, k_mul, k_add), (v, v_mul, v_add))]


# --------------------------------------------------------------------------------------------------------------------
# Masks: bottom-right causal alignment, rows that see no key
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lq, lk", [(3, 7), (1, 9), (7, 3)])
def test_causal_is_bottom_right_not_sdpa_top_left(calls, lq, lk):
    """With Lq != Lk torch's is_causal (top-left: j <= i) and ours (j <= i + Lk - Lq) differ; the backend must give the
    bottom-right result, which an explicit mask on K', V' computes independently."""
    inputs = make_attention_inputs(2, 4, 2, lq, lk, 16, torch.float64, device=DEVICE)
    got = mit_attention(*inputs, causal=True, backend="sdpa")
    k_inf, v_inf = _infused(inputs)
    q = inputs[0]
    i, j = torch.arange(lq, device=DEVICE)[:, None], torch.arange(lk, device=DEVICE)[None, :]
    bottom_right, top_left = j <= i + lk - lq, j <= i
    sees = bottom_right.any(-1)  # with Lq > Lk the first Lq - Lk rows see no key: 0
    expected = torch.where(sees[:, None], F.scaled_dot_product_attention(q, k_inf, v_inf, attn_mask=bottom_right), 0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, mit_attention_reference(*inputs, causal=True), rtol=1e-12, atol=1e-12)
    other = F.scaled_dot_product_attention(q, k_inf, v_inf, attn_mask=top_left)
    assert (got - other).abs().max() > 0.1  # the case tells the alignments apart
    assert calls["sdpa"] == 1 and calls["reference"] == 0


@pytest.mark.parametrize(
    "lq, lk, causal, mask_kind, expected_mask",
    [
        (6, 6, True, "none", "is_causal"),  # Lq == Lk: top-left equals bottom-right
        (3, 7, True, "none", "causal_lower_right"),
        (7, 3, True, "none", "bool"),  # rows without a key: an explicit mask
        (6, 6, True, "random", "bool"),
        (3, 7, False, "random", "bool"),
        (3, 7, False, "none", "none"),
    ],
)
def test_sdpa_gets_the_cheapest_mask_that_is_exact(calls, lq, lk, causal, mask_kind, expected_mask):
    inputs = make_attention_inputs(2, 2, 2, lq, lk, 8, torch.float64, device=DEVICE)
    kv_mask = make_kv_mask(2, lk, mask_kind, device=DEVICE)
    got = mit_attention(*inputs, causal=causal, kv_mask=kv_mask, backend="sdpa")
    ref = mit_attention_reference(*inputs, causal=causal, kv_mask=kv_mask)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    [(mask, is_causal)] = calls["masks"]
    if is_causal:
        assert mask is None
        kind = "is_causal"
    elif isinstance(mask, CausalBias):
        kind = "causal_lower_right"
    elif isinstance(mask, torch.Tensor):
        assert mask.dtype == torch.bool
        kind = "bool"
    else:
        assert mask is None
        kind = "none"
    assert kind == expected_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [6, 9])
def test_rows_that_see_no_key_give_zero_and_exactly_zero_gradients(calls, dtype, lq):
    """Left padding under the causal mask and a fully padded sample: those rows are exactly 0 and send back exactly 0
    to q, and keys nobody attends get exactly 0 (never NaN, which some SDPA kernels give for an empty row)."""
    lk = 4
    inputs = make_attention_inputs(2, 4, 2, lq, lk, 16, dtype, device=DEVICE)
    kv_mask = torch.tensor([[False, False, True, True], [False] * 4], device=DEVICE)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    out, grads = run_attention(inputs, grad_out, "sdpa", causal=True, kv_mask=kv_mask)
    assert calls["sdpa"] == 1 and calls["reference"] == 0
    # SDPA never sees a row without a key (some of its kernels give NaN there, or NaN gradients)
    [(mask, _)] = calls["masks"]
    assert mask.dtype == torch.bool and mask.any(dim=-1).all()
    empty = lq - 2  # sample 0: query i sees keys 2..i + 4 - lq, so queries 0 .. lq - 3 see none
    zero = torch.zeros((), dtype=dtype, device=DEVICE)
    assert (out[1] == zero).all() and (out[0, :, :empty] == zero).all() and (out[0, :, empty:] != zero).any()
    for name, grad in zip(INPUT_NAMES, grads):
        assert torch.isfinite(grad).all(), name
    dq, dk, dv = grads[:3]
    assert (dq[1] == 0).all() and (dq[0, :, :empty] == 0).all()
    for grad in (dk, dv):
        assert (grad[1] == 0).all() and (grad[0, :, :2] == 0).all()
    check_parity(inputs, dtype, "sdpa", causal=True, kv_mask=kv_mask)  # and the values agree with the reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_infusion_is_computed_in_fp32_and_rounded_once(calls, dtype):
    """docs/semantics.md, Precision: the gate and the infusion in fp32, K' and V' rounded to q's dtype once. Written
    out here from the equations; the case is one where the infusion computed in the low precision differs."""
    inputs = make_attention_inputs(1, 2, 2, 4, 24, 32, dtype, device=DEVICE)
    mit_attention(*inputs, backend="sdpa")
    [(_, got_k, got_v)] = calls["qkv"]
    k, v, k_mul, k_add, v_mul, v_add, head_logit = (x.float() for x in inputs[1:])
    gate = torch.sigmoid(head_logit[None, :, None] + F.cosine_similarity(v, v_add[:, :, None, :], dim=-1, eps=1e-8))
    gate = gate[..., None]
    expected_k = (k + gate * (k * k_mul[:, :, None] + k_add[:, :, None])).to(dtype)
    expected_v = (v + gate * (v * v_mul[:, :, None] + v_add[:, :, None])).to(dtype)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
    low = inputs[1] + gate.to(dtype) * (inputs[1] * inputs[3][:, :, None] + inputs[4][:, :, None])
    assert not torch.equal(low, expected_k)


# --------------------------------------------------------------------------------------------------------------------
# Finite inputs take SDPA; non-finite q, K' or V' take the reference
# --------------------------------------------------------------------------------------------------------------------


def _nonfinite_case(where: str):
    inputs = make_attention_inputs(2, 4, 2, 5, 8, 16, torch.float64, device=DEVICE)
    kv_mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    kv_mask[0, 1] = False  # a padded key
    nan, inf = float("nan"), float("inf")
    if where == "q":
        inputs[0][1, 2, 3, 0] = nan
    elif where == "k_padded":
        inputs[1][0, 1, 1, 4] = inf  # only in a key nobody sees: no row may be affected
    elif where == "v_future":
        inputs[2][1, 0, 7, 2] = nan  # the last key: seen by the last query only (causal)
    elif where == "v_add":
        inputs[6][0, 1, 5] = -inf
    elif where == "head_logit_nan":
        inputs[7][0] = nan
    elif where == "head_logit_inf":  # g = sigmoid(inf) = 1: K' and V' stay finite
        inputs[7][1] = inf
    return inputs, {"causal": True, "kv_mask": kv_mask}


@pytest.mark.parametrize(
    "where, path",
    [
        ("finite", "sdpa"),
        ("head_logit_inf", "sdpa"),
        ("q", "reference"),
        ("k_padded", "reference"),
        ("v_future", "reference"),
        ("v_add", "reference"),
        ("head_logit_nan", "reference"),
    ],
)
def test_nonfinite_q_k_or_v_take_the_reference_path(calls, where, path):
    inputs, kwargs = _nonfinite_case(where)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_out = grad_out.to(DEVICE)
    out, grads = run_attention(inputs, grad_out, "sdpa", **kwargs)
    assert (calls["sdpa"], calls["reference"]) == ((1, 0) if path == "sdpa" else (0, 1))
    ref_out, ref_grads = run_attention(inputs, grad_out, "reference", **kwargs)
    for name, got, ref in zip(["out", *INPUT_NAMES], [out, *grads], [ref_out, *ref_grads]):
        # NaN and Inf in the same places, the finite entries equal to roundoff
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    if where == "k_padded":  # the Inf sits in a key no row sees: every output and dq stay finite
        assert torch.isfinite(out).all() and torch.isfinite(grads[0]).all()
    if where == "v_future":  # only the last query of sample 1 sees it
        assert out[1, :, -1].isnan().any() and torch.isfinite(out[1, :, :-1]).all() and torch.isfinite(out[0]).all()


# --------------------------------------------------------------------------------------------------------------------
# backend="auto": fallback from Triton to sdpa
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(fresh_triton_fallbacks, monkeypatch):
    """CPU tensors resolved by backend="auto" as on a CUDA device of compute capability 9.0 (so "auto" picks Triton),
    with a fresh record of fallbacks."""
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    assert backends.resolve("auto", CPU, head_dim=16) == "triton"
    return fresh_triton_fallbacks


def _compilation_error(message: str) -> CompilationError:
    source = "def kernel(x):\n    tl.dot(x, x)\n"
    return CompilationError(source, ast.parse(source).body[0].body[0], message)


def _raising(exc: BaseException) -> tuple:
    """A stand-in for a Triton entry point that raises ``exc``, and the list of its calls."""
    seen = []

    def entry(*args):
        seen.append(args[0].shape)
        raise exc

    return entry, seen


def _attention_case():
    inputs = make_attention_inputs(2, 4, 2, 5, 9, 16, torch.float32, device=CPU)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(4))
    return inputs, grad_out, {"causal": True, "kv_mask": make_kv_mask(2, 9, "left_pad", device=CPU)}


def test_a_triton_compile_error_under_auto_falls_back_to_sdpa_once(fake_gpu, monkeypatch):
    from mit_kernels import triton_attention

    entry, seen = _raising(_compilation_error("unsupported tensor layout\n(detail)"))
    monkeypatch.setattr(triton_attention, "mit_attention_triton_fwd", entry)
    inputs, grad_out, kwargs = _attention_case()
    expected_out, expected_grads = run_attention(inputs, grad_out, "sdpa", **kwargs)
    with pytest.warns(MitKernelFallbackWarning) as record:
        out, grads = run_attention(inputs, grad_out, "auto", **kwargs)
    assert len(record) == 1
    assert record[0].filename.endswith("attention_cases.py")  # points at the line calling mit_attention
    cause = "a Triton kernel failed to compile or launch (CompilationError: unsupported tensor layout)"
    assert f"cannot use the Triton kernels on cpu: {cause}." in str(record[0].message)
    assert len(seen) == 1
    assert torch.equal(out, expected_out)
    for name, got, expected in zip(INPUT_NAMES, grads, expected_grads):
        assert torch.equal(got, expected), name
    assert dispatch.triton_fallback_causes() == {"cpu": cause}
    # From now on auto runs sdpa on this device without trying Triton again, and without another warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", MitKernelFallbackWarning)
        again, _ = run_attention(inputs, grad_out, "auto", **kwargs)
        gate = [torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 5)]
        assert torch.equal(mit_ffn_gate(*gate), mit_ffn_gate_reference(*gate))  # the FFN gate too: the reference
    assert torch.equal(again, expected_out) and len(seen) == 1
    assert backends.resolve("auto", CPU, head_dim=16) == "sdpa"


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("k must have q's dtype torch.float32, got torch.float16"),  # validation: a bug in the call
        RuntimeError("an unrelated error inside the op"),
        TypeError("mit_attention_triton_fwd() takes 12 positional arguments"),
    ],
)
def test_other_errors_from_the_triton_path_propagate(fake_gpu, monkeypatch, exc):
    from mit_kernels import triton_attention

    entry, seen = _raising(exc)
    monkeypatch.setattr(triton_attention, "mit_attention_triton_fwd", entry)
    inputs, _, kwargs = _attention_case()
    with pytest.raises(type(exc), match=str(exc).split("(")[0]):
        mit_attention(*inputs, backend="auto", **kwargs)
    assert len(seen) == 1 and dispatch.triton_fallback_causes() == {}
    assert backends.resolve("auto", CPU, head_dim=16) == "triton"


def test_an_explicit_triton_backend_does_not_fall_back(fake_gpu, monkeypatch):
    from mit_kernels import triton_attention

    entry, _ = _raising(_compilation_error("unsupported tensor layout"))
    monkeypatch.setattr(triton_attention, "mit_attention_triton_fwd", entry)
    inputs, _, kwargs = _attention_case()
    with pytest.raises(CompilationError, match="unsupported tensor layout"):
        mit_attention(*inputs, backend="triton", **kwargs)
    assert dispatch.triton_fallback_causes() == {}


def test_an_old_gpu_under_auto_runs_sdpa_without_trying_triton(fake_gpu, monkeypatch):
    from mit_kernels import triton_attention

    monkeypatch.setattr(dispatch, "device_capability", lambda device: (7, 0))
    monkeypatch.setattr(dispatch, "_triton_checked", {})  # the fixture's check saw 9.0
    entry, seen = _raising(AssertionError("the Triton kernels must not run"))
    monkeypatch.setattr(triton_attention, "mit_attention_triton_fwd", entry)
    inputs, grad_out, kwargs = _attention_case()
    with pytest.warns(MitKernelFallbackWarning, match=r"on cpu: compute capability 7\.0 < 8\.0\.") as record:
        out, grads = run_attention(inputs, grad_out, "auto", **kwargs)
    assert len(record) == 1 and seen == [] and record[0].filename.endswith("attention_cases.py")
    expected_out, expected_grads = run_attention(inputs, grad_out, "sdpa", **kwargs)
    assert torch.equal(out, expected_out) and all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_a_backward_kernel_failure_under_auto_recomputes_the_gradients_through_sdpa(fake_gpu, monkeypatch):
    """The forward compiled, the backward does not: the gradients come from the sdpa path at the same inputs."""
    from mit_kernels import triton_attention

    def forward(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale):
        out = mit_attention_reference(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=causal, scale=scale,
                                      kv_mask=kv_mask, rescale=rescale)  # fmt: skip
        return out.contiguous(), torch.zeros(q.shape[:3])

    backward, seen = _raising(PTXASError("`ptxas` failed with error code 255"))
    monkeypatch.setattr(triton_attention, "mit_attention_triton_fwd", forward)
    monkeypatch.setattr(triton_attention, "mit_attention_triton_bwd", backward)
    inputs, grad_out, kwargs = _attention_case()
    with pytest.warns(MitKernelFallbackWarning) as record:
        out, grads = run_attention(inputs, grad_out, "auto", **kwargs)
    assert len(record) == 1 and len(seen) == 1
    assert "(PTXASError: `ptxas` failed with error code 255)" in str(record[0].message)
    torch.testing.assert_close(out, mit_attention_reference(*inputs, **kwargs))
    _, expected = run_attention(inputs, grad_out, "sdpa", **kwargs)
    for name, got, want in zip(INPUT_NAMES, grads, expected):
        assert torch.equal(got, want), name
    assert backends.resolve("auto", CPU, head_dim=16) == "sdpa"


def test_the_backward_fallback_gives_lambda_a_zero_gradient_without_rescale(fake_gpu, monkeypatch):
    """As the Triton backward does: lambda does not enter the op when rescale=False."""
    from mit_kernels.registration import recomputed_gradients
    from mit_kernels.triton_backend import attention_via_sdpa

    inputs, grad_out, kwargs = _attention_case()
    leaves = [x.clone().requires_grad_() for x in inputs]
    arguments = (kwargs["kv_mask"], True, 0.25, False)  # what the op's autograd keeps: kv_mask, causal, scale, rescale
    grads = recomputed_gradients(attention_via_sdpa, grad_out, tuple(leaves), arguments)
    assert torch.equal(grads[-1], torch.zeros_like(inputs[-1]))
    expected = torch.autograd.grad(
        mit_attention(*leaves, **kwargs, scale=0.25, rescale=False, backend="sdpa"), leaves[:7], grad_out
    )
    for name, got, want in zip(INPUT_NAMES, grads, expected):
        assert torch.equal(got, want), name


def test_the_ffn_gate_under_auto_falls_back_to_the_reference(fake_gpu, monkeypatch):
    from mit_kernels import triton_ffn

    entry, seen = _raising(OutOfResources(232448, 101376, "shared memory"))
    monkeypatch.setattr(triton_ffn, "ffn_gate_triton_fwd", entry)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen) for shape in ((2, 3, 5), (2, 3, 5), (2, 5))]
    with pytest.warns(
        MitKernelFallbackWarning, match=r"on cpu: .*\(OutOfResources: out of resource: shared memory"
    ) as record:
        got = mit_ffn_gate(*tensors)
    assert record[0].filename == __file__  # points at the line calling mit_ffn_gate
    assert torch.equal(got, mit_ffn_gate_reference(*tensors)) and len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", MitKernelFallbackWarning)
        assert torch.equal(mit_ffn_gate(*tensors), got) and len(seen) == 1


def test_an_ffn_backward_kernel_failure_under_auto_uses_the_reference_gradients(fake_gpu, monkeypatch):
    from mit_kernels import triton_ffn

    backward, seen = _raising(RuntimeError("Triton Error [CUDA]: no kernel image is available for execution"))
    monkeypatch.setattr(triton_ffn, "ffn_gate_triton_fwd", lambda g, u, m: mit_ffn_gate_reference(g, u, m))
    monkeypatch.setattr(triton_ffn, "ffn_gate_triton_bwd", backward)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 3, 5), (2, 3, 5), (2, 5))]
    grad_out = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    results = []
    for backend in ("auto", "reference"):
        leaves = [x.clone().requires_grad_() for x in tensors]
        y = mit_ffn_gate(*leaves, backend=backend)
        if backend == "auto":
            with pytest.warns(
                MitKernelFallbackWarning, match=r"\(RuntimeError: Triton Error \[CUDA\]: no kernel image"
            ):
                y.backward(grad_out)
        else:
            y.backward(grad_out)
        results.append([x.grad for x in leaves])
    assert len(seen) == 1 and backends.resolve("auto", CPU) == "sdpa"
    for got, expected in zip(*results):
        assert torch.equal(got, expected)
