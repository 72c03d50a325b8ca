"""The trainable MiT modules that ``apply_mit`` attaches to a decoder layer's attention and MLP.

They are child modules named with a ``mit_`` prefix (``self_attn.mit_kv_infusion``, ``mlp.mit_ffn_infusion``), so
base state-dict keys never change and MiT parameters are found by module type (:func:`mit_named_parameters`).
Both maps start at zero: the infused model computes exactly the frozen one until training moves them.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import MiTConfig
from ..hf.parameters import trainable_dtype
from .scope import current_ffn, generation_cache


def zero_linear(in_features: int, out_features: int, like: torch.Tensor) -> nn.Linear:
    """A zero-initialised Linear on ``like``'s device in :func:`trainable_dtype` (left uninitialised on meta)."""
    linear = nn.Linear(in_features, out_features, device=like.device, dtype=trainable_dtype(like))
    if like.device.type != "meta":
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return linear


def check_modality(
    modality_embedding: object, batch: int, modality_dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """Validate a (batch, modality_dim) floating-point modality embedding, on ``device`` when one is given (the
    device of the model's inputs); ValueError naming ``modality_embedding``, what was received and what was
    expected otherwise."""
    if not isinstance(modality_embedding, torch.Tensor):
        raise ValueError(
            f"modality_embedding must be a torch.Tensor of shape ({batch}, {modality_dim}), got "
            f"{type(modality_embedding).__name__}"
        )
    if modality_embedding.shape != (batch, modality_dim):
        raise ValueError(
            f"modality_embedding must have shape (batch, modality_dim) = ({batch}, {modality_dim}), "
            f"got {tuple(modality_embedding.shape)}"
        )
    if not modality_embedding.is_floating_point():
        raise ValueError(
            f"modality_embedding must be a floating-point tensor, got dtype {modality_embedding.dtype} (expected "
            "e.g. torch.float32, float16 or bfloat16)"
        )
    if device is not None and modality_embedding.device != torch.device(device):
        raise ValueError(
            f"modality_embedding is on device {modality_embedding.device}, expected the device of the model's inputs, "
            f"{device}"
        )
    return modality_embedding


class _InfusionMap(nn.Module):
    """What both infusion modules share: the map applied to the embedding, and a record of how each call ran
    (``last_dispatch``: the last path; ``dispatch_counts``: calls per path; diagnostics only, never read by the
    computation).

    In ``generate()`` every decoding step passes the same embedding tensor through the same (frozen during
    generation) map, so the MiT model's ``generate`` binds a cache for its duration, in its own thread
    (:func:`~mit.integrations.scope.bind_generation_cache`): the map's output is computed once per embedding tensor.
    Outside ``generate`` nothing is cached, so no in-place change of the weights (an optimiser step,
    ``load_adapter``, ``p.data`` writes) can ever be missed. Nothing is stored on the module during a forward except
    the dispatch record."""

    map: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.last_dispatch: str | None = None
        self.dispatch_counts: Counter[str] = Counter()

    def record(self, path: str) -> None:
        # a plain attribute: written past nn.Module.__setattr__, whose parameter / buffer / module checks cost more
        # than the rest of the record (it is called per infused layer and decoding step); the fused paths of
        # attention.py and layers.py write these two lines inline (a Python call less per infused layer and step)
        self.__dict__["last_dispatch"] = path
        self.dispatch_counts[path] += 1

    def _apply_map(self, modality_embedding: torch.Tensor, dtype: torch.dtype, finish: Callable) -> object:
        """``finish(map(embedding) in dtype)`` (taken from the current ``generate`` call's cache when one is bound
        and gradients are off: in a decoding step the kernels then get the vectors as they need them, with no copy)."""
        generation = generation_cache() if not torch.is_grad_enabled() else None
        cache = generation.maps if generation is not None else None
        key = (id(self), id(modality_embedding), dtype)
        if cache is not None:
            hit = cache.get(key)
            if hit is not None and hit[0]() is modality_embedding:
                return hit[1]
        weight = self.map.weight
        out = finish(self.map(modality_embedding.to(device=weight.device, dtype=weight.dtype)).to(dtype))
        if cache is not None:
            cache[key] = (weakref.ref(modality_embedding), out)
        return out


class MiTKVInfusion(_InfusionMap):
    """Key/value infusion of one attention module: ``map`` (modality_dim -> 4 * Hkv * D, zero-initialised) gives
    k_mul, k_add, v_mul, v_add; ``head_logit`` (Hkv,) is the gate logit lambda (None without head rescaling).

    ``last_dispatch`` records how the last infused call ran: ``"fused"`` (the mit_attention kernel) or
    ``"fallback: <reason>"`` (exact eager infusion, then the model's own attention implementation);
    ``dispatch_counts`` counts every call by path."""

    def __init__(self, config: MiTConfig, num_kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.rescale, self.backend = config.head_rescale, config.backend
        self.map = zero_linear(config.modality_dim, 4 * num_kv_heads * head_dim, like)
        self.head_logit: nn.Parameter | None = None
        if config.head_rescale:
            init = torch.full((num_kv_heads,), config.head_logit_init, device=like.device, dtype=trainable_dtype(like))
            self.head_logit = nn.Parameter(init)

    def vectors(self, modality_embedding: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """k_mul, k_add, v_mul, v_add, each (B, Hkv, D) in ``dtype`` and contiguous (as the fused kernels take them),
        from the (B, modality_dim) embedding."""
        return list(self._apply_map(modality_embedding, dtype, self._split))

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 4 * Hkv * D) -> four contiguous (B, Hkv, D)."""
        return tuple(x.contiguous() for x in out.view(-1, 4, self.num_kv_heads, self.head_dim).unbind(dim=1))

    def gate_logits(self, device: torch.device) -> torch.Tensor:
        """lambda (Hkv,), or zeros when head rescaling is off (the kernels then ignore it)."""
        if self.head_logit is None:
            return torch.zeros(self.num_kv_heads, device=device)
        return self.head_logit

    def extra_repr(self) -> str:
        return f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rescale={self.rescale}"


class MiTFFNInfusion(_InfusionMap):
    """Feed-forward infusion of one MLP: ``map`` (modality_dim -> d_ff, zero-initialised) gives f, and the MLP
    computes ``down(act(gate(x)) * up(x) * (1 + f))``.

    ``fused`` says how: the fused SwiGLU gate kernel, or a forward pre-hook on ``down_proj`` that scales its input
    (:meth:`scale_down_proj_input`). The decoder layer binds the embedding for this module in the current thread for
    the duration of its forward (:mod:`mit.integrations.scope`); ``last_dispatch`` records ``"fused"`` or
    ``"scaled down_proj input"``, ``dispatch_counts`` counts the calls by path."""

    def __init__(self, config: MiTConfig, d_ff: int, like: torch.Tensor, fused: bool) -> None:
        super().__init__()
        self.backend, self.fused = config.backend, fused
        self.map = zero_linear(config.modality_dim, d_ff, like)

    def multiplier(self, modality_embedding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """f (B, d_ff) in ``dtype``."""
        return self._apply_map(modality_embedding, dtype, lambda x: x)

    def scale_down_proj_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook of ``down_proj``: ``x (B, L, d_ff) -> x * (1 + f)[:, None, :]`` while the MLP runs with an
        embedding (the scale is bound by the MLP's forward, in the current thread); otherwise nothing changes."""
        binding = current_ffn(self)
        if binding is None or binding.down_proj_scale is None:
            return None
        x = args[0]
        return (x * binding.down_proj_scale[:, None, :], *args[1:])

    def extra_repr(self) -> str:
        return f"fused={self.fused}"


MIT_MODULE_TYPES = (MiTKVInfusion, MiTFFNInfusion)


def mit_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every MiT module inside ``model``, selected by module type."""
    for prefix, module in model.named_modules():
        if isinstance(module, MIT_MODULE_TYPES):
            yield from module.named_parameters(prefix=prefix)
