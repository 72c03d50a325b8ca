"""The backend resolver shared by attention and the FFN gate: "auto" picks a backend that can run the case; on CUDA it
takes Triton when Triton can run on the device, else the exact "sdpa" backend with one warning per cause and device.

There is no GPU here: a CUDA device is resolved from its type, with its compute capability monkeypatched."""

from __future__ import annotations

import ast
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from mit_kernels import dispatch
from mit_kernels.backends import resolve
from mit_kernels.dispatch import TRITON_MAX_HEAD_DIM, MitKernelFallbackWarning

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def gpu(fresh_triton_fallbacks, monkeypatch):
    """Fresh fallback records and CUDA devices of compute capability 9.0 (an H100) unless a test says otherwise."""
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    return fresh_triton_fallbacks


def _resolve_quietly(*args, **kwargs) -> str:
    """resolve(), asserting it does not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MitKernelFallbackWarning)
        return resolve(*args, **kwargs)


def test_auto_takes_triton_on_cuda_only_when_the_head_dim_fits(gpu):
    assert _resolve_quietly("auto", CUDA0, head_dim=128) == "triton"
    assert _resolve_quietly("auto", CUDA0) == "triton"  # FFN gate: no head dim
    # A head dim above the kernels' limit is a property of the case: the exact SDPA path, without a warning.
    assert _resolve_quietly("auto", CUDA0, head_dim=TRITON_MAX_HEAD_DIM + 64) == "sdpa"
    with pytest.raises(ValueError, match=r"backend='triton' supports head dims D <= 256, got D=320"):
        resolve("triton", CUDA0, head_dim=320)
    assert dispatch.triton_fallback_causes() == {}


def test_auto_on_cpu_and_meta(monkeypatch):
    expected = "cpu" if dispatch.cpu_backend_available() else "reference"
    assert resolve("auto", torch.device("cpu")) == expected
    assert resolve("auto", torch.device("meta")) == "reference"
    monkeypatch.setattr(dispatch, "cpu_backend_available", lambda: False)
    assert resolve("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton', 'cpu', 'sdpa'\)"):
        resolve("gpu", torch.device("cpu"))


@pytest.mark.parametrize("device", ["cpu", "cuda:0", "meta"])
@pytest.mark.parametrize("head_dim", [None, 64, 512])
def test_sdpa_is_an_explicit_backend_on_any_device(gpu, device, head_dim):
    assert _resolve_quietly("sdpa", torch.device(device), head_dim=head_dim) == "sdpa"


@pytest.mark.parametrize(
    "setup, cause",
    [
        (lambda mp: mp.setattr(dispatch, "device_capability", lambda device: (7, 0)), "compute capability 7.0 < 8.0"),
        (lambda mp: mp.setattr(dispatch, "device_capability", lambda device: (7, 5)), "compute capability 7.5 < 8.0"),
        (lambda mp: mp.setattr(dispatch, "triton_version", lambda: (3, 2)), "Triton 3.2 is older than 3.6"),
        (lambda mp: mp.setattr(dispatch, "triton_available", lambda: False), "Triton is not installed"),
    ],
)
def test_auto_falls_back_to_sdpa_once_per_cause_and_device(gpu, monkeypatch, setup, cause):
    setup(monkeypatch)
    for device in (CUDA0, CUDA1):
        with pytest.warns(MitKernelFallbackWarning) as record:
            assert resolve("auto", device, head_dim=64) == "sdpa"
        assert len(record) == 1
        message = str(record[0].message)
        assert f"cannot use the Triton kernels on {device}: {cause}." in message and "'sdpa'" in message
        # Later calls on that device, attention or FFN gate, run sdpa without another warning.
        assert _resolve_quietly("auto", device, head_dim=64) == "sdpa"
        assert _resolve_quietly("auto", device) == "sdpa"
    assert dispatch.triton_fallback_causes() == {"cuda:0": cause, "cuda:1": cause}
    assert _resolve_quietly("auto", torch.device("cpu")) in ("cpu", "reference")  # CPU tensors are not affected


def test_capability_8_0_and_triton_3_6_are_enough(gpu, monkeypatch):
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (8, 0))
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 6))
    assert _resolve_quietly("auto", CUDA0, head_dim=64) == "triton"
    assert dispatch.triton_unusable_reason(CUDA0) is None


def test_the_capability_is_read_once_per_device(gpu, monkeypatch):
    reads = []
    monkeypatch.setattr(dispatch, "device_capability", lambda device: reads.append(device) or (9, 0))
    for _ in range(3):
        assert resolve("auto", CUDA0, head_dim=64) == resolve("auto", CUDA1) == "triton"
    assert reads == [CUDA0, CUDA1]


def test_a_recorded_failure_sends_only_that_device_to_sdpa(gpu):
    assert _resolve_quietly("auto", CUDA0, head_dim=64) == "triton"
    error = PTXASError("Internal Triton PTX codegen error\n`ptxas` stderr: ...")
    with pytest.warns(MitKernelFallbackWarning, match=r"on cuda:0: a Triton kernel failed to compile or launch") as r:
        dispatch.record_triton_failure(CUDA0, error)
    assert len(r) == 1
    cause = "a Triton kernel failed to compile or launch (PTXASError: Internal Triton PTX codegen error)"
    assert dispatch.triton_fallback_causes() == {"cuda:0": cause}
    assert _resolve_quietly("auto", CUDA0, head_dim=64) == "sdpa"
    assert _resolve_quietly("auto", CUDA1, head_dim=64) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MitKernelFallbackWarning)
        dispatch.record_triton_failure(CUDA0, error)  # the same cause again: no second warning
    assert resolve("triton", CUDA0, head_dim=64) == "triton"  # an explicit backend is not redirected


def _compilation_error(message: str) -> CompilationError:
    source = "def kernel(x):\n    tl.dot(x, x)\n"
    return CompilationError(source, ast.parse(source).body[0].body[0], message)


@pytest.mark.parametrize(
    "exc, recognised",
    [
        (_compilation_error("dot operands must be 2-D\nmore detail"), True),
        (OutOfResources(232448, 101376, "shared memory"), True),
        (PTXASError("`ptxas` failed with error code 255"), True),
        (RuntimeError("Triton Error [CUDA]: no kernel image is available for execution on the device"), True),
        (RuntimeError("Triton Error [CUDA]: the provided PTX was compiled with an unsupported toolchain."), True),
        (RuntimeError("Triton Error [CUDA]: too many resources requested for launch"), True),
        (RuntimeError("Triton Error [HIP]:  Code: 98, Messsage: invalid device function"), True),
        (RuntimeError("PassManager::run failed"), True),
        # errors a running kernel causes: a bug, and the CUDA context is gone for any fallback
        (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), False),
        (RuntimeError("Triton Error [CUDA]: out of memory"), False),
        (ValueError("q must have 4 dimensions (B, Hq, Lq, D), got shape (4, 5, 16)"), False),
        (RuntimeError("shape mismatch in the kernel's output"), False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (TypeError("Triton Error [CUDA]: not a RuntimeError"), False),
    ],
)
def test_which_errors_count_as_triton_compile_or_launch_failures(exc, recognised):
    assert dispatch.is_triton_failure(exc) is recognised


def test_failure_description_is_the_type_and_first_line_of_the_error():
    # A CompilationError's message starts with the source excerpt: the description names the error itself.
    assert dispatch.describe_triton_failure(_compilation_error("dot operands must be 2-D\nmore")) == (
        "CompilationError: dot operands must be 2-D"
    )
    assert dispatch.describe_triton_failure(OutOfResources(232448, 101376, "shared memory")).startswith(
        "OutOfResources: out of resource: shared memory, Required: 232448, Hardware limit: 101376."
    )
    assert dispatch.describe_triton_failure(RuntimeError("\n  Triton Error [CUDA]: x\ny")) == (
        "RuntimeError: Triton Error [CUDA]: x"
    )


def test_triton_version_is_read_from_the_installed_package(monkeypatch):
    import triton

    assert dispatch.triton_version() == tuple(int(x) for x in triton.__version__.split(".")[:2])
    for text, expected in [("3.6.0", (3, 6)), ("3.10.1+git1234", (3, 10)), ("4.0", (4, 0)), ("nightly", None)]:
        monkeypatch.setattr(triton, "__version__", text)
        assert dispatch.triton_version() == expected
    monkeypatch.setattr(triton, "__version__", "nightly")
    assert dispatch.triton_software_reason() == "Triton's version 'nightly' cannot be read (needs >= 3.6)"


def test_report_says_which_gpu_path_auto_takes(gpu, monkeypatch):
    from mit_kernels.__main__ import _auto_lines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_line, cuda_line = _auto_lines()
    assert cpu_line.startswith("auto picks:     CPU tensors -> '")
    assert cuda_line.strip() == (
        "CUDA tensors -> 'triton' (fused kernels) if the device's compute capability is >= 8.0 (checked on the "
        "device), else 'sdpa' (exact: infusion + torch SDPA) (no CUDA device here)"
    )
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 2))
    assert _auto_lines()[1].strip() == (
        "CUDA tensors -> 'sdpa' (exact: infusion + torch SDPA) because Triton 3.2 is older than 3.6 (no CUDA device "
        "here)"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 8))
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (7, 0))
    assert _auto_lines()[1].strip() == (
        "CUDA tensors -> 'sdpa' (exact: infusion + torch SDPA) because compute capability 7.0 < 8.0"
    )


def test_a_wide_head_dim_runs_on_auto(monkeypatch):
    """A head dim above the Triton limit used to raise under backend="auto"; it now runs on a backend that can."""
    from mit_kernels import mit_attention, mit_attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 272, generator=g) for _ in range(3))
    vectors = [0.1 * torch.randn(1, 1, 272, generator=g) for _ in range(4)]
    out = mit_attention(q, k, v, *vectors, torch.ones(1))
    torch.testing.assert_close(out, mit_attention_reference(q, k, v, *vectors, torch.ones(1)))
