"""64-bit offsets in the Triton attention kernels: a view whose head stride times the head index passes 2^31 elements
(what B·H·L·D > 2^31 does to ``b * stride_b`` at long context) must give the same result as a compact copy.

The views live in one large *uninitialised* buffer (~6 GiB of address space, of which only the touched rows are ever
backed by memory). The check runs in a subprocess: with 32-bit offsets the kernel would read outside the buffer and
could crash the process rather than fail an assertion."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mit_kernels import dispatch

SCRIPT = textwrap.dedent("""
    import torch
    from mit_kernels import mit_attention, mit_attention_reference

    H, L, D = 3, 20, 16
    head_stride = 2**30  # a 32-bit int, as Triton passes it; head 2 starts at element 2^31
    buffer = torch.empty(2 * head_stride + 3 * L * D + 64, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    views = []
    for i in range(3):  # q, k, v: rows i*L*D .. of every head; only those rows are ever written or read
        view = buffer.as_strided((1, H, L, D), (0, head_stride, D, 1), storage_offset=i * L * D)
        view.copy_(torch.randn(1, H, L, D, generator=g).half())
        views.append(view)
    q, k, v = views
    vectors = [(0.3 * torch.randn(1, H, D, generator=g)).half().requires_grad_() for _ in range(4)]
    lam = torch.ones(H, requires_grad=True)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    for causal in (True, False):  # row offsets are 64-bit in both modes (not only under the causal bounds)
        out = mit_attention(q, k, v, *vectors, lam, backend="triton", causal=causal)
        compact = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        wide = [x.double() for x in compact]
        expected = mit_attention_reference(*wide, *[x.double() for x in vectors], lam.double(), causal=causal)
        error = (out.double() - expected).abs().max().item()
        assert error < 2e-3, f"forward error {error} (causal={causal})"
        (dq, dk, dv) = torch.autograd.grad(out.float().sum(), (q, k, v))
        (eq, ek, ev) = torch.autograd.grad(expected.sum(), compact)
        for name, got, want in (("dq", dq, eq), ("dk", dk, ek), ("dv", dv, ev)):
            err = (got.double() - want).abs().max().item()
            assert err < 2e-2, f"{name} error {err} (causal={causal})"
    print("OK", error)
""")


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_offsets_beyond_int32_are_exact():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "OK" in result.stdout


def test_head_stride_of_the_check_passes_int32():
    """The check above exercises 64-bit offsets only if head 2's offset does not fit in 32 bits."""
    assert 2 * 2**30 > torch.iinfo(torch.int32).max >= 2**30
