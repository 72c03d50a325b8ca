"""The compiled CPU backend: C++ kernels (``csrc/``, compiled against the running torch by ``pip install .`` or at first
use, see :mod:`mit_kernels.cpu_extension`) for MiT attention and the FFN infusion gate.

The C++ extension registers four operators on the CPU dispatch key::

    mit_kernels::attention_cpu_fwd(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale)
        -> (out, lse)                     lse (B, Hq, Lq): natural log-sum-exp, fp32 (fp64 for fp64 inputs)
    mit_kernels::attention_cpu_bwd(grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse,
                                   causal, scale, rescale) -> the eight input gradients
    mit_kernels::ffn_gate_cpu_fwd(gate, up, ffn_mul) -> silu(gate) * up * (1 + ffn_mul[:, None, :])
    mit_kernels::ffn_gate_cpu_bwd(grad_out, gate, up, ffn_mul) -> (d gate, d up, d ffn_mul)

The extension also registers their autograd formulas, in C++ (``csrc/ops.cpp``, a ``torch::autograd::Function`` on
the Autograd key: the backward ops are the derivatives of the forward ops), so that a call under ``no_grad`` (every
decoding step) costs no Python. This module adds the rest of what torch needs around them, as for every fused op
(:func:`mit_kernels.registration.register_fake_and_flops`, shapes and FLOPs from :mod:`mit_kernels.op_kinds`): fake
(meta) kernels, so torch.compile traces through without a graph break, and FLOP formulas for
``torch.utils.flop_counter.FlopCounterMode`` (torch's SDPA convention for attention, elementwise FLOPs for the FFN
gate).

Kernels (details in ``csrc/attention_fwd.cpp`` and ``csrc/attention_bwd.cpp``): the forward is a flash-attention
forward with the infusion fused into the loading of each key block (no K', V' or (Lq, Lk) buffer), stacking the query
heads of a GQA group so each infused key block serves all of them; few query rows (decoding) take a flash-decoding
kernel that splits the keys across threads and infuses each cached K / V row on the fly. The backward is a
flash-attention-2 backward with the infusion gradients fused in, bitwise reproducible run to run (for a given thread
count). Everything accumulates in fp32 (fp64 for fp64 inputs); fp32, bf16, fp16 and fp64 are supported.
"""

from __future__ import annotations

import math
import threading

import torch  # must be imported before the extension (it links against libtorch)

from . import cpu_extension
from .op_kinds import ATTENTION, FFN_GATE
from .registration import register_fake_and_flops

_direct = None  # the loaded extension module (its direct entries: decoding_attention / decoding_ffn_gate)


def _extension(compile_if_missing: bool = False):
    """The extension module (or None); registers the Python side of its operators the first time it is there."""
    global _direct
    module = cpu_extension.state(compile_if_missing=compile_if_missing).module
    if module is not None:
        _register_once()
        _direct = module
    return module


def available(compile_if_missing: bool = True) -> bool:
    """A build of the extension that matches the running torch and CPU is loaded; by default, compile it now (once)
    when none exists (:mod:`mit_kernels.cpu_extension`)."""
    return _extension(compile_if_missing) is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    state = cpu_extension.state()
    return None if state.module is not None else state.reason


def extension_info() -> dict:
    """How the loaded build was made: ``built``, ``source`` (prebuilt / cached / compiled), ``directory``,
    ``num_threads`` (at::get_num_threads() now), ``openmp``, ``compile_flags``, ``vector_isa`` (AVX2 or DEFAULT) and
    ``blas`` (the GEMM used); ``built=False`` and ``reason`` when none is loaded. Never compiles."""
    state = cpu_extension.state()
    if state.module is None:
        return {"built": False, "reason": state.reason, "opted_out": state.opted_out}
    info = dict(state.module.extension_info())
    info.update(available=True, source=state.source, directory=str(state.directory))
    return info


# --------------------------------------------------------------------------------------------------------------------
# Fake kernels and FLOP formulas of the C++ operators (their autograd is registered in C++, csrc/ops.cpp)
# --------------------------------------------------------------------------------------------------------------------


_registered = False
_register_lock = threading.Lock()  # two threads at first use: one registers, the other waits until it is done


