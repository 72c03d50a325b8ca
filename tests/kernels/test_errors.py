"""Bad input raises ValueError naming the argument, what was received and what was expected."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from attention_cases import make_attention_inputs

from mit_kernels import mit_attention
from mit_kernels.attention import resolve_backend


def _inputs(dtype=torch.float32):
    return make_attention_inputs(2, 4, 2, 5, 7, 16, dtype, device=torch.device("cpu"))


def _replace(inputs, index, value):
    out = list(inputs)
    out[index] = value
    return out


@pytest.mark.parametrize(
    "index, bad, pattern",
    [
        (0, torch.randn(4, 5, 16), r"q must have 4 dimensions \(B, Hq, Lq, D\), got shape \(4, 5, 16\)"),
        (1, torch.randn(2, 2, 7), r"k must have 4 dimensions"),
        (1, torch.randn(2, 2, 7, 8), r"k must have shape .*D=16.*got shape \(2, 2, 7, 8\)"),
        (1, torch.randn(3, 2, 7, 16), r"k must have shape .*B=2"),
        (
            2,
            torch.randn(2, 2, 6, 16),
            r"v must have shape \(B, Hkv, Lk, D\) = \(2, 2, 7, 16\), got shape \(2, 2, 6, 16\)",
        ),
        (1, torch.randn(2, 3, 7, 16), r"multiple of the number of KV heads.*Hq=4.*Hkv=3"),
        (3, torch.randn(2, 2, 8), r"k_mul must have shape \(B, Hkv, D\) = \(2, 2, 16\), got shape \(2, 2, 8\)"),
        (4, torch.randn(2, 16), r"k_add must have shape \(B, Hkv, D\)"),
        (5, torch.randn(1, 2, 16), r"v_mul must have shape"),
        (6, torch.randn(2, 2, 17), r"v_add must have shape"),
        (7, torch.randn(4), r"head_logit must have shape \(Hkv,\) = \(2,\), got shape \(4,\)"),
        (7, torch.zeros(2, dtype=torch.long), r"head_logit must be a floating tensor, got torch.int64"),
        (1, torch.randn(2, 2, 7, 16, dtype=torch.float64), r"k must have q's dtype torch.float32, got torch.float64"),
        (
            6,
            torch.randn(2, 2, 16, dtype=torch.bfloat16),
            r"v_add must have q's dtype torch.float32, got torch.bfloat16",
        ),
        (2, torch.randn(2, 2, 7, 16).numpy(), r"v must be a torch.Tensor, got ndarray"),
    ],
)
def test_bad_tensor_arguments(index, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        mit_attention(*_replace(_inputs(), index, bad), backend="reference")


def test_integer_inputs_are_rejected():
    inputs = [x.to(torch.int32) for x in _inputs()]
    with pytest.raises(ValueError, match=r"q must be float16, bfloat16, float32 or float64, got torch.int32"):
        mit_attention(*inputs)


def test_empty_sequence_is_rejected():
    inputs = _replace(_inputs(), 0, torch.randn(2, 4, 0, 16))
    with pytest.raises(ValueError, match=r"need B, Lq, Lk, D >= 1"):
        mit_attention(*inputs)


@pytest.mark.parametrize(
    "mask, pattern",
    [
        (torch.ones(2, 7), r"kv_mask must be a bool tensor .*got dtype torch.float32"),
        (torch.ones(2, 6, dtype=torch.bool), r"kv_mask must have shape \(B, Lk\) = \(2, 7\), got shape \(2, 6\)"),
        (torch.ones(2, 1, 7, dtype=torch.bool), r"kv_mask must have shape \(B, Lk\)"),
    ],
)
def test_bad_kv_mask(mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        mit_attention(*_inputs(), kv_mask=mask)


@pytest.mark.parametrize("scale", [0.0, -1.0, "0.1"])
def test_bad_scale(scale):
    with pytest.raises(
        ValueError, match=re.escape(f"scale must be a positive float or None (1/sqrt(D)), got {scale!r}")
    ):
        mit_attention(*_inputs(), scale=scale)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \(.*'reference'.*\), got 'cuda'"):
        mit_attention(*_inputs(), backend="cuda")


def test_triton_rejects_head_dims_above_256():
    inputs = make_attention_inputs(1, 1, 1, 2, 2, 264, torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"head dims D <= 256, got D=264"):
        mit_attention(*inputs, backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """In a process where TRITON_INTERPRET is unset, CPU tensors with backend='triton' must raise, not crash."""
    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "from mit_kernels.attention import resolve_backend\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "ValueError: backend='triton' got CPU tensors, but the Triton interpreter is off" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


def test_auto_uses_reference_or_cpu_on_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) in ("reference", "cpu")


# --------------------------------------------------------------------------------------------------------------------
# Keyword arguments of the public ops and of the backend selectors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["causal", "rescale"])
@pytest.mark.parametrize("value", ["no", 1, 0, None, torch.tensor(True), 1.0])
def test_causal_and_rescale_must_be_bools(keyword, value):
    with pytest.raises(ValueError, match=rf"{keyword} must be a bool \(True or False\), got .* of type"):
        mit_attention(*_inputs(), backend="reference", **{keyword: value})


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), True, False, 0, -2, "0.1", [0.1]])
def test_scale_must_be_a_finite_positive_number(scale):
    with pytest.raises(ValueError, match=r"scale must be a positive float or None \(1/sqrt\(D\)\), got "):
        mit_attention(*_inputs(), backend="reference", scale=scale)


def test_integer_and_numpy_scales_are_accepted():
    import numpy as np

    inputs = _inputs(torch.float64)
    expected = mit_attention(*inputs, backend="reference", scale=0.5)
    for scale in (np.float64(0.5), np.float32(0.5)):
        torch.testing.assert_close(mit_attention(*inputs, backend="reference", scale=scale), expected)
    assert mit_attention(*inputs, backend="reference", scale=1).shape == inputs[0].shape


@pytest.mark.parametrize("backend", ["CPU", "", None, 1, ["cpu"], "torch"])
def test_backend_must_be_a_known_name(backend):
    from mit_kernels.ffn import mit_ffn_gate, resolve_ffn_backend

    pattern = r"backend must be one of \('auto', 'reference', 'triton', 'cpu', 'sdpa'\), got "
    with pytest.raises(ValueError, match=pattern):
        mit_attention(*_inputs(), backend=backend)
    with pytest.raises(ValueError, match=pattern):
        mit_ffn_gate(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 3), backend=backend)
    with pytest.raises(ValueError, match=pattern):
        resolve_backend(backend, torch.device("cpu"))
    with pytest.raises(ValueError, match=pattern):
        resolve_ffn_backend(backend, torch.device("cpu"))


@pytest.mark.parametrize(
    "device, head_dim, pattern",
    [
        ("cpu", None, r"device must be a torch.device, got 'cpu' of type str"),
        (torch.device("cpu"), 0, r"head_dim must be None or an int >= 1, got 0"),
        (torch.device("cpu"), True, r"head_dim must be None or an int >= 1, got True"),
        (torch.device("cpu"), 16.0, r"head_dim must be None or an int >= 1, got 16.0"),
    ],
)
def test_backend_selector_arguments(device, head_dim, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_backend("auto", device, head_dim)
