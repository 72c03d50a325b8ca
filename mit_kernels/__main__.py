"""``python -m mit_kernels``: report which backends this installation can run; ``python -m mit_kernels build``:
compile the C++ CPU kernels for the running torch now (instead of at first use); ``python -m mit_kernels
compile-check``: compile every Triton kernel for sm_80 / sm_90 without a GPU and compare it with a plain
flash-attention kernel (:mod:`mit_kernels.compile_check`).

The report prints the torch and Triton versions (and whether the Triton interpreter is on), which build of the C++ CPU
kernels is loaded (prebuilt at install, cached, or none, and why; its OpenMP threads, flags and GEMM), CUDA
availability, and which backend ``"auto"`` picks for CPU and for CUDA tensors. It never compiles.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import __version__
from .attention import triton_available, triton_interpreter_active


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
    from . import cpu_backend, cpu_build

    info = cpu_backend.extension_info()
    if not info.get("built"):
        if info.get("opted_out"):
            return ["C++ extension:  not used (MIT_SKIP_CPU_EXT is set): CPU tensors use the reference path"]
        if cpu_build.compiler() is None:
            return [
                f"C++ extension:  no build for torch {torch.__version__} ({info.get('reason')})",
                "  and no C++ compiler: CPU tensors use the exact reference path (install g++, then "
                "`python -m mit_kernels build`)",
            ]
        return [
            f"C++ extension:  no build for torch {torch.__version__} yet ({info.get('reason')})",
            "  it compiles at first use of a CPU tensor (once), or now: `python -m mit_kernels build`",
        ]
    return [
        f"C++ extension:  {info['source']} build for torch {torch.__version__}, usable ({info['directory']})",
        f"  threads:      {info['num_threads']} (at::get_num_threads(); OpenMP {'on' if info['openmp'] else 'off'})",
        f"  flags:        {info['compile_flags'].replace(',', ' ')}  (vector ISA {info['vector_isa']})",
        f"  GEMM:         {info['blas']}",
    ]


def _cuda_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["CUDA:           not available"]
    index = torch.cuda.current_device()
    return [f"CUDA:           available, device {index}: {torch.cuda.get_device_name(index)}"]


def _gpu_auto_choice() -> str:
    """What ``backend="auto"`` runs on CUDA tensors: Triton, or the exact "sdpa" backend and why. On a machine without
    CUDA, what it would run given the installed Triton (the compute capability is read on the device)."""
    from . import dispatch

    triton = "'triton' (fused kernels)"
    sdpa = "'sdpa' (exact: infusion + torch SDPA)"
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        reason = dispatch.triton_unusable_reason(device)
        return triton if reason is None else f"{sdpa} because {reason}"
    reason = dispatch.triton_software_reason()
    if reason is not None:
        return f"{sdpa} because {reason}"
    minimum = "{}.{}".format(*dispatch.TRITON_MIN_CAPABILITY)
    return f"{triton} if the device's compute capability is >= {minimum} (checked on the device), else {sdpa}"


def _auto_lines() -> list[str]:
    from . import cpu_backend, cpu_build, cpu_extension

    if cpu_backend.extension_info().get("built"):
        cpu = "'cpu'"
    elif not cpu_extension.state().opted_out and cpu_build.compiler() is not None:
        cpu = "'cpu' (after compiling at first use)"
    else:
        cpu = "'reference'"
    note = "" if torch.cuda.is_available() else " (no CUDA device here)"
    return [f"auto picks:     CPU tensors -> {cpu}", f"                CUDA tensors -> {_gpu_auto_choice()}{note}"]


def build(force: bool, verbose: bool) -> int:
    """Compile the C++ CPU kernels for the running torch into the cache (unless a matching build is loaded)."""
    from . import cpu_extension

    existing = cpu_extension.state()
    if existing.module is not None and not force:
        print(f"mit_kernels: a {existing.source} build for torch {torch.__version__} is in place: {existing.directory}")
        return 0
    if existing.module is not None:  # its operators are registered in this process: compile in a fresh one
        import subprocess

        from . import cpu_build

        command = [sys.executable, cpu_build.__file__, "--out", str(cpu_build.cache_dir()), "--replace"]
        return subprocess.run(command + (["--verbose"] if verbose else [])).returncode
    result = cpu_extension.compile_now(verbose=verbose)
    if result.module is None:
        print(f"mit_kernels: {result.reason}", file=sys.stderr)
        return 1
    print(f"mit_kernels: built {result.directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mit_kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    build_parser = sub.add_parser("build", help="compile the C++ CPU kernels for the running torch now")
    build_parser.add_argument("--force", action="store_true", help="recompile even if a matching build exists")
    build_parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    sub.add_parser(
        "compile-check",
        add_help=False,
        help="compile every Triton kernel for real GPU targets (no GPU needed); --help for its options",
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["compile-check"]:  # its own options: mit_kernels.compile_check.main
        from . import compile_check

        return compile_check.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.force, args.verbose)
    lines = [
        f"mit_kernels:    {__version__}",
        f"torch:          {torch.__version__}",
        *_triton_lines(),
        *_cpu_extension_lines(),
        *_cuda_lines(),
        *_auto_lines(),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
