"""``apply_mit``: MiT on a Hugging Face decoder model, through transformers' extension points only.

What it does, in place (details and the reasons in ``docs/integration.md``):

1. freezes every base parameter;
2. attaches zero-initialised :class:`~mit.integrations.infusion.MiTKVInfusion` (``self_attn.mit_kv_infusion``) and
   :class:`~mit.integrations.infusion.MiTFFNInfusion` (``mlp.mit_ffn_infusion``) to the chosen decoder layers, and
   switches those layers (and MLPs) to pass-through subclasses that bind the embedding for the MLP in the current
   thread (:mod:`mit.integrations.scope`);
3. switches the attention implementation ``base`` to ``"mit_" + base`` (:mod:`mit.integrations.attention`);
4. switches the model to ``MiT<ModelClass>``, whose ``forward`` has the base signature plus a keyword-only
   ``modality_embedding`` (``generate()`` inspects it, accepts the embedding and expands it for beam search), derives
   padding-aware position ids, refuses packed batches, and passes the embedding (with the call's mask analyses) down
   through transformers' ``**kwargs``.

No transformers ``forward`` is copied: the MiT classes call the base ones with the arguments they received.

Reversible: :func:`unload_mit` (``model.unload()``) gives the base model back exactly, from what ``install`` recorded
(:class:`MiTUndo`); :func:`disable_mit_adapter` (``model.disable_adapter()``) computes the base model inside a context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import MiTConfig
from ..hf.classes import Rebuildable, method_subclass
from ..hf.decoder import decoder_of, padding_aware_position_ids
from ..hf.families import FamilySpec, family_of, ffn_is_fused
from ..hf.method_model import MethodModelMixin
from ..hf.reversible import disabled, disabled_depth, freeze, remove_hooks, restore_class, restore_requires_grad
from ..hf.signature import splice_keyword_inputs
from .attention import (
    KV_INFUSION_NAME,
    MEMO_KWARG,
    CallMemo,
    autocast_enabled,
    base_implementation,
    is_mit_implementation,
    mit_implementation,
)
from .attention_config import route_uninfused_attention, unroute_attention
from .infusion import MiTFFNInfusion, MiTKVInfusion, check_modality, mit_named_parameters
from .layers import FFN_INFUSION_NAME, MiTDecoderLayerMixin, MiTMLPMixin, check_attention_dispatch
from .quantized import check_no_cpu_packed_4bit
from .scope import GenerationCache, bind_generation_cache, generation_cache

UNDO_NAME = "_mit_undo"  # instance attribute of an MiT model: its MiTUndo
ADAPTERS_NAME = "_mit_adapters"  # instance attribute of an MiT model: {adapter name: MiTPlan}
ACTIVE_NAME = "_mit_active_adapter"  # instance attribute of an MiT model: the name of the attached adapter
DEFAULT_ADAPTER = "default"  # the name apply_mit / load_adapter give an adapter (peft's)
DISABLED_NAME = "_mit_adapter_disabled"  # instance attribute while disable_adapter() contexts are open: their depth


@dataclasses.dataclass(frozen=True)
class MiTUndo:
    """What :func:`unload_mit` needs to give the base model back exactly, recorded by :meth:`MiTPlan.install` (plain
    data, so it survives ``copy.deepcopy`` and pickling with the model).

    Attributes:
        attn_implementation: ``config._attn_implementation`` before MiT (None when it was unset).
        installed_implementation: the ``"mit_" + base`` name MiT set (None when it set none).
        requires_grad: ``requires_grad`` of every base parameter, by name, before MiT froze them.
    """

    attn_implementation: str | None
    installed_implementation: str | None
    requires_grad: dict[str, bool]


# mit.integrations.adapter's load_adapter, registered by that module when it is imported (the package imports it):
# the adapter module builds on this one, so this one reaches it through the registration, not an import
ADAPTER_LOADER: dict[str, Callable] = {}
_PERSISTENT_DISABLE = "_mit_disable_adapters_context"  # the open disable_adapter() context of disable_adapters()


class MiTModelMixin(MethodModelMixin, Rebuildable):
    """What ``apply_mit`` adds to the top-level model (mixin of ``MiT<ModelClass>``). transformers'
    ``save_pretrained`` / ``from_pretrained`` are refused (:class:`~mit.hf.method_model.RefusesPretrained`):
    :func:`mit.save_adapter` / :func:`mit.load_adapter` round-trip the method."""

    mit_config: MiTConfig
    _mit_prefix = "MiT"
    _method = "MiT"
    _pretrained_hint = ("mit.save_adapter", "mit.load_adapter")

    def mit_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every MiT parameter, found by module type."""
        return list(mit_named_parameters(self))

    def mit_dispatch(self) -> dict[str, str]:
        """How each MiT module ran in the last forward with an embedding: ``{module name: "fused" | "fallback: ..." |
        "scaled down_proj input"}`` (None for a module that has not run yet)."""
        return {
            name: module.last_dispatch
            for name, module in self.named_modules()
            if isinstance(module, (MiTKVInfusion, MiTFFNInfusion))
        }

    @classmethod
    def subclass_attributes(cls, base: type) -> dict:
        """``forward`` with ``modality_embedding`` (:func:`_forward_with_modality`)."""
        return _forward_with_modality(base)

    @property
    def active_adapter(self) -> str:
        """The name of the adapter the model computes with (``"default"`` unless named otherwise)."""
        return active_mit_adapter(self)

    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (transformers' spelling: one adapter is active at a time)."""
        return [active_mit_adapter(self)]

    @property
    def adapter_names(self) -> list[str]:
        """The names of the model's adapters, the active one included, in the order they were added."""
        return list(mit_adapters(self))

    def add_adapter(self, adapter_config: MiTConfig, adapter_name: str | None = None) -> None:
        """Add a new zero-initialised adapter ``adapter_name`` with its own ``MiTConfig`` (layers, modality dim...),
        inactive: :meth:`set_adapter` switches to it (see :func:`add_mit_adapter`)."""
        if adapter_name is None:
            raise ValueError("adapter_name: expected the new adapter's name, got None")
        add_mit_adapter(self, adapter_config, adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Compute with the adapter ``adapter_name`` from now on (see :func:`set_mit_adapter`)."""
        set_mit_adapter(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the inactive adapter ``adapter_name`` (see :func:`delete_mit_adapter`)."""
        delete_mit_adapter(self, adapter_name)

    def unload(self) -> nn.Module:
        """Remove MiT from this model, in place, and return it: the base model exactly as it was before
        :func:`apply_mit` (see :func:`unload_mit`)."""
        self.enable_adapters()  # a disable_adapters() left open would leave its state on the base model
        return unload_mit(self)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it, the model computes the base model (bit for bit); a ``modality_embedding``
        given to ``forward`` / ``generate`` is accepted and ignored (see :func:`disable_mit_adapter`)."""
        return disable_mit_adapter(self)

    def disable_adapters(self) -> None:
        """transformers' spelling: compute the base model (bit for bit) until :meth:`enable_adapters`, as inside
        :meth:`disable_adapter`; calling it again changes nothing."""
        if _PERSISTENT_DISABLE not in self.__dict__:
            context = disable_mit_adapter(self)
            context.__enter__()
            self.__dict__[_PERSISTENT_DISABLE] = context

    def enable_adapters(self) -> None:
        """transformers' spelling: undo :meth:`disable_adapters` (no effect on an open ``disable_adapter()`` context,
        nor when the adapters were not disabled)."""
        context = self.__dict__.pop(_PERSISTENT_DISABLE, None)
        if context is not None:
            context.__exit__(None, None, None)

    def load_adapter(self, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None,
                     **kwargs) -> None:  # fmt: skip
        """transformers' spelling of :func:`mit.load_adapter` (its PEFT loader does not read MiT adapters): load the
        MiT adapter saved in directory ``peft_model_id`` into this model, as ``adapter_name`` (see there). transformers'
        other arguments (hub revisions, tokens, device maps, state dicts) do not apply: ValueError naming them."""
        given = sorted(name for name, value in kwargs.items() if value is not None)
        if given:
            raise ValueError(
                f"load_adapter: {', '.join(given)} not supported for MiT adapters (a local directory written by "
                "mit.save_adapter; load it with model.load_adapter(directory, adapter_name=...))"
            )
        if peft_model_id is None:
            raise ValueError("load_adapter: peft_model_id: expected the directory of an MiT adapter, got None")
        ADAPTER_LOADER["load"](self, peft_model_id, adapter_name)

    def mit_adapter_disabled(self) -> bool:
        """True inside a :meth:`disable_adapter` context."""
        return disabled_depth(self, DISABLED_NAME) > 0

    def __setstate__(self, state: dict) -> None:
        """Unpickling in a new process: the attention function the config names must be registered there too."""
        super().__setstate__(state)
        if self.mit_config.infuse_kv:
            mit_implementation(base_implementation(self.config._attn_implementation))

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, with the infusion maps' outputs computed once per embedding and the kernels'
        backends resolved once for the whole call instead of at every decoding step (neither can change during it):
        the cache belongs to this call, in this thread (:class:`~mit.integrations.scope.GenerationCache`)."""
        if not self.mit_adapter_disabled():
            self._mit_check_generate_embedding(args, kwargs)
        previous = bind_generation_cache(GenerationCache())
        try:
            return super().generate(*args, **kwargs)
        finally:
            bind_generation_cache(previous)

    def _mit_check_generate_embedding(self, args: tuple, kwargs: dict) -> None:
        """The embedding given to ``generate`` is one row per prompt: generate itself repeats it for beam search and
        ``num_return_sequences`` (as it repeats ``input_ids``); a pre-expanded one is refused here, by name."""
        modality_embedding = kwargs.get("modality_embedding")
        if modality_embedding is None:
            return
        tokens = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor):
            return  # generate builds the prompt itself (e.g. from the BOS token); the forward checks then apply
        try:
            check_modality(modality_embedding, tokens.shape[0], self.mit_config.modality_dim, tokens.device)
        except ValueError as error:
            raise ValueError(
                f"{error} (generate: one row per prompt; beam search and num_return_sequences repeat it themselves)"
            ) from None

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' ``set_attn_implementation``, keeping MiT's infusion around the new implementation."""
        if self.mit_config.infuse_kv:
            attn_implementation = mit_implementation(attn_implementation)
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _mit_prepare(self, arguments: dict, extra: dict, modality_embedding: torch.Tensor | None) -> None:
        """Validate the embedding, refuse packed batches, derive padding-aware positions (in ``arguments``, the
        forward's named arguments; ``extra``: those its ``**kwargs`` receives)."""
        if modality_embedding is None:
            return
        if self.mit_config.infuse_kv:
            check_attention_dispatch(self.config)
        tokens = arguments.get("input_ids")
        if tokens is None:
            tokens = arguments.get("inputs_embeds")
        if tokens is None:
            raise ValueError("modality_embedding needs input_ids or inputs_embeds to infer the batch size")
        check_modality(modality_embedding, tokens.shape[0], self.mit_config.modality_dim, tokens.device)
        if self.training and torch.is_grad_enabled() and tokens.device.type == "cpu":
            check_no_cpu_packed_4bit(self)  # bitsandbytes' CPU-packed 4-bit layers drop gradients silently
        if extra.get("cu_seq_lens_q") is not None or extra.get("cu_seq_lens_k") is not None:
            raise ValueError("MiT does not support packed (varlen) batches: pad the batch instead")
        mask, positions = arguments.get("attention_mask"), arguments.get("position_ids")
        if positions is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            arguments["position_ids"] = padding_aware_position_ids(mask, tokens.shape[1])
        elif mask is None and isinstance(positions, torch.Tensor) and positions.shape[-1] > 1:
            if bool((positions[..., 1:] < positions[..., :-1]).any()):
                raise ValueError(
                    "position_ids restart inside a row (a packed batch): MiT has one modality_embedding per row and "
                    "cannot attribute it to packed samples; pad the batch instead"
                )


def _forward_with_modality(base: type) -> dict:
    """``forward`` for ``MiT<base>``: the base signature plus keyword-only ``modality_embedding``."""
    spliced = splice_keyword_inputs(base, ("modality_embedding",), "MiT")
    signature, var_keyword = spliced.base, spliced.var_keyword

    def forward(self, *args, modality_embedding: torch.Tensor | None = None, **kwargs):
        if modality_embedding is None or self.mit_adapter_disabled():  # disabled: the base model, embedding ignored
            return base.forward(self, *args, **kwargs)
        if args:  # positional inputs: named by the base signature
            bound = signature.bind(self, *args, **kwargs)
            arguments = bound.arguments
            extra = arguments.setdefault(var_keyword, {})
        else:  # all by keyword (generate's every step): the names are the arguments already, no binding needed
            bound, arguments = None, dict(kwargs)
            extra = arguments
        self._mit_prepare(arguments, extra, modality_embedding)
        # the embedding's one route: transformers' **kwargs, to every decoder layer and attention function (the MiT
        # decoder layer binds it for its MLP, mit.integrations.scope); with it, this call's own memo (mask analyses,
        # resolved kernels)
        extra["modality_embedding"] = modality_embedding
        if not torch.compiler.is_compiling():  # compiled: no mask is read (attention.py), the public ops run
            generation = generation_cache()  # in generate: the functions resolved at its first step
            # in generate, with grad and autocast off (as they stay for the whole forward), each infused layer's
            # kernel arguments are worked out at the first step and kept for the call (CallMemo.attention_plan)
            plain = generation is not None and not torch.is_grad_enabled() and not autocast_enabled()
            extra[MEMO_KWARG] = CallMemo(
                checked_embedding=modality_embedding,  # _mit_prepare checked it
                functions=generation.functions if generation is not None else None,
                plans=generation.plans if plain else None,
            )
        if bound is None:
            return base.forward(self, **arguments)
        return base.forward(*bound.args, **bound.kwargs)

    forward.__signature__ = spliced.spliced
    forward.__doc__ = (
        f"{base.__name__}.forward with ``modality_embedding`` (B, modality_dim): the per-sample embedding infused "
        "into the MiT layers (None: exactly the frozen model)."
    )

    def _can_set_attn_implementation(cls) -> bool:  # transformers reads the class's module source otherwise
        probe = getattr(base, "_can_set_attn_implementation", None)
        return probe() if probe is not None else True

    return {"forward": forward, "_can_set_attn_implementation": classmethod(_can_set_attn_implementation)}


def _kv_infusion(
    attention: nn.Module, config: MiTConfig, model_config, like: torch.Tensor | None = None
) -> MiTKVInfusion:
    """The layer's new MiTKVInfusion, on ``like``'s device (default: the attention's own parameters')."""
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(attention, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    like = next(p for p in attention.parameters()) if like is None else like
    return MiTKVInfusion(config, num_kv_heads, head_dim, like)


def _ffn_infusion(
    mlp: nn.Module, config: MiTConfig, spec: FamilySpec, model_config, like: torch.Tensor | None = None
) -> MiTFFNInfusion:
    """The MLP's new MiTFFNInfusion, on ``like``'s device (default: ``down_proj``'s)."""
    down_proj = getattr(mlp, "down_proj", None)
    if not isinstance(down_proj, nn.Linear):
        raise ValueError(f"the FFN infusion needs the MLP's down_proj Linear; {type(mlp).__name__} has none")
    like = down_proj.weight if like is None else like
    return MiTFFNInfusion(config, down_proj.in_features, like, ffn_is_fused(spec, model_config, mlp))


@dataclasses.dataclass
class MiTPlan:
    """What :func:`apply_mit` will do to a model, built without touching it: the new infusion modules (zero-initialised,
    on the layers' devices) per infused layer, and the attention implementation to switch to.

    ``named_parameters()`` gives the names the MiT parameters will have in the model, so :func:`mit.load_adapter` can
    validate and fill them before anything changes; :meth:`install` then applies the plan."""

    config: MiTConfig
    implementation: str | None
    layers: list[tuple[str, nn.Module, MiTKVInfusion | None, MiTFFNInfusion | None]]  # (name, layer, kv, ffn)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for layer_name, _, kv, ffn in self.layers:
            if kv is not None:
                yield from kv.named_parameters(prefix=f"{layer_name}.self_attn.{KV_INFUSION_NAME}")
            if ffn is not None:
                yield from ffn.named_parameters(prefix=f"{layer_name}.mlp.{FFN_INFUSION_NAME}")

    def attach(self, model: nn.Module) -> None:
        """Put this plan's infusion modules (and the ``down_proj`` pre-hooks of unfused FFN infusions) on its layers
        of ``model`` and switch those layers (and MLPs) to their MiT classes; the attention modules left without
        key/value infusion read the base implementation's name (:mod:`mit.integrations.attention_config`)."""
        for _, layer, kv, ffn in self.layers:
            if kv is not None:
                setattr(layer.self_attn, KV_INFUSION_NAME, kv)
            if ffn is not None:
                mlp = layer.mlp
                setattr(mlp, FFN_INFUSION_NAME, ffn)
                if not ffn.fused:
                    mlp.down_proj.register_forward_pre_hook(ffn.scale_down_proj_input)
                mlp.__class__ = method_subclass(MiTMLPMixin, type(mlp))
            layer.__class__ = method_subclass(MiTDecoderLayerMixin, type(layer))
        route_uninfused_attention(decoder_of(model).layers)

    def install(self, model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
        """Apply the plan to ``model`` (the plain model it was made for) as its adapter ``adapter_name``: freeze,
        attach, switch classes; what :func:`unload_mit` needs to undo it is recorded on the model
        (:class:`MiTUndo`)."""
        undo = MiTUndo(model.config._attn_implementation, None, freeze(model))
        self.attach(model)
        if self.implementation is not None and not is_mit_implementation(model.config._attn_implementation):
            model.config._attn_implementation = self.implementation
            undo = dataclasses.replace(undo, installed_implementation=self.implementation)
        model.__class__ = method_subclass(MiTModelMixin, type(model))
        model.mit_config = self.config
        model.__dict__[UNDO_NAME] = undo
        model.__dict__[ADAPTERS_NAME] = {adapter_name: self}
        model.__dict__[ACTIVE_NAME] = adapter_name
        return model


def is_mit_model(model: object) -> bool:
    """True for a model returned by :func:`apply_mit`."""
    return isinstance(model, MiTModelMixin)


def _require_mit(model: object, what: str) -> None:
    if not is_mit_model(model):
        raise ValueError(f"model: {what} needs a model returned by mit.apply_mit, got {type(model).__name__}")


def _detach_attached(model: nn.Module) -> None:
    """Take every attached infusion module off ``model`` (with the ``down_proj`` pre-hooks MiT registered; other hooks
    keep their place) and give the layers and MLPs their own classes back, the attention modules their own configs.
    Found by module type, so this also works on a model pickled by an earlier release, which records no adapters."""
    unroute_attention(model.modules())
    for module in list(model.modules()):
        kv = module._modules.get(KV_INFUSION_NAME)
        if isinstance(kv, MiTKVInfusion):
            delattr(module, KV_INFUSION_NAME)
        ffn = module._modules.get(FFN_INFUSION_NAME)
        if isinstance(ffn, MiTFFNInfusion):
            down_proj = getattr(module, "down_proj", None)
            if isinstance(down_proj, nn.Module):
                remove_hooks(down_proj, [ffn], [MiTFFNInfusion.scale_down_proj_input], pre=True)
            delattr(module, FFN_INFUSION_NAME)
        if module is not model and isinstance(module, (MiTDecoderLayerMixin, MiTMLPMixin)):
            restore_class(module)


def _attached_plan(model: nn.Module) -> MiTPlan:
    """The plan of the infusion modules attached to ``model`` now (for a model pickled by an earlier release)."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for layer in decoder_of(model).layers:
        kv = layer.self_attn._modules.get(KV_INFUSION_NAME)
        ffn = layer.mlp._modules.get(FFN_INFUSION_NAME)
        if kv is not None or ffn is not None:
            layers.append((names[id(layer)], layer, kv, ffn))
    return MiTPlan(model.mit_config, None, layers)


def mit_adapters(model: nn.Module) -> dict[str, MiTPlan]:
    """The adapters of an MiT model, by name: the active one attached, the others kept (with their own modules and
    parameters) off the model, outside its module tree and state dict."""
    _require_mit(model, "mit_adapters")
    adapters = model.__dict__.get(ADAPTERS_NAME)
    if adapters is None:  # pickled by an earlier release: one adapter, attached
        adapters = model.__dict__[ADAPTERS_NAME] = {DEFAULT_ADAPTER: _attached_plan(model)}
        model.__dict__[ACTIVE_NAME] = DEFAULT_ADAPTER
    return adapters


def check_adapter_name(adapter_name: object) -> str:
    """``adapter_name`` when it is a non-empty string without dots (it is used like peft's, as a key), else
    ValueError naming it."""
    if not (isinstance(adapter_name, str) and adapter_name and "." not in adapter_name):
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    return adapter_name


def active_mit_adapter(model: nn.Module) -> str:
    """The name of the adapter an MiT model computes with now."""
    mit_adapters(model)
    return model.__dict__[ACTIVE_NAME]


def plan_mit_adapter(model: nn.Module, config: MiTConfig, adapter_name: str) -> MiTPlan:
    """The plan of a new adapter ``adapter_name`` with ``config`` for an MiT model (its zero-initialised modules;
    the model is not touched). ValueError naming the argument for a name in use or a config that does not fit."""
    _require_mit(model, "add_adapter")
    adapters = mit_adapters(model)
    check_adapter_name(adapter_name)
    if adapter_name in adapters:
        raise ValueError(f"adapter_name {adapter_name!r} is in use; the model's adapters: {sorted(adapters)}")
    if not isinstance(config, MiTConfig):
        raise ValueError(f"config must be a mit.MiTConfig, got {type(config).__name__}")
    return MiTPlan(config, _implementation(model, config), plan_mit_layers(model, config))


def add_mit_adapter(model: nn.Module, config: MiTConfig, adapter_name: str, plan: MiTPlan | None = None) -> MiTPlan:
    """Add a new adapter ``adapter_name`` with ``config`` (its own layers, modality dim, ...) to an MiT model,
    inactive (as peft's ``add_adapter``): :func:`set_mit_adapter` makes it the one the model computes with. Its
    modules are ``plan``'s (from :func:`plan_mit_adapter`, possibly filled since) or new, zero-initialised ones.
    Returns its plan, whose ``named_parameters()`` are the adapter's parameters, named as they are once active."""
    plan = plan_mit_adapter(model, config, adapter_name) if plan is None else plan
    mit_adapters(model)[adapter_name] = plan
    return plan


def set_mit_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter an MiT model computes with: the active adapter's modules come off the model
    (kept, with their parameters, for a later switch back) and the named one's go on. ``model.mit_config`` becomes
    its config, and ``forward`` expects its modality dim. The parameters of each adapter stay the same objects
    across switches (an optimizer holding them keeps working)."""
    adapters = mit_adapters(model)
    if adapter_name not in adapters:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not an adapter of this model; its adapters: {sorted(adapters)}"
        )
    if adapter_name == model.__dict__[ACTIVE_NAME]:
        return
    plan = adapters[adapter_name]
    adapters[model.__dict__[ACTIVE_NAME]].config = model.mit_config  # the attribute users see is the active config
    _detach_attached(model)
    plan.attach(model)
    if plan.implementation is not None and not is_mit_implementation(model.config._attn_implementation):
        undo: MiTUndo | None = model.__dict__.get(UNDO_NAME)
        model.config._attn_implementation = plan.implementation
        if undo is not None and undo.installed_implementation is None:
            model.__dict__[UNDO_NAME] = dataclasses.replace(undo, installed_implementation=plan.implementation)
    model.mit_config = plan.config
    model.__dict__[ACTIVE_NAME] = adapter_name


def delete_mit_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the inactive adapter ``adapter_name`` (its modules and parameters go with it). The active adapter is
    not deleted (ValueError): switch to another one first, or :func:`unload_mit` the model."""
    adapters = mit_adapters(model)
    if adapter_name not in adapters:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not an adapter of this model; its adapters: {sorted(adapters)}"
        )
    if adapter_name == model.__dict__[ACTIVE_NAME]:
        raise ValueError(
            f"adapter_name {adapter_name!r} is the active adapter; set_adapter(...) another one first, or unload() "
            "the model"
        )
    del adapters[adapter_name]


def unload_mit(model: nn.Module) -> nn.Module:
    """Remove MiT from ``model`` (an MiT model), in place, and return it: the base model exactly as it was before
    :func:`apply_mit` / :func:`mit.load_adapter`.

    The infusion modules are detached (with them, the MiT parameters and state-dict keys; every named adapter goes),
    the ``down_proj`` pre-hooks MiT registered are removed (other hooks keep their place), every ``MiT<Class>``
    instance gets its own class back, ``config._attn_implementation`` and every base parameter's ``requires_grad``
    get their recorded values (:class:`MiTUndo`), and ``mit_config`` goes. If ``model.set_attn_implementation(...)``
    was called on the MiT model, the implementation it chose (without ``"mit_"``) is kept. The ``"mit_" + base``
    attention function stays registered in transformers (process-wide, other MiT models may use it); the unloaded
    model no longer names it. A model pickled by an earlier release has no record: its attention implementation
    becomes the base name and its base parameters stay frozen. ValueError for a model that is not an MiT model or
    inside its ``disable_adapter()`` context."""
    _require_mit(model, "unload")
    if model.mit_adapter_disabled():
        raise ValueError("model: unload inside its disable_adapter() context; leave the context first")
    undo: MiTUndo | None = model.__dict__.get(UNDO_NAME)
    _detach_attached(model)
    current = model.config._attn_implementation
    if undo is not None and undo.installed_implementation is not None and current == undo.installed_implementation:
        model.config._attn_implementation = undo.attn_implementation
    elif is_mit_implementation(current):
        model.config._attn_implementation = base_implementation(current)
    if undo is not None:
        restore_requires_grad(model, undo.requires_grad)
    restore_class(model)
    del model.mit_config
    for name in (UNDO_NAME, ADAPTERS_NAME, ACTIVE_NAME):
        model.__dict__.pop(name, None)
    return model


def disable_mit_adapter(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager: inside it, ``model`` (an MiT model) computes its base model, bit for bit, in every thread.

    A ``modality_embedding`` given to ``forward`` / ``generate`` inside the context is accepted and ignored (not even
    validated), so the call that computes the adapted model also computes the base one (a reference model, as peft's
    ``disable_adapter`` serves); padding-aware positions are not derived either (the base model's own positions).
    Contexts nest; on exit the previous state comes back, also after an exception. ValueError for a model that is
    not an MiT model."""
    _require_mit(model, "disable_adapter")
    return disabled(model, DISABLED_NAME)


def apply_mit(model: nn.Module, config: MiTConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Turn a Hugging Face decoder model (``*ForCausalLM`` or bare ``*Model`` of a family in
    :data:`mit.hf.families.FAMILIES`) into an MiT model, in place, and return it.

    Freezes every base parameter; infuses the layers ``config.resolved_layers(num_layers)`` with zero-initialised
    maps (so the model's outputs are unchanged until training moves them); leaves the other layers untouched. The
    adapter is named ``adapter_name`` (more are added with ``model.add_adapter(config, name)``). Everything is
    validated and built (:func:`plan_mit`) before the model changes."""
    check_adapter_name(adapter_name)
    return plan_mit(model, config).install(model, adapter_name)


def plan_mit(model: nn.Module, config: MiTConfig) -> MiTPlan:
    """Validate ``model`` and ``config`` for :func:`apply_mit` and build its :class:`MiTPlan`; ``model`` is left as
    it is (only the ``"mit_" + base`` attention function gets registered in transformers, process-wide)."""
    if not isinstance(config, MiTConfig):
        raise ValueError(f"config must be a mit.MiTConfig, got {type(config).__name__}")
    if is_mit_model(model):
        raise ValueError("apply_mit was already applied to this model")
    if isinstance(model, Rebuildable):
        raise ValueError(f"apply_mit needs a plain model; this one is already a {type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_mit needs a Hugging Face decoder model, got {type(model).__name__}")
    return MiTPlan(config, _implementation(model, config), plan_mit_layers(model, config))


def _implementation(model: nn.Module, config: MiTConfig) -> str | None:
    """The ``"mit_" + base`` attention implementation ``config`` needs on ``model`` (None without key/value
    infusion); registers it in transformers."""
    if not config.infuse_kv:
        return None
    attention = decoder_of(model).config._attn_implementation
    return mit_implementation(base_implementation(attention or "eager"))


def plan_mit_layers(
    model: nn.Module, config: MiTConfig, like: torch.Tensor | None = None
) -> list[tuple[str, nn.Module, MiTKVInfusion | None, MiTFFNInfusion | None]]:
    """(name, layer, new kv infusion, new ffn infusion) per layer ``config`` infuses in ``model``; the modules are
    built on ``like``'s device (default: each layer's own)."""
    decoder = decoder_of(model)
    spec = family_of(decoder.config)
    indices = config.resolved_layers(len(decoder.layers))
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for index in indices:
        layer = decoder.layers[index]
        kv = _kv_infusion(layer.self_attn, config, decoder.config, like) if config.infuse_kv else None
        ffn = _ffn_infusion(layer.mlp, config, spec, decoder.config, like) if config.infuse_ffn else None
        layers.append((names[id(layer)], layer, kv, ffn))
    return layers


def planned_mit_parameters(model: nn.Module, config: MiTConfig) -> dict[str, torch.Size]:
    """Name -> shape of every MiT parameter ``config`` gives ``model`` (plain or already an MiT model), built on the
    meta device from the constructors :func:`apply_mit` uses, without changing ``model``: what an adapter saved with
    ``config`` must hold to load into the plain base model."""
    layers = plan_mit_layers(model, config, torch.empty(0, device="meta"))
    return {name: p.shape for name, p in MiTPlan(config, None, layers).named_parameters()}
