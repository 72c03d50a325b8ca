"""Compiling the C++ CPU kernels (``csrc/``) against the torch that will run them.

One mechanism serves three moments, so a build always matches its torch:

- ``pip install .`` (setup.py) runs this file as a script with the *target* environment's interpreter, outside pip's
  isolated build environment, so it compiles against the torch already installed there (when there is one);
- the first use of the CPU backend compiles it when no matching build exists (a torch upgraded after install, an
  install made before torch was present), once, into a cache directory, with a progress message;
- ``python -m mit_kernels build`` does the same ahead of time.

Each build directory holds ``mit_kernels_cpu.so`` and ``stamp.json`` naming the torch it was compiled against (version
and git hash), the vector ISA and a hash of the sources; a build is loaded only when its stamp matches the running
torch and CPU (:mod:`mit_kernels.cpu_extension`). Builds into one directory take turns: each holds a file lock
(``<directory>.lock`` beside it, released by the OS if the build is killed) while it compiles, and a build that waited
loads the one published meanwhile instead of compiling again.

Environment variables:
    MIT_CPU_AVX2=0|1      build without / with AVX2 + FMA + F16C vector code (default: with, when this CPU has them)
    MIT_KERNELS_CACHE     where first-use builds go (default ``~/.cache/mit_kernels``)
    CXX                   the C++ compiler (default ``c++``), as for any torch extension

This module imports nothing from the package at import time (setup.py runs it as a plain script).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are not serialised across processes there
    fcntl = None  # type: ignore[assignment]

EXTENSION_NAME = "mit_kernels_cpu"
STAMP_NAME = "stamp.json"
_HERE = pathlib.Path(__file__).resolve().parent


def sources_dir() -> pathlib.Path:
    """The C++ sources: ``mit_kernels/csrc`` in an installed package, ``csrc/`` in a source checkout."""
    for candidate in (_HERE / "csrc", _HERE.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources of mit_kernels are missing (looked in {_HERE / 'csrc'} and ../csrc)")


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return None if not value else value in ("1", "true", "yes", "on")


def cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return {"avx2", "fma", "f16c"} <= set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False


def vector_isa() -> str:
    """``"AVX2"`` or ``"DEFAULT"``: what a build made now on this machine uses."""
    avx2 = _env_flag("MIT_CPU_AVX2")
    return "AVX2" if (cpu_has_avx2() if avx2 is None else avx2) else "DEFAULT"


def compile_flags(isa: str) -> tuple[list[str], list[str]]:
    """(C++ flags, linker flags) of a build for ``isa``."""
    flags = ["-O3", "-DNDEBUG", "-fopenmp"]  # NDEBUG: release asserts off, as in torch's own build
    defines = []
    if isa == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c"]
        defines += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]  # ATen's header-only AVX2 Vectorized<T>
    defines.append("-DMIT_COMPILE_FLAGS=" + ",".join(flags))
    return [*flags, *defines, "-g0", "-Wno-unknown-pragmas"], ["-fopenmp"]


def sources_hash(directory: pathlib.Path | None = None) -> str:
    directory = directory or sources_dir()
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.[ch]*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def torch_identity() -> dict[str, str]:
    """What a build must match: the running torch's version and git hash, and its C++ ABI flag."""
    import torch

    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", "") or "",
        "cxx11_abi": str(bool(torch.compiled_with_cxx11_abi())),
    }


def expected_stamp(isa: str | None = None) -> dict[str, str]:
    isa = isa or vector_isa()
    return {**torch_identity(), "isa": isa, "flags": " ".join(compile_flags(isa)[0]), "sources": sources_hash()}


def cache_dir() -> pathlib.Path:
    """Where first-use builds for the running torch and CPU go (one subdirectory per torch / ISA / sources)."""
    root = pathlib.Path(os.environ.get("MIT_KERNELS_CACHE") or pathlib.Path.home() / ".cache" / "mit_kernels")
    stamp = expected_stamp()
    tag = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    torch_version = stamp["torch"].replace("+", "_")
    return root / f"torch{torch_version}-{stamp['isa'].lower()}-{tag}"


def compiler() -> str | None:
    """The C++ compiler's path, or None when it is not on PATH."""
    return shutil.which((os.environ.get("CXX") or "c++").split()[0])


