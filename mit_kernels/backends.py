"""The backends of MiT's two operators, in one table: what each runs for :func:`mit_kernels.mit_attention` and
:func:`mit_kernels.mit_ffn_gate`, and what it needs to run.

Both public ops validate their arguments, ask :func:`resolve` for a backend name (``"auto"``
becomes one of these, an explicit name is checked with its :attr:`Backend.refusal`) and call that backend's function
from :data:`BACKEND_TABLE`. Adding a backend is one module (its two functions, its refusal, and its torch.library ops,
registered with :mod:`mit_kernels.registration`) and one entry here; ``"auto"`` picks it only once
:func:`resolve` says when (``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import dispatch, triton_backend
from .reference import mit_attention_reference, mit_ffn_gate_reference
from .sdpa_attention import sdpa_attention
from .validation import check_backend, check_device, check_head_dim


class AttentionFunction(Protocol):
    """A backend's MiT attention on arguments validated by :func:`mit_kernels.mit_attention`: q (B, Hq, Lq, D), k and
    v (B, Hkv, Lk, D), k_mul / k_add / v_mul / v_add (B, Hkv, D), head_logit (Hkv,), kv_mask (B, Lk) bool or None,
    ``scale`` None for ``1/sqrt(D)``. Returns (B, Hq, Lq, D) in q's dtype, differentiable w.r.t. the eight tensors."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_mul: torch.Tensor,
        k_add: torch.Tensor,
        v_mul: torch.Tensor,
        v_add: torch.Tensor,
        head_logit: torch.Tensor,
        *,
        causal: bool,
        scale: float | None,
        kv_mask: torch.Tensor | None,
        rescale: bool,
    ) -> torch.Tensor: ...


class FfnGateFunction(Protocol):
    """A backend's FFN gate on arguments validated by :func:`mit_kernels.mit_ffn_gate`: gate and up (B, L, F), ffn_mul
    (B, F). Returns (B, L, F) in gate's dtype, differentiable w.r.t. the three tensors."""

    def __call__(self, gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor: ...


Refusal = Callable[[torch.device, int | None], str | None]


def runs_anywhere(device: torch.device, head_dim: int | None) -> None:
    """The refusal of a backend that runs on any device and head dim: none."""
    return None


@dataclass(frozen=True)
class Backend:
    """One way of computing MiT's two operators.

    Attributes:
        attention: MiT attention (:class:`AttentionFunction`).
        ffn_gate: the FFN gate (:class:`FfnGateFunction`).
        refusal: ``refusal(device, head_dim)``: why an explicit request for this backend cannot run on ``device`` with
            head dim ``head_dim`` (None for the FFN gate), as the ValueError's message, or None when it can.
        attention_under_auto, ffn_gate_under_auto: what ``backend="auto"`` runs when it picks this backend, when that
            differs from the above (Triton: falls back to an exact path when a kernel cannot be compiled or launched);
            None: the same.
        loaded: for a backend whose functions load their implementation at each call (the C++ kernels), the same
            backend with functions bound to the loaded implementation, for use once :func:`resolve` has accepted it
            (no per-call loading check); None: this entry's functions are already that.
        attention_decoding, ffn_gate_decoding: what a decoding step runs (no grad, inside ``generate``), when that
            differs from the above: the same results, computed by the same kernels, reached more cheaply (the C++
            kernels' direct entries, :func:`mit_kernels.cpu_backend.decoding_attention`); None: the same.
    """

    attention: AttentionFunction
    ffn_gate: FfnGateFunction
    refusal: Refusal = runs_anywhere
    attention_under_auto: AttentionFunction | None = None
    ffn_gate_under_auto: FfnGateFunction | None = None
    loaded: Callable[[], Backend] | None = None
    attention_decoding: AttentionFunction | None = None
    ffn_gate_decoding: FfnGateFunction | None = None

    def attention_for(self, requested: str, decoding: bool = False) -> AttentionFunction:
        """The attention function to run when ``backend=requested`` resolved to this backend (``decoding``: in a
        decoding step)."""
        if decoding and self.attention_decoding is not None:
            return self.attention_decoding
        return self.attention_under_auto if requested == "auto" and self.attention_under_auto else self.attention

    def ffn_gate_for(self, requested: str, decoding: bool = False) -> FfnGateFunction:
        """The FFN gate function to run when ``backend=requested`` resolved to this backend (``decoding``: in a
        decoding step)."""
        if decoding and self.ffn_gate_decoding is not None:
            return self.ffn_gate_decoding
        return self.ffn_gate_under_auto if requested == "auto" and self.ffn_gate_under_auto else self.ffn_gate


# --------------------------------------------------------------------------------------------------------------------
# The C++ kernels: reached through dispatch.cpu_backend(), which loads them (compiling them at first use when no build
# exists); the module mit_kernels.cpu_backend needs a build to work at all.
# --------------------------------------------------------------------------------------------------------------------


def _cpu_refusal(device: torch.device, head_dim: int | None) -> str | None:
    """Why ``backend="cpu"`` cannot run: tensors not on the CPU, or no build of the C++ kernels (and none can be
    compiled)."""
    if device.type != "cpu":
        return f"backend='cpu' needs CPU tensors, got device {device} (use backend='auto', or 'triton' on CUDA)"
    _, reason = dispatch.cpu_backend()
    if reason:
        return (
            f"backend='cpu' needs the compiled C++ kernels, which are not available: {reason}. Install a C++ "
            "compiler and run `python -m mit_kernels build`, or use backend='reference'"
        )
    return None


def _cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    kv_mask: torch.Tensor | None,
    rescale: bool,
) -> torch.Tensor:
    """:func:`mit_kernels.cpu_backend.attention` (:class:`AttentionFunction`)."""
    module, _ = dispatch.cpu_backend()
    return module.attention(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)


