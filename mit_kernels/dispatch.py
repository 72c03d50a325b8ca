"""Which backend runs an operator: availability probes and the one resolver used by attention and the FFN gate.

The backends themselves, and what each needs to run, are the table :data:`mit_kernels.backends.BACKEND_TABLE`:
``"reference"`` (the PyTorch specification, :mod:`mit_kernels.reference`; runs anywhere), ``"triton"`` (fused kernels
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, :mod:`mit_kernels.triton_backend`), ``"cpu"`` (the
compiled C++ kernels on CPU tensors, :mod:`mit_kernels.cpu_backend`), ``"sdpa"`` (exact: the infusion in eager
PyTorch, then torch's ``scaled_dot_product_attention``, :mod:`mit_kernels.sdpa_attention`; any device; the FFN gate
has no attention and runs the reference there). :func:`resolve` adds ``"auto"``: the fastest backend that can run the
case — on CUDA, Triton when it can run on that device and the head dim fits its kernels, else ``"sdpa"``; on CPU the
C++ kernels when a build for the running torch exists or can be compiled, else the reference. An explicit backend that
cannot run the case raises ValueError saying why.

Triton cannot run on a CUDA device when it is not installed, when it is older than :data:`TRITON_MIN_VERSION`, when
the device's compute capability is below :data:`TRITON_MIN_CAPABILITY`, or when compiling or launching one of its
kernels failed on that device in this process (:func:`record_triton_failure`). ``"auto"`` then runs ``"sdpa"`` there,
and says so once per cause and device with a :class:`MitKernelFallbackWarning`; :func:`triton_fallback_causes` lists
what happened.
"""

from __future__ import annotations

import re
import warnings
from types import ModuleType

import torch

TRITON_MAX_HEAD_DIM = 256
TRITON_MIN_VERSION = (3, 6)  # the lowest Triton (major, minor) the kernels support; pyproject's triton>= bound
TRITON_MIN_CAPABILITY = (8, 0)  # Ampere: the oldest GPUs with the bf16 tensor-core dots the kernels use
TRITON_DEVICE_TYPES = ("cuda",)  # device types on which "auto" runs the Triton kernels (ROCm devices are "cuda" too)
# Driver errors (cuGetErrorString / hipGetErrorString, lower case) that mean the device cannot load or launch a
# compiled kernel at all, as opposed to errors a running kernel causes.
UNLOADABLE_KERNEL_ERRORS = (
    "no kernel image is available",
    "a ptx jit compilation failed",
    "the provided ptx was compiled with an unsupported toolchain",
    "device kernel image is invalid",
    "too many resources requested for launch",
    "invalid device function",
)


class MitKernelFallbackWarning(UserWarning):
    """``backend="auto"`` cannot use the Triton kernels on a device and runs the exact ``"sdpa"`` backend there."""


# Per device (``str(device)``, e.g. "cuda:0"): why Triton cannot run there, found before any launch (None: it can).
_triton_checked: dict[str, str | None] = {}
# Per device: the compile / launch failure of a Triton kernel recorded in this process.
_triton_failures: dict[str, str] = {}
# Per device: the cause "auto" fell back for (the first one; a later one is added after "; ").
_fallback_causes: dict[str, str] = {}
# (device, cause) pairs already warned about.
_warned: set[tuple[str, str]] = set()


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


def triton_version() -> tuple[int, int] | None:
    """The installed Triton's (major, minor) version, or None when Triton is not installed or its version string does
    not start with two numbers."""
    if not triton_available():
        return None
    import triton

    match = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def triton_software_reason() -> str | None:
    """Why no device can run the Triton kernels with this installation (Triton missing or too old), or None."""
    if not triton_available():
        return "Triton is not installed"
    version = triton_version()
    minimum = ".".join(map(str, TRITON_MIN_VERSION))
    if version is None:
        import triton

        return f"Triton's version {getattr(triton, '__version__', None)!r} cannot be read (needs >= {minimum})"
    if version < TRITON_MIN_VERSION:
        return f"Triton {version[0]}.{version[1]} is older than {minimum}"
    return None


def device_capability(device: torch.device) -> tuple[int, int]:
    """The (major, minor) compute capability of the CUDA ``device``."""
    return tuple(torch.cuda.get_device_capability(device))


