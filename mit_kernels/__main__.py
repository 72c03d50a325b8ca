"""``python -m mit_kernels``: report which backends this installation can run.

Prints the torch and Triton versions (and whether the Triton interpreter is on), whether the C++ CPU extension is built
(and with how many OpenMP threads, which flags and which GEMM), CUDA availability, and which backend ``"auto"`` picks
for CPU and for CUDA tensors.
"""

from __future__ import annotations

import os

import torch

from . import __version__
from .attention import resolve_backend, triton_available, triton_interpreter_active


def _triton_lines() -> list[str]:
    env = os.environ.get("TRITON_INTERPRET", "")
    if not triton_available():
        return ["triton:         not installed (backend='triton' unavailable)"]
    import triton

    active = triton_interpreter_active()
    return [
        f"triton:         {triton.__version__}",
        f"  interpreter:  {'on' if active else 'off'} (TRITON_INTERPRET={env or '<unset>'}); "
        + ("Triton kernels run on CPU tensors (slowly)" if active else "Triton kernels need CUDA tensors"),
    ]


def _cpu_extension_lines() -> list[str]:
    try:
        from . import cpu_backend
    except ImportError as exc:  # pragma: no cover - the module itself has no hard dependencies
        return [f"C++ extension:  cannot import mit_kernels.cpu_backend ({exc})"]
    info = cpu_backend.extension_info()
    if not info.get("built"):
        return [
            f"C++ extension:  not built: {info.get('reason')}",
            "  (pip install . builds it; MIT_SKIP_CPU_EXT=1 skips it)",
        ]
    usable = "usable" if info["available"] else f"NOT usable: {cpu_backend.unavailable_reason()}"
    lines = [
        f"C++ extension:  built, {usable}",
        f"  threads:      {info['num_threads']} (at::get_num_threads(); OpenMP {'on' if info['openmp'] else 'off'})",
        f"  flags:        {info['compile_flags'].replace(',', ' ')}  (vector ISA {info['vector_isa']})",
        f"  GEMM:         {info['blas']}",
    ]
    return lines


def _cuda_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["CUDA:           not available"]
    index = torch.cuda.current_device()
    return [f"CUDA:           available, device {index}: {torch.cuda.get_device_name(index)}"]


def _auto_lines() -> list[str]:
    cpu = resolve_backend("auto", torch.device("cpu"))
    cuda = resolve_backend("auto", torch.device("cuda"))
    note = "" if torch.cuda.is_available() else " (no CUDA device here)"
    return [f"auto picks:     CPU tensors -> {cpu!r}; CUDA tensors -> {cuda!r}{note}"]


def main() -> None:
    lines = [
        f"mit_kernels:    {__version__}",
        f"torch:          {torch.__version__}",
        *_triton_lines(),
        *_cpu_extension_lines(),
        *_cuda_lines(),
        *_auto_lines(),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
