"""Finding, and if needed compiling, the C++ CPU kernels that match the running torch.

Where a build comes from, in order (the first whose ``stamp.json`` matches the running torch, ISA and sources wins):

1. ``prebuilt``: ``mit_kernels/_prebuilt/``, compiled by ``pip install .`` against the torch installed at that time;
2. ``cached``: a first-use build in ``MIT_KERNELS_CACHE`` (``~/.cache/mit_kernels/torch<version>-<isa>-<hash>/``);
3. ``compiled``: compiled now, at first use of the CPU backend (or by ``python -m mit_kernels build``), with a progress
   message on stderr, into the cache above.

When none can be had (no compiler, no ninja, a failed compile, ``MIT_SKIP_CPU_EXT=1``, a CPU without the ISA of the
only build) CPU tensors use the reference implementation: exact, slower; one warning says why at first use (none when
the user opted out). Importing ``mit_kernels`` never compiles; it loads a matching build that already exists.
``python -m mit_kernels`` says which case holds.

First use is thread-safe and process-safe: the process-wide state is looked up (and the build made) under a lock, so a
thread asking for the kernels while another compiles them waits for that build instead of being told there is none;
two processes compiling into one cache directory take turns on a file lock beside it (:func:`cpu_build.build`), and
the second loads the first one's build instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import threading
import time
import warnings
from types import ModuleType

from . import cpu_build

PREBUILT_DIR = pathlib.Path(__file__).resolve().parent / "_prebuilt"


@dataclasses.dataclass
class ExtensionState:
    """The outcome of looking for (and possibly compiling) the extension.

    Attributes:
        module: the loaded extension (``extension_info()``), or None.
        source: ``"prebuilt"``, ``"cached"``, ``"compiled"`` or None.
        directory: where the loaded build lives.
        reason: why there is no module (None when there is one).
        opted_out: MIT_SKIP_CPU_EXT=1 was set (no warning then).
    """

    module: ModuleType | None = None
    source: str | None = None
    directory: pathlib.Path | None = None
    reason: str | None = None
    opted_out: bool = False


def _opted_out() -> bool:
    return os.environ.get("MIT_SKIP_CPU_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def read_stamp(directory: pathlib.Path) -> dict | None:
    try:
        return json.loads((directory / cpu_build.STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def stamp_mismatch(stamp: dict | None) -> str | None:
    """Why a build with ``stamp`` cannot run here (None when it can): another torch, other sources, or an ISA this
    CPU lacks."""
    if stamp is None:
        return "no build"
    if stamp.get("isa") == "AVX2" and not cpu_build.cpu_has_avx2():
        return "built with AVX2, which this CPU lacks"
    expected = cpu_build.torch_identity()
    for key in ("torch", "torch_git", "cxx11_abi"):
        if stamp.get(key) != expected[key]:
            return f"built for torch {stamp.get('torch')}, running torch {expected['torch']}"
    if stamp.get("sources") != cpu_build.sources_hash():
        return "built from other sources"
    if stamp.get("flags") != " ".join(cpu_build.compile_flags(stamp.get("isa", "DEFAULT"))[0]):
        return "built with other compiler flags"
    return None


def _import_library(directory: pathlib.Path) -> ModuleType:
    return cpu_build.load_library(directory)


def find_existing(prebuilt: pathlib.Path | None = None, cache: pathlib.Path | None = None) -> ExtensionState:
    """Load a matching prebuilt or cached build (default places: :data:`PREBUILT_DIR`, :func:`cpu_build.cache_dir`),
    without compiling anything."""
    if _opted_out():
        return ExtensionState(reason="MIT_SKIP_CPU_EXT is set", opted_out=True)
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    reasons = []
    places = (("prebuilt", prebuilt or PREBUILT_DIR), ("cached", cache or cpu_build.cache_dir()))
    for source, directory in places:
        mismatch = stamp_mismatch(read_stamp(directory))
        if mismatch is None:
            try:
                return ExtensionState(_import_library(directory), source, directory)
            except ImportError as exc:
                mismatch = f"{type(exc).__name__}: {exc}"
        reasons.append(f"{source}: {mismatch}")
    return ExtensionState(reason="; ".join(reasons))


def compile_now(cache: pathlib.Path | None = None, *, verbose: bool = False) -> ExtensionState:
    """Compile into the cache for the running torch and load the result (progress on stderr)."""
    import torch

    directory = cache or cpu_build.cache_dir()
    print(
        f"mit_kernels: compiling the C++ CPU kernels for torch {torch.__version__} into {directory} (once per torch "
        "version; a few minutes; `python -m mit_kernels build` does this ahead of time) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        module = cpu_build.build(directory, verbose=verbose)
    except Exception as exc:  # a compiler error is reported, not raised: the reference path stays exact
        return ExtensionState(reason=f"compiling failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}")
    print(f"mit_kernels: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return ExtensionState(module, "compiled", directory)


_state: ExtensionState | None = None
_compile_attempted = False
_compiling = False  # a first-use compile is running (in some thread)
# held while the state is looked up or the extension compiled: a concurrent caller waits for the outcome (re-entrant:
# the warning below may run user code, e.g. a warnings filter calling back into mit_kernels)
_state_lock = threading.RLock()


def state(*, compile_if_missing: bool = False) -> ExtensionState:
    """The process-wide extension state; ``compile_if_missing`` compiles once when no matching build exists (and
    warns once, with the reason, when that is impossible). Thread-safe: while one thread looks for or compiles the
    extension, others calling this wait for the result (a compile can take minutes).

    Once nothing can change the answer, it is returned without taking the lock (the common case, on every kernel call;
    torch.compile traces through it, and it cannot trace a lock)."""
    current = _state
    if current is not None:
        if current.module is not None or current.opted_out:
            return current  # final
        # read in this order: a compile sets _compiling before _compile_attempted, and _state before clearing
        # _compiling, so "attempted and not compiling" means that compile has finished and _state holds its outcome
        attempted = _compile_attempted
        if not _compiling and (attempted or not compile_if_missing):
            return _state
    with _state_lock:
        return _state_locked(compile_if_missing)


def _state_locked(compile_if_missing: bool) -> ExtensionState:
    global _state, _compile_attempted, _compiling
    if _state is None:
        _state = find_existing()
    if _state.module is None and compile_if_missing and not _compile_attempted and not _state.opted_out:
        _compiling = True
        _compile_attempted = True
        try:
            if cpu_build.compiler() is None:
                cxx = os.environ.get("CXX") or "c++"
                _state = ExtensionState(reason=f"no C++ compiler ({cxx!r} not on PATH) to build them for this torch")
            else:
                _state = compile_now()
        finally:
            _compiling = False
        if _state.module is None:
            warnings.warn(
                f"mit_kernels: the C++ CPU kernels are unavailable ({_state.reason}); CPU tensors use the exact but "
                "slower reference implementation. Install a C++ compiler and run `python -m mit_kernels build`, or "
                "set MIT_SKIP_CPU_EXT=1 to silence this.",
                RuntimeWarning,
                stacklevel=4,  # the caller of state()'s caller, as before the lock
            )
    return _state
