"""The backend resolver shared by attention and the FFN gate: "auto" picks a backend that can run the case."""

from __future__ import annotations

import pytest
import torch

from mit_kernels import dispatch
from mit_kernels.dispatch import TRITON_MAX_HEAD_DIM, resolve


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_auto_takes_triton_on_cuda_only_when_the_head_dim_fits():
    cuda = torch.device("cuda")  # resolution needs no device: it reads the device type
    assert resolve("auto", cuda, head_dim=128) == "triton"
    assert resolve("auto", cuda) == "triton"  # FFN gate: no head dim
    assert resolve("auto", cuda, head_dim=TRITON_MAX_HEAD_DIM + 64) == "reference"
    with pytest.raises(ValueError, match=r"backend='triton' supports head dims D <= 256, got D=320"):
        resolve("triton", cuda, head_dim=320)


def test_auto_on_cpu_and_meta(monkeypatch):
    expected = "cpu" if dispatch.cpu_backend_available() else "reference"
    assert resolve("auto", torch.device("cpu")) == expected
    assert resolve("auto", torch.device("meta")) == "reference"
    monkeypatch.setattr(dispatch, "cpu_backend_available", lambda: False)
    assert resolve("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton', 'cpu'\)"):
        resolve("gpu", torch.device("cpu"))


def test_a_wide_head_dim_runs_on_auto(monkeypatch):
    """A head dim above the Triton limit used to raise under backend="auto"; it now runs on a backend that can."""
    from mit_kernels import mit_attention, mit_attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 272, generator=g) for _ in range(3))
    vectors = [0.1 * torch.randn(1, 1, 272, generator=g) for _ in range(4)]
    out = mit_attention(q, k, v, *vectors, torch.ones(1))
    torch.testing.assert_close(out, mit_attention_reference(q, k, v, *vectors, torch.ones(1)))
