"""Which backend runs an operator: availability probes and the one resolver used by attention and the FFN gate.

Backends: ``"reference"`` (the PyTorch specification, :mod:`mit_kernels.reference`; runs anywhere), ``"triton"`` (fused
kernels on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``), ``"cpu"`` (the compiled C++ kernels on CPU
tensors, :mod:`mit_kernels.cpu_extension`), and ``"auto"``: the fastest backend that can run the case — Triton on
CUDA when the head dim fits its kernels, the C++ kernels on CPU when a build for the running torch exists or can be
compiled, the reference otherwise. An explicit backend that cannot run the case raises ValueError saying why.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .validation import check_backend, check_device, check_head_dim

BACKENDS = ("auto", "reference", "triton", "cpu")
TRITON_MAX_HEAD_DIM = 256


def triton_available() -> bool:
    """Triton is importable (it may still need a CUDA device or TRITON_INTERPRET=1 to run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_active() -> bool:
    """The Triton kernels are (or will be) defined under TRITON_INTERPRET=1, so they run on CPU tensors."""
    if not triton_available():
        return False
    from .triton_common import interpreter_active

    return interpreter_active()


def cpu_backend(compile_if_missing: bool = True) -> tuple[ModuleType | None, str | None]:
    """The C++ backend module (:mod:`mit_kernels.cpu_backend`) when a build for the running torch is loaded (compiled
    now, once, when ``compile_if_missing`` and none exists), else None and the reason."""
    try:
        from . import cpu_backend as module
    except ImportError as exc:  # pragma: no cover - only when the module itself is missing or broken
        return None, f"mit_kernels.cpu_backend cannot be imported ({exc})"
    if module.available(compile_if_missing):
        return module, None
    return None, module.unavailable_reason()


def cpu_backend_available() -> bool:
    """The C++ CPU backend matching the running torch is loaded, compiling it now (once) if none exists."""
    return cpu_backend()[0] is not None


def resolve(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """The backend that runs an operator on ``device`` (head dim ``head_dim`` for attention), or ValueError naming
    why the requested one cannot."""
    check_backend(backend, BACKENDS)
    check_device(device)
    check_head_dim(head_dim)
    triton_fits = head_dim is None or head_dim <= TRITON_MAX_HEAD_DIM
    if backend == "auto":
        if device.type == "cuda" and triton_available() and triton_fits:
            return "triton"
        if device.type == "cpu" and cpu_backend_available():
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' needs CPU tensors, got device {device} (use backend='auto', or 'triton' on CUDA)"
            )
        _, reason = cpu_backend()
        if reason:
            raise ValueError(
                f"backend='cpu' needs the compiled C++ kernels, which are not available: {reason}. Install a C++ "
                "compiler and run `python -m mit_kernels build`, or use backend='reference'"
            )
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton), which is not installed")
        if device.type == "cpu" and not triton_interpreter_active():
            env = os.environ.get("TRITON_INTERPRET", "<unset>")
            raise ValueError(
                "backend='triton' got CPU tensors, but the Triton interpreter is off (TRITON_INTERPRET="
                f"{env} when the kernels were defined): use CUDA tensors, or set TRITON_INTERPRET=1 in the "
                "environment before importing mit_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}")
        if not triton_fits:
            raise ValueError(
                f"backend='triton' supports head dims D <= {TRITON_MAX_HEAD_DIM}, got D={head_dim} "
                "(use backend='auto' or 'reference')"
            )
    return backend
