"""Shared test setup.

Without a GPU the Triton kernels run in the Triton interpreter, which must be switched on before any ``@triton.jit``
runs, i.e. before ``mit_kernels`` is imported: this file is imported by pytest before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from attention_cases import DEVICE


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def fresh_triton_fallbacks(monkeypatch):
    """mit_kernels.dispatch's per-process record of where "auto" cannot use Triton (and what it warned about), empty
    for the test and restored after it."""
    from mit_kernels import dispatch

    for name in ("_triton_checked", "_triton_failures", "_fallback_causes"):
        monkeypatch.setattr(dispatch, name, {})
    monkeypatch.setattr(dispatch, "_warned", set())
    return dispatch
