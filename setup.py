"""Build script. Package metadata lives in pyproject.toml; this file only builds the C++ CPU kernels in csrc/ as the
extension ``mit_kernels._C`` with torch's BuildExtension (ninja, -O3, OpenMP on compile and link).

Environment variables:
    MIT_SKIP_CPU_EXT=1  install without the C++ extension (CPU tensors then use the reference implementation). Without
                        it a missing C++ compiler is an error: the install fails instead of silently losing the
                        fast CPU path.
    MIT_CPU_AVX2=0|1    build the kernels without / with AVX2 + FMA + F16C vector code. Default: with, when the
                        build machine's CPU has them (x86-64); the package is built on the machine that runs it.
    CXX                 the C++ compiler (default ``c++``), as for any torch extension.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CSRC = "csrc"


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value in ("1", "true", "yes", "on")


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= words


def _require_cxx_compiler() -> None:
    cxx = (os.environ.get("CXX") or "c++").split()[0]
    if shutil.which(cxx) is None:
        raise SystemExit(
            f"error: mit builds its C++ CPU kernels (csrc/) at install time, but the C++ compiler {cxx!r} was not "
            "found on PATH. Install one (e.g. `apt-get install g++`, or set CXX), or set MIT_SKIP_CPU_EXT=1 to "
            "install without the compiled CPU backend (CPU tensors then use the slow reference implementation)."
        )


def _cpu_extension() -> dict:
    if _env_flag("MIT_SKIP_CPU_EXT"):
        print("mit: MIT_SKIP_CPU_EXT is set, not building the C++ CPU extension")
        return {}
    _require_cxx_compiler()
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = ["-O3", "-fopenmp"]
    avx2 = _env_flag("MIT_CPU_AVX2")
    if avx2 is None:
        avx2 = _cpu_has_avx2()
    defines = []
    if avx2:
        flags += ["-mavx2", "-mfma", "-mf16c"]
        # Select ATen's AVX2 Vectorized<T> implementations (header-only) for the kernels.
        defines += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    defines.append("-DMIT_COMPILE_FLAGS=" + ",".join(flags))
    sources = sorted(str(Path(CSRC) / p.name) for p in (HERE / CSRC).glob("*.cpp"))
    headers = sorted(str(Path(CSRC) / p.name) for p in (HERE / CSRC).glob("*.h"))
    ext = CppExtension(
        name="mit_kernels._C",
        sources=sources,
        depends=headers,
        extra_compile_args=[*flags, *defines, "-g0", "-Wno-unknown-pragmas"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cpu_extension())
