"""Per-thread, per-call state of MiT: the one place where the modality embedding leaves transformers' ``**kwargs``.

The embedding travels as a keyword argument: the MiT model's ``forward`` puts ``modality_embedding`` into the kwargs
transformers forwards to every decoder layer and, from there, to the attention function. The MLP is the one module
a decoder layer calls without kwargs (``self.mlp(h)``, in every supported release), so the MiT decoder layer binds
``(its MLP's infusion, embedding)`` here for the duration of its own ``forward``, and the MLP reads it
(:func:`bind_ffn` / :func:`current_ffn`); an MLP that scales its ``down_proj`` input binds the scale the same way for
its ``forward``, and the pre-hook on ``down_proj`` reads it.

Everything here lives in a ``threading.local``: two threads running MiT at once (two models, or one model with two
batches) each see only their own bindings, and nothing is written to a module during a forward. A binding is made
and undone by the ``forward`` that needs it (the previous value is restored, so nested calls compose), and gradient
checkpointing re-runs that ``forward`` in backward, on whatever thread runs the backward, so the recomputation binds
it again. ``torch.compile`` traces ``threading.local`` attributes (a ``contextvars.ContextVar`` cannot be set inside
a compiled region), so a compiled model keeps one graph.

The MiT model's ``generate`` also binds a :class:`GenerationCache` for its duration (:func:`bind_generation_cache`):
the maps are frozen during generation, so each is applied once per embedding tensor instead of at every decoding
step, and the fused kernels' backends are resolved, and their arguments besides the activations gathered, once per
``generate`` call instead of once per decoding step and layer.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import nn


class FFNBinding(NamedTuple):
    """What an MLP's FFN infusion receives from its decoder layer for one forward.

    Attributes:
        infusion: the MLP's :class:`~mit.integrations.infusion.MiTFFNInfusion` (only that module reads the binding).
        modality_embedding: (B, modality_dim) embedding of the decoder layer's call.
        down_proj_scale: (B, d_ff) ``1 + f`` while an unfused MLP runs its own forward (read by the ``down_proj``
            pre-hook), else None.
        memo: the forward call's :class:`~mit.integrations.attention.CallMemo` (the fused gate's function resolved
            once per call), or None (the public op then runs).
    """

    infusion: nn.Module  # the MiTFFNInfusion (typed loosely: mit.integrations.infusion imports this module)
    modality_embedding: torch.Tensor
    down_proj_scale: torch.Tensor | None = None
    memo: object | None = None  # a CallMemo (typed loosely: mit.integrations.attention imports this module)


class GenerationCache:
    """What one ``generate`` call computes once for all its decoding steps (nothing in it can change during the call:
    the weights are frozen and no backend is installed mid-call).

    Attributes:
        maps: ``{(id(map module), id(embedding), dtype): (weakref to the embedding, output)}``, the infusion maps'
            outputs (:meth:`mit.integrations.infusion._InfusionMap._apply_map`).
        functions: the resolved kernel and base attention functions, shared by the ``CallMemo`` of every forward of
            the call (:class:`mit.integrations.attention.CallMemo`), keyed as the memo keys them.
        plans: per infusion module, what its fused kernel takes besides the activations (the maps' outputs, the
            gate logits, the resolved function, the checked scale): made at the first forward of the call, reused
            by every decoding step while the embedding and dtypes stay (``CallMemo.attention_plan`` / ``gate_plan``).
    """

    __slots__ = ("functions", "maps", "plans")

    def __init__(self) -> None:
        self.maps: dict[tuple, tuple] = {}
        self.functions: dict[tuple, object] = {}
        self.plans: dict[nn.Module, tuple] = {}


class _CallScope(threading.local):
    """The bindings of the current thread (class attributes are the defaults every thread starts with)."""

    ffn: FFNBinding | None = None
    generation_cache: GenerationCache | None = None


CALL_SCOPE = _CallScope()
"""The bindings themselves: the attributes ``ffn`` and ``generation_cache`` (of the current thread) are what
:func:`bind_ffn` / :func:`current_ffn` and :func:`bind_generation_cache` / :func:`generation_cache` set and read, for
code that runs once per infused layer and decoding step, where each Python call counts (docs/decoding-cost.md)."""


def bind_ffn(binding: FFNBinding | None) -> FFNBinding | None:
    """Bind ``binding`` for the current thread and return the previous binding, which the caller restores (with
    ``bind_ffn(previous)``) when its forward ends."""
    previous = CALL_SCOPE.ffn
    CALL_SCOPE.ffn = binding
    return previous


def current_ffn(infusion: nn.Module) -> FFNBinding | None:
    """The current thread's binding for ``infusion``, or None (no embedding for it in this call)."""
    binding = CALL_SCOPE.ffn
    if binding is None or binding.infusion is not infusion:
        return None
    return binding


def bind_generation_cache(cache: GenerationCache | None) -> GenerationCache | None:
    """Bind the cache of a ``generate`` call (None: no cache) for the current thread; returns the previous one, which
    the caller restores when ``generate`` ends."""
    previous = CALL_SCOPE.generation_cache
    CALL_SCOPE.generation_cache = cache
    return previous


def generation_cache() -> GenerationCache | None:
    """The current thread's ``generate`` cache, or None outside ``generate``."""
    return CALL_SCOPE.generation_cache
