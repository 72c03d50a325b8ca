"""Build script. Package metadata lives in pyproject.toml; this file ships the C++ sources of the CPU kernels
(``csrc/``) inside the package and, where it can, compiles them at install time against the torch of the environment
being installed into.

pip builds in an isolated environment that does not contain the user's torch, so the compile runs in a subprocess of
the target interpreter with pip's isolation variables removed (``mit_kernels/cpu_build.py``): it sees the torch that
will run the kernels. When that environment has no torch yet (it is being installed alongside), or the compile fails,
the install still succeeds and the kernels compile at first use instead (``mit_kernels/cpu_extension.py``); every
build is stamped with its torch and loaded only by that torch.

Environment variables:
    MIT_SKIP_CPU_EXT=1  do not compile at install time (nor at first use: CPU tensors then use the reference
                        implementation)
    MIT_CPU_AVX2=0|1    build without / with AVX2 + FMA + F16C vector code (default: with, when the CPU has them)
    CXX                 the C++ compiler (default ``c++``), as for any torch extension
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE = "mit_kernels"
PREBUILT = "_prebuilt"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _target_environment() -> dict[str, str]:
    """The environment of the interpreter being installed into: pip's build isolation removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")}
    return env


class BuildWithKernels(build_py):
    """build_py + the C++ sources as package data + an install-time compile against the target torch."""

    def run(self) -> None:
        super().run()
        package_dir = Path(self.build_lib) / PACKAGE
        sources = package_dir / "csrc"
        sources.mkdir(parents=True, exist_ok=True)
        for path in sorted((HERE / "csrc").glob("*.[ch]*")):
            shutil.copy2(path, sources / path.name)
        prebuilt = package_dir / PREBUILT
        shutil.rmtree(prebuilt, ignore_errors=True)
        if _env_flag("MIT_SKIP_CPU_EXT"):
            print("mit: MIT_SKIP_CPU_EXT is set, not compiling the C++ CPU kernels")
            return
        work = HERE / "build" / "mit_kernels_cpu"
        command = [sys.executable, str(HERE / PACKAGE / "cpu_build.py"), "--out", str(work), "--replace"]
        result = subprocess.run(command, env=_target_environment(), cwd=HERE, capture_output=True, text=True)
        print(result.stdout[-4000:])
        if result.returncode == 3:  # no torch in the target environment yet
            return
        if result.returncode != 0:
            print(
                "mit: WARNING: compiling the C++ CPU kernels failed; they will be compiled at first use (or run "
                "`python -m mit_kernels build` to see the error). Compiler output:\n" + result.stderr[-4000:]
            )
            return
        prebuilt.mkdir(parents=True)
        for name in ("mit_kernels_cpu.so", "stamp.json"):
            shutil.copy2(work / name, prebuilt / name)


class BinaryDistribution(Distribution):
    """The wheel may carry a compiled library: tag it for this platform and Python."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithKernels}, distclass=BinaryDistribution)
