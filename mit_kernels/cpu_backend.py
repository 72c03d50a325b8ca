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
decoding step) costs no Python. This module adds the rest of what torch needs around them: fake (meta) kernels, so
torch.compile traces through without a graph break, and FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``
(:mod:`mit_kernels.flops`: torch's SDPA convention for attention, elementwise FLOPs for the FFN gate).

Kernels (details in ``csrc/attention_fwd.cpp`` and ``csrc/attention_bwd.cpp``): the forward is a flash-attention
forward with the infusion fused into the loading of each key block (no K', V' or (Lq, Lk) buffer), stacking the query
heads of a GQA group so each infused key block serves all of them; few query rows (decoding) take a flash-decoding
kernel that splits the keys across threads and infuses each cached K / V row on the fly. The backward is a
flash-attention-2 backward with the infusion gradients fused in, bitwise reproducible run to run (for a given thread
count). Everything accumulates in fp32 (fp64 for fp64 inputs); fp32, bf16, fp16 and fp64 are supported.
"""

from __future__ import annotations

import math

import torch  # must be imported before the extension (it links against libtorch)
from torch.utils.flop_counter import register_flop_formula

from . import cpu_extension
from .flops import attention_backward_flops, attention_flops, ffn_gate_backward_flops, ffn_gate_flops
from .reference import accumulator_dtype


def _extension(compile_if_missing: bool = False):
    """The extension module (or None); registers the Python side of its operators the first time it is there."""
    module = cpu_extension.state(compile_if_missing=compile_if_missing).module
    if module is not None:
        _register_once()
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


def _register_once() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    lib = "mit_kernels::"

    @torch.library.register_fake(lib + "attention_cpu_fwd")
    def _(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))

    @torch.library.register_fake(lib + "attention_cpu_bwd")
    def _(grad_out, q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, out, lse, causal, scale, rescale):
        return tuple(
            torch.empty_like(x, memory_format=torch.contiguous_format)
            for x in (q, k, v, k_mul, k_add, v_mul, v_add, head_logit)
        )

    @torch.library.register_fake(lib + "ffn_gate_cpu_fwd")
    def _(gate, up, ffn_mul):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "ffn_gate_cpu_bwd")
    def _(grad_out, gate, up, ffn_mul):
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (gate, up, ffn_mul))

    @register_flop_formula(torch.ops.mit_kernels.attention_cpu_fwd)
    def _(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        return attention_flops(q_shape, k_shape)

    @register_flop_formula(torch.ops.mit_kernels.attention_cpu_bwd)
    def _(grad_out_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
        return attention_backward_flops(q_shape, k_shape)

    @register_flop_formula(torch.ops.mit_kernels.ffn_gate_cpu_fwd)
    def _(gate_shape, *args, out_shape=None, **kwargs) -> int:
        return ffn_gate_flops(gate_shape)

    @register_flop_formula(torch.ops.mit_kernels.ffn_gate_cpu_bwd)
    def _(grad_out_shape, gate_shape, *args, out_shape=None, **kwargs) -> int:
        return ffn_gate_backward_flops(gate_shape)


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
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.mit_kernels.attention_cpu_fwd(
        q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, bool(causal), scale, bool(rescale)
    )
    return out


def ffn_gate(gate: torch.Tensor, up: torch.Tensor, ffn_mul: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up * (1 + ffn_mul[:, None, :])`` on CPU tensors (see :func:`mit_kernels.ffn.mit_ffn_gate`);
    differentiable w.r.t. all three. Returns (B, L, F) in gate's dtype, contiguous."""
    _require()
    return torch.ops.mit_kernels.ffn_gate_cpu_fwd(gate, up, ffn_mul)
