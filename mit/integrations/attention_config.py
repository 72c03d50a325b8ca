"""The config an attention module without key/value infusion reads in an MiT model: its own, under the base name.

transformers' attention modules pick their attention function at every call from ``self.config._attn_implementation``
(``ALL_ATTENTION_FUNCTIONS.get_interface(...)``). ``apply_mit`` names ``"mit_" + base`` in the model's config, so that
the infused layers reach MiT's function (:mod:`mit.integrations.attention`); a layer without infusion would reach it
too, only to be handed on to ``base``'s function unchanged: a detour that cost ~12 us per layer and decoding step on a
CPU (24 of SmolLM2's 30 layers with the default layers; ``benchmarks/decode_step_layers.py``). Each attention module
without a :class:`~mit.integrations.infusion.MiTKVInfusion` therefore holds an :class:`UninfusedAttentionConfig`:
its own config object, seen through a view that gives the base name for ``_attn_implementation`` and everything else
(reads, writes, deletes) from and to that object, live. The name is derived at every read, so
``set_attn_implementation`` on the MiT model (or :func:`~mit.integrations.model.unload_mit`) reaches these layers as it
reaches the infused ones; the mask transformers builds is the one it builds for ``"mit_" + base``, which is
``base``'s. The views are put on by every attach of an adapter and taken off by every detach (with ``unload``).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .attention import KV_INFUSION_NAME, PREFIX

_WRAPPED = "_mit_wrapped_config"  # the attributes of the view itself: the wrapped config, and
_STORED = "_mit_stored_in"  # its instance dict, when it keeps the name there as transformers' own configs do
_INTERNAL_NAME = "_attn_implementation_internal"  # where transformers' PreTrainedConfig keeps the name
_MISSING = object()


def _stored_name_dict(config: object) -> dict | None:
    """``config``'s instance dict when ``config`` reads ``_attn_implementation`` with transformers' own property
    (which returns the instance attribute ``_attn_implementation_internal``), else None.

    Every attribute read on a transformers config passes through two Python ``__getattribute__`` overrides (the
    attribute map, heterogeneous per-layer configs), and the property reads a second attribute through them again:
    ~2.5 us per read on a CPU, once per layer and decoding step. The view reads the stored name from the instance
    dict instead, when the class's property is transformers' own (a config class that defines its own property, or a
    transformers release that stores the name elsewhere, is read through the property)."""
    try:
        from transformers import configuration_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    base = getattr(configuration_utils, "PreTrainedConfig", None) or configuration_utils.PretrainedConfig
    own = base.__dict__.get("_attn_implementation")
    if not isinstance(own, property) or getattr(type(config), "_attn_implementation", None) is not own:
        return None
    stored = object.__getattribute__(config, "__dict__")  # (past the overrides)
    return stored if _INTERNAL_NAME in stored else None


class UninfusedAttentionConfig:
    """The config of an attention module without MiT infusion: ``config``, whose ``_attn_implementation`` reads
    without the ``"mit_"`` prefix (``"mit_sdpa"`` -> ``"sdpa"``); every other attribute is ``config``'s (setting
    ``_attn_implementation`` sets ``config``'s). Copies and pickles as a view of the copy of ``config``."""

    def __init__(self, config: object) -> None:
        object.__setattr__(self, _WRAPPED, config)
        object.__setattr__(self, _STORED, _stored_name_dict(config))

    @property
    def _attn_implementation(self) -> str | None:
        # read by the attention module at every call: inline, no helper calls
        stored = self._mit_stored_in
        implementation = stored.get(_INTERNAL_NAME, _MISSING) if stored is not None else _MISSING
        if implementation is _MISSING:
            implementation = getattr(self._mit_wrapped_config, "_attn_implementation", None)
        if type(implementation) is str and implementation.startswith(PREFIX):
            return implementation[len(PREFIX) :]
        return implementation

    @_attn_implementation.setter
    def _attn_implementation(self, value: object) -> None:
        self._mit_wrapped_config._attn_implementation = value

    def __getattr__(self, name: str) -> object:  # only for names the view does not have: the wrapped config's
        if name in (_WRAPPED, _STORED) or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)  # (half-built during copy / unpickling: no recursion; no dunder protocols)
        return getattr(object.__getattribute__(self, _WRAPPED), name)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "_attn_implementation":
            object.__setattr__(self, name, value)  # the property's setter
        else:
            setattr(self._mit_wrapped_config, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._mit_wrapped_config, name)

    def __reduce__(self) -> tuple:
        return (type(self), (self._mit_wrapped_config,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._mit_wrapped_config!r})"


def route_uninfused_attention(layers: Iterable[nn.Module]) -> None:
    """Give the attention module (``self_attn``) of each decoder layer in ``layers`` that has no key/value infusion
    an :class:`UninfusedAttentionConfig` of its config (once; a module without a ``config`` is left as it is)."""
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if not isinstance(attention, nn.Module) or KV_INFUSION_NAME in attention._modules:
            continue
        config = attention.__dict__.get("config")
        if config is not None and not isinstance(config, UninfusedAttentionConfig):
            attention.config = UninfusedAttentionConfig(config)


def unroute_attention(modules: Iterable[nn.Module]) -> None:
    """Give every module in ``modules`` that holds an :class:`UninfusedAttentionConfig` its own config back."""
    for module in modules:
        config = module.__dict__.get("config")
        if isinstance(config, UninfusedAttentionConfig):
            module.config = object.__getattribute__(config, _WRAPPED)