def _cpu_ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """:func:`mit_kernels.cpu_backend.ffn_gate` (:class:`FfnGateFunction`)."""
    module, _ = dispatch.cpu_backend()
    return module.ffn_gate(gate, up, ffn_mul)


def _cpu_loaded() -> Backend:
    """The C++ backend bound to its loaded operators (:attr:`Backend.loaded`)."""
    module, reason = dispatch.cpu_backend()
    if module is None:  # resolve() accepted "cpu", so this is a build that disappeared since
        raise RuntimeError(f"mit_kernels.cpu_backend is not available: {reason}")
    return Backend(
        attention=module.loaded_attention, ffn_gate=module.loaded_ffn_gate, refusal=_cpu_refusal,
        attention_decoding=module.decoding_attention, ffn_gate_decoding=module.decoding_ffn_gate,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------------

BACKEND_TABLE: dict[str, Backend] = {
    # The specification, plain PyTorch; any device.
    "reference": Backend(attention=mit_attention_reference, ffn_gate=mit_ffn_gate_reference),
    # The fused Triton kernels; CUDA tensors (CPU tensors under TRITON_INTERPRET=1), head dims up to 256.
    "triton": Backend(
        attention=triton_backend.attention,
        ffn_gate=triton_backend.ffn_gate,
        refusal=triton_backend.refusal,
        attention_under_auto=triton_backend.attention_under_auto,
        ffn_gate_under_auto=triton_backend.ffn_gate_under_auto,
    ),
    # The compiled C++ kernels; CPU tensors.
    "cpu": Backend(attention=_cpu_attention, ffn_gate=_cpu_ffn_gate, refusal=_cpu_refusal, loaded=_cpu_loaded),
    # The infusion in PyTorch, then torch's scaled_dot_product_attention; the FFN gate has no attention: the reference.
    "sdpa": Backend(attention=sdpa_attention, ffn_gate=mit_ffn_gate_reference),
}
"""The backends ``backend=`` names (besides ``"auto"``), in the order :data:`BACKENDS` lists them."""

BACKENDS: tuple[str, ...] = ("auto", *BACKEND_TABLE)
"""The names ``backend=`` accepts: ``"auto"`` (:func:`resolve` picks) and the table's."""


def attention_function(
    backend: str, device: torch.device, head_dim: int, *, decoding: bool = False
) -> AttentionFunction:
    """The function :func:`mit_kernels.mit_attention` runs for ``backend`` on ``device`` with head dim ``head_dim``
    (:func:`resolve`, then the table): callers that built their arguments themselves (the Hugging Face integration,
    once per forward) call it without the public op's validation. ``decoding``: for the decoding steps of
    ``generate`` (no grad, not compiled: :attr:`Backend.attention_decoding`)."""
    return loaded_backend(resolve(backend, device, head_dim)).attention_for(backend, decoding)


def ffn_gate_function(backend: str, device: torch.device, *, decoding: bool = False) -> FfnGateFunction:
    """The function :func:`mit_kernels.mit_ffn_gate` runs for ``backend`` on ``device`` (see
    :func:`attention_function`)."""
    return loaded_backend(resolve(backend, device)).ffn_gate_for(backend, decoding)


def loaded_backend(name: str) -> Backend:
    """The table entry of backend ``name`` (one :func:`resolve` returned), bound to its loaded implementation
    (:attr:`Backend.loaded`)."""
    entry = BACKEND_TABLE[name]
    return entry.loaded() if entry.loaded is not None else entry


def resolve(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """The backend that runs an operator on ``device`` (head dim ``head_dim`` for attention), or ValueError naming
    why the requested one cannot (its :attr:`Backend.refusal`). ``"auto"`` on a CUDA device that Triton cannot use
    returns ``"sdpa"`` and warns (once per cause and device, :class:`mit_kernels.dispatch.MitKernelFallbackWarning`).
    The probes it asks (Triton, the device, the C++ build) live in :mod:`mit_kernels.dispatch`."""
    check_backend(backend, BACKENDS)
    check_device(device)
    check_head_dim(head_dim)
    if backend == "auto":
        if device.type in dispatch.TRITON_DEVICE_TYPES:
            # a head dim too wide for the kernels is a property of the case, not of the device: no warning
            triton_fits = head_dim is None or head_dim <= dispatch.TRITON_MAX_HEAD_DIM
            return dispatch.auto_gpu_backend(device) if triton_fits else "sdpa"
        if device.type == "cpu" and dispatch.cpu_backend_available():
            return "cpu"
        return "reference"
    reason = BACKEND_TABLE[backend].refusal(device, head_dim)
    if reason is not None:
        raise ValueError(reason)
    return backend