def device_key(device: torch.device) -> str:
    """The name fallbacks are recorded under: ``str(device)``, with the current CUDA device's index filled in for a
    bare ``torch.device("cuda")`` (a tensor's device always has its index)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def triton_unusable_reason(device: torch.device) -> str | None:
    """Why ``backend="auto"`` cannot run the Triton kernels on the GPU ``device``, or None when it can: Triton missing
    or older than :data:`TRITON_MIN_VERSION`, a compute capability below :data:`TRITON_MIN_CAPABILITY`, or a compile /
    launch failure recorded on that device in this process. Reads the capability once per device; never warns."""
    key = device_key(device)
    if key in _triton_failures:
        return _triton_failures[key]
    if key not in _triton_checked:
        reason = triton_software_reason()
        if reason is None:
            capability = device_capability(device)
            if capability < TRITON_MIN_CAPABILITY:
                reason = "compute capability {}.{} < {}.{}".format(*capability, *TRITON_MIN_CAPABILITY)
        _triton_checked[key] = reason
    return _triton_checked[key]


def is_triton_failure(exc: BaseException) -> bool:
    """``exc`` says that a Triton kernel could not be compiled or launched on this device (so the exact ``"sdpa"``
    path should run instead), as opposed to a bug or bad input, which must propagate.

    Recognised: Triton's own errors (``triton.TritonError``: ``CompilationError``, ``OutOfResources``,
    ``PTXASError``, ``AutotunerError``); the ``RuntimeError`` Triton's driver raises when the device cannot load or
    launch the compiled kernel (its message starts with ``"Triton Error [CUDA]: "`` / ``"Triton Error [HIP]: "`` and
    names one of :data:`UNLOADABLE_KERNEL_ERRORS`, e.g. "no kernel image is available for execution on the device");
    and the ``RuntimeError`` of a failed MLIR / LLVM lowering (``"PassManager::run failed"``, ``"failed to translate
    module to LLVM IR"``). Everything else is not: a ``ValueError`` from input validation, torch's out-of-memory
    error, a driver error that a running kernel causes (an illegal memory access is a bug, and it leaves the CUDA
    context unusable for any fallback), any other exception."""
    if not triton_available():
        return False
    try:
        from triton.errors import TritonError
    except ImportError:  # Triton < 3.2 has no common base class; "auto" never runs it (TRITON_MIN_VERSION)
        return False
    if isinstance(exc, TritonError):
        return True
    if type(exc) is not RuntimeError:
        return False
    message = str(exc).strip()
    if message.startswith(("Triton Error [CUDA]:", "Triton Error [HIP]:")):
        return any(error in message.lower() for error in UNLOADABLE_KERNEL_ERRORS)
    return message in ("PassManager::run failed", "failed to translate module to LLVM IR")


def describe_triton_failure(exc: BaseException) -> str:
    """The exception's type and the first line of its message (for a ``CompilationError``, of the error itself
    rather than of the source excerpt it starts with)."""
    message = getattr(exc, "error_message", None) or str(exc)
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def record_triton_failure(device: torch.device, exc: BaseException, stacklevel: int = 2) -> None:
    """Note that a Triton kernel failed to compile or launch on ``device`` (``exc``, see :func:`is_triton_failure`):
    ``backend="auto"`` runs ``"sdpa"`` there from now on. Warns once per cause and device; ``stacklevel`` is that of
    a ``warnings.warn`` in the caller (1: the line calling this function; 2: the line calling the caller)."""
    key = device_key(device)
    cause = f"a Triton kernel failed to compile or launch ({describe_triton_failure(exc)})"
    _triton_failures.setdefault(key, cause)
    _fall_back(key, cause, stacklevel=stacklevel + 2)


def _fall_back(key: str, cause: str, stacklevel: int) -> None:
    """Record that ``auto`` runs ``"sdpa"`` on device ``key`` because of ``cause``; one warning per cause and device
    (``stacklevel`` counted from this function)."""
    if (key, cause) in _warned:
        return
    _warned.add((key, cause))
    _fallback_causes[key] = f"{_fallback_causes[key]}; {cause}" if key in _fallback_causes else cause
    warnings.warn(
        f"mit_kernels: backend='auto' cannot use the Triton kernels on {key}: {cause}. It runs the exact 'sdpa' "
        "backend there instead (the infusion in PyTorch, then torch's scaled_dot_product_attention; the FFN gate in "
        "PyTorch): same results, without the fused kernels' speed and memory savings. backend='sdpa' selects it "
        "without this warning; backend='triton' insists on the Triton kernels.",
        MitKernelFallbackWarning,
        stacklevel=stacklevel,
    )


def triton_fallback_causes() -> dict[str, str]:
    """Per device (e.g. ``"cuda:0"``), why ``backend="auto"`` fell back from Triton to ``"sdpa"`` in this process
    (empty when it never did). A copy: changing it changes nothing."""
    return dict(_fallback_causes)


@torch.compiler.assume_constant_result
def auto_gpu_backend(device: torch.device) -> str:
    """``"triton"`` when the Triton kernels can run on the GPU ``device``, else ``"sdpa"`` (warning once per cause and
    device). torch.compile runs it once while tracing (a warning cannot be traced) and keeps the answer: the decision
    is fixed per device except for a failure recorded later, which a compiled graph does not see."""
    reason = triton_unusable_reason(device)
    if reason is None:
        return "triton"
    _fall_back(device_key(device), reason, stacklevel=5)  # the caller of mit_attention / mit_ffn_gate
    return "sdpa"