def _remove_stale_builds(directory: pathlib.Path, older_than_s: float = 3600.0) -> None:
    """Private build directories of killed builds (``<name>.tmp-*`` older than an hour)."""
    now = time.time()
    for stale in directory.parent.glob(f"{directory.name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def load_library(directory: pathlib.Path) -> ModuleType:
    """Import the extension library of a build directory (its operators are registered in this process)."""
    path = directory / f"{EXTENSION_NAME}.so"
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[EXTENSION_NAME] = module
    return module


def _published(directory: pathlib.Path, isa: str) -> bool:
    """``directory`` holds a complete build made with the stamp a build here and now would write."""
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp == expected_stamp(isa) and (directory / f"{EXTENSION_NAME}.so").is_file()


@contextlib.contextmanager
def build_lock(directory: pathlib.Path) -> Iterator[None]:
    """Hold the file lock of builds into ``directory`` (``<directory>.lock``, beside it), waiting for another process's
    build to end first (with a message). flock: released by the OS when a holder dies, so a killed build never blocks
    the next one. The lock file stays (removing it would let two builds lock two different files)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(directory.parent / f"{directory.name}.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"mit_kernels: waiting for another process compiling the C++ CPU kernels into {directory} ...",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build(directory: pathlib.Path, *, verbose: bool = False, replace: bool = False):
    """Compile the extension, write its stamp, publish it as ``directory``, and return the loaded module (its
    operators are registered in this process).

    Builds into one ``directory`` take turns (:func:`build_lock`); one that waited for another finds that build
    published and loads it instead of compiling again (unless ``replace``). The compile runs in a private directory
    beside ``directory`` (torch's build lock lives there), which is then renamed into place: a build killed half-way
    (OOM, time limit, Ctrl-C) leaves only its private directory, never a stale lock that would make the next process
    wait forever, and a build cannot corrupt another. When ``directory`` already holds a build (made before these
    locks, or by a process that does not take them), it is kept (ours is discarded) unless ``replace``.

    Raises RuntimeError naming the missing compiler or ninja, or carrying the compiler's error."""
    if compiler() is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX') or 'c++'!r} is not on PATH")
    # ninja may be installed in this environment without its scripts directory being on PATH (venv not activated)
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError("ninja is needed to compile the C++ kernels (pip install ninja)") from exc
    isa = vector_isa()
    cflags, ldflags = compile_flags(isa)
    src = sources_dir()
    with build_lock(directory):
        if not replace and _published(directory, isa):  # built by the process we waited for
            return load_library(directory)
        _remove_stale_builds(directory)
        private = pathlib.Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
        try:
            module = _compile(private, src, cflags, ldflags, verbose)
            (private / STAMP_NAME).write_text(json.dumps(expected_stamp(isa), indent=2, sort_keys=True))
            if replace and directory.exists():
                shutil.rmtree(directory, ignore_errors=True)
            try:
                os.replace(private, directory)
            except OSError:  # a build already there (see above): keep it
                pass
        finally:
            shutil.rmtree(private, ignore_errors=True)  # gone when published; the loaded library stays mapped
    return module


def compile_order(src: pathlib.Path) -> list[pathlib.Path]:
    """The C++ sources in the order ninja starts them: the slowest to compile first (ops.cpp, the operator and autograd
    registration, parses most of torch's autograd headers), so that with two cores the others compile beside it
    instead of after it (about 20% less wall time than alphabetical order)."""
    return sorted(src.glob("*.cpp"), key=lambda p: (p.name != "ops.cpp", p.name))


def _compile(directory: pathlib.Path, src: pathlib.Path, cflags: list[str], ldflags: list[str], verbose: bool):
    from torch.utils import cpp_extension

    module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in compile_order(src)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        verbose=verbose,
        is_python_module=True,
        with_cuda=False,
    )
    library = directory / f"{EXTENSION_NAME}.so"
    if not library.is_file():
        raise RuntimeError(f"the build finished without producing {library}")
    return module


def main(argv: list[str] | None = None) -> int:
    """``python mit_kernels/cpu_build.py --out DIR``: the install-time build (setup.py)."""
    parser = argparse.ArgumentParser(description="Compile mit_kernels' C++ CPU kernels against this torch")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="build directory")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--replace", action="store_true", help="replace a build already in --out")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("mit_kernels: no torch in the target environment yet; the C++ kernels will compile at first use")
        return 3
    print(f"mit_kernels: compiling the C++ CPU kernels against torch {torch.__version__} ({vector_isa()})")
    build(args.out, verbose=args.verbose, replace=args.replace)
    print(f"mit_kernels: built {args.out / (EXTENSION_NAME + '.so')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