def _register_once() -> None:
    global _registered
    if _registered:
        return
    with _register_lock:
        if not _registered:
            _register()
            _registered = True


def _register() -> None:
    """Fake kernels and FLOP formulas of the four C++ operators."""
    register_fake_and_flops("mit_kernels::attention_cpu", ATTENTION)
    register_fake_and_flops("mit_kernels::ffn_gate_cpu", FFN_GATE)


_extension()  # an existing matching build is loaded (and its operators registered) at import; nothing compiles


# --------------------------------------------------------------------------------------------------------------------
# Contract functions (inputs already validated by the public API)
# --------------------------------------------------------------------------------------------------------------------


def _require() -> None:
    if _extension() is None:
        raise RuntimeError(f"mit_kernels.cpu_backend is not available: {unavailable_reason()}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_mul: torch.Tensor,
    k_add: torch.Tensor,
    v_mul: torch.Tensor,
    v_add: torch.Tensor,
    head_logit: torch.Tensor,
    kv_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    rescale: bool,
) -> torch.Tensor:
    """MiT attention on CPU tensors (see :func:`mit_kernels.mit_attention`); differentiable w.r.t. all eight
    tensors. ``scale=None`` means ``1 / sqrt(D)``. Returns (B, Hq, Lq, D) in q's dtype, contiguous."""
    _require()
    return loaded_attention(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=bool(causal), scale=scale, kv_mask=kv_mask,
        rescale=bool(rescale),
    )  # fmt: skip


def ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up * (1 + ffn_mul[:, None, :])`` on CPU tensors (see :func:`mit_kernels.ffn.mit_ffn_gate`);
    differentiable w.r.t. all three. Returns (B, L, F) in gate's dtype, contiguous."""
    _require()
    return torch.ops.mit_kernels.ffn_gate_cpu_fwd(gate, up, ffn_mul)


# The two functions above once the extension is known to be loaded (mit_kernels.backends.resolve accepted "cpu"): the
# operators with no per-call loading check, in the signature of mit_kernels.backends.AttentionFunction /
# FfnGateFunction. They are what a resolved backend runs (once per forward in the Hugging Face integration, where a
# decoding step calls them in every infused layer).


def loaded_attention(
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
    """:func:`attention` with keyword options and no loading check (the extension must be loaded)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.mit_kernels.attention_cpu_fwd(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale
    )
    return out


def loaded_ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """:func:`ffn_gate` with no loading check (the extension must be loaded)."""
    return torch.ops.mit_kernels.ffn_gate_cpu_fwd(gate, up, ffn_mul)


# What a decoding step of generate runs (mit_kernels.backends.Backend.attention_decoding): the same operators, called
# through the extension's direct entries (csrc/ops.cpp). A torch.ops call passes through torch/_ops.py, the boxed
# calling convention and the dispatcher twice; inside a decoding step, where code run once per infused layer has been
# evicted from the caches since its last use, that cost ~25 us per call on a 2-core CPU (docs/decoding-cost.md).
# The direct entry calls the CPU kernel itself when the dispatcher would add nothing, and goes through the dispatcher
# otherwise (a dispatch mode, a tensor subclass or functorch wrapper, a graph to record, tracing). What only Python
# sees, a __torch_function__ mode (e.g. ``with torch.device(...)``) or subclass, takes the torch.ops call here. Never
# under torch.compile: dynamo cannot trace a pybind function (the integration makes no decoding plan there).

_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_Tensor = torch.Tensor


def decoding_attention(
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
    """:func:`loaded_attention` through the extension's direct entry (the extension must be loaded)."""
    if _function_mode_enabled() or type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor:
        return loaded_attention(
            q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=causal, scale=scale, kv_mask=kv_mask,
            rescale=rescale,
        )  # fmt: skip
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _direct.attention_fwd_direct(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale
    )


def decoding_ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """:func:`loaded_ffn_gate` through the extension's direct entry (the extension must be loaded)."""
    if _function_mode_enabled() or type(gate) is not _Tensor or type(up) is not _Tensor:
        return loaded_ffn_gate(gate, up, ffn_mul)
    return _direct.ffn_gate_fwd_direct(gate, up, ffn_mul)
