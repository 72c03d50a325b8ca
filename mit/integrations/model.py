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
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..config import MiTConfig
from .attention import (
    KV_INFUSION_NAME,
    MASKS_KWARG,
    MaskAnalyses,
    base_implementation,
    is_mit_implementation,
    mit_implementation,
)
from .classes import Rebuildable, RefusesPretrained, mit_subclass, register_kind
from .families import FamilySpec, family_of, ffn_is_fused
from .infusion import MiTFFNInfusion, MiTKVInfusion, check_modality, mit_named_parameters
from .layers import FFN_INFUSION_NAME, MiTDecoderLayerMixin, MiTMLPMixin, check_attention_dispatch
from .scope import bind_generation_cache


def padding_aware_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions that start at 0 at each sample's first real token: ``cumsum(mask) - 1`` over the last ``seq_len``
    columns of the (B, past + seq_len) padding mask, as generate() computes them.

    MiT needs them for left-padded batches: its post-rotary ``k_add`` makes attention depend on absolute positions
    (rotary alone is shift-invariant), so with default positions a sample's output would depend on its padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding the decoder ``layers`` (``model.model`` of a ``*ForCausalLM``, or a bare ``*Model``)."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            if getattr(candidate, "config", None) is not None:
                return candidate
    raise ValueError(
        f"apply_mit needs a Hugging Face decoder model (a *ForCausalLM or a bare *Model with .layers), "
        f"got {type(model).__name__}"
    )


UNDO_NAME = "_mit_undo"  # instance attribute of an MiT model: its MiTUndo
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


class MiTModelMixin(RefusesPretrained, Rebuildable):
    """What ``apply_mit`` adds to the top-level model (mixin of ``MiT<ModelClass>``). transformers'
    ``save_pretrained`` / ``from_pretrained`` are refused (:class:`~mit.integrations.classes.RefusesPretrained`):
    :func:`mit.save_adapter` / :func:`mit.load_adapter` round-trip the method."""

    mit_config: MiTConfig
    _method = "MiT"
    _pretrained_hint = ("mit.save_adapter", "mit.load_adapter")

    def mit_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every MiT parameter, found by module type."""
        return list(mit_named_parameters(self))

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
        trainable, total = count_parameters(self)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def mit_dispatch(self) -> dict[str, str]:
        """How each MiT module ran in the last forward with an embedding: ``{module name: "fused" | "fallback: ..." |
        "scaled down_proj input"}`` (None for a module that has not run yet)."""
        return {
            name: module.last_dispatch
            for name, module in self.named_modules()
            if isinstance(module, (MiTKVInfusion, MiTFFNInfusion))
        }

    def unload(self) -> nn.Module:
        """Remove MiT from this model, in place, and return it: the base model exactly as it was before
        :func:`apply_mit` (see :func:`unload_mit`)."""
        return unload_mit(self)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it, the model computes the base model (bit for bit); a ``modality_embedding``
        given to ``forward`` / ``generate`` is accepted and ignored (see :func:`disable_mit_adapter`)."""
        return disable_mit_adapter(self)

    def mit_adapter_disabled(self) -> bool:
        """True inside a :meth:`disable_adapter` context."""
        return self.__dict__.get(DISABLED_NAME, 0) > 0

    def __setstate__(self, state: dict) -> None:
        """Unpickling in a new process: the attention function the config names must be registered there too."""
        super().__setstate__(state)
        if self.mit_config.infuse_kv:
            mit_implementation(base_implementation(self.config._attn_implementation))

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, with the infusion maps' outputs computed once per embedding for the whole
        call instead of at every decoding step (the weights cannot change during it): the cache belongs to this call,
        in this thread (:func:`~mit.integrations.scope.bind_generation_cache`)."""
        if not self.mit_adapter_disabled():
            self._mit_check_generate_embedding(args, kwargs)
        previous = bind_generation_cache({})
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

    def _mit_prepare(self, arguments: dict, modality_embedding: torch.Tensor | None) -> None:
        """Validate the embedding, refuse packed batches, derive padding-aware positions (in ``arguments``)."""
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
        extra = arguments.get("kwargs") or {}
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
    signature = inspect.signature(base.forward)
    parameters = list(signature.parameters.values())
    var_keyword = next((p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        raise ValueError(f"{base.__name__}.forward takes no **kwargs: the embedding cannot reach its layers")
    embedding = inspect.Parameter(
        "modality_embedding", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.Tensor | None
    )
    where = parameters.index(var_keyword)
    mit_signature = signature.replace(parameters=[*parameters[:where], embedding, *parameters[where:]])

    def forward(self, *args, modality_embedding: torch.Tensor | None = None, **kwargs):
        if modality_embedding is None or self.mit_adapter_disabled():  # disabled: the base model, embedding ignored
            return base.forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        self._mit_prepare(bound.arguments, modality_embedding)
        # the embedding's one route: transformers' **kwargs, to every decoder layer and attention function (the MiT
        # decoder layer binds it for its MLP, mit.integrations.scope); with it, this call's own mask analyses
        extra = bound.arguments.setdefault(var_keyword.name, {})
        extra["modality_embedding"] = modality_embedding
        if self.mit_config.infuse_kv and not torch.compiler.is_compiling():  # compiled: no mask is read (attention.py)
            extra[MASKS_KWARG] = MaskAnalyses()
        return base.forward(*bound.args, **bound.kwargs)

    forward.__signature__ = mit_signature
    forward.__doc__ = (
        f"{base.__name__}.forward with ``modality_embedding`` (B, modality_dim): the per-sample embedding infused "
        "into the MiT layers (None: exactly the frozen model)."
    )

    def _can_set_attn_implementation(cls) -> bool:  # transformers reads the class's module source otherwise
        probe = getattr(base, "_can_set_attn_implementation", None)
        return probe() if probe is not None else True

    return {"forward": forward, "_can_set_attn_implementation": classmethod(_can_set_attn_implementation)}


register_kind("model", MiTModelMixin, _forward_with_modality)


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

    def install(self, model: nn.Module) -> nn.Module:
        """Apply the plan to ``model`` (the one it was made for): freeze, attach, switch classes; what
        :func:`unload_mit` needs to undo it is recorded on the model (:class:`MiTUndo`)."""
        undo = MiTUndo(
            attn_implementation=model.config._attn_implementation,
            installed_implementation=None,
            requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        )
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer, kv, ffn in self.layers:
            if kv is not None:
                setattr(layer.self_attn, KV_INFUSION_NAME, kv)
            if ffn is not None:
                mlp = layer.mlp
                setattr(mlp, FFN_INFUSION_NAME, ffn)
                if not ffn.fused:
                    mlp.down_proj.register_forward_pre_hook(ffn.scale_down_proj_input)
                mlp.__class__ = mit_subclass(MiTMLPMixin, type(mlp))
            layer.__class__ = mit_subclass(MiTDecoderLayerMixin, type(layer))
        if self.implementation is not None and not is_mit_implementation(model.config._attn_implementation):
            model.config._attn_implementation = self.implementation
            undo = dataclasses.replace(undo, installed_implementation=self.implementation)
        model.__class__ = mit_subclass(MiTModelMixin, type(model))
        model.mit_config = self.config
        model.__dict__[UNDO_NAME] = undo
        return model


def is_mit_model(model: object) -> bool:
    """True for a model returned by :func:`apply_mit`."""
    return isinstance(model, MiTModelMixin)


def unload_mit(model: nn.Module) -> nn.Module:
    """Remove MiT from ``model`` (an MiT model), in place, and return it: the base model exactly as it was before
    :func:`apply_mit` / :func:`mit.load_adapter`.

    The infusion modules are detached (with them, the MiT parameters and state-dict keys), the ``down_proj``
    pre-hooks MiT registered are removed (other hooks keep their place), every ``MiT<Class>`` instance gets its own
    class back, ``config._attn_implementation`` and every base parameter's ``requires_grad`` get their recorded
    values (:class:`MiTUndo`), and ``mit_config`` goes. If ``model.set_attn_implementation(...)`` was called on the
    MiT model, the implementation it chose (without ``"mit_"``) is kept. The ``"mit_" + base`` attention function
    stays registered in transformers (process-wide, other MiT models may use it); the unloaded model no longer
    names it. A model pickled by an earlier release has no record: its attention implementation becomes the base
    name and its base parameters stay frozen. ValueError for a model that is not an MiT model or inside its
    ``disable_adapter()`` context."""
    if not is_mit_model(model):
        raise ValueError(f"model: unload needs a model returned by mit.apply_mit, got {type(model).__name__}")
    if model.mit_adapter_disabled():
        raise ValueError("model: unload inside its disable_adapter() context; leave the context first")
    undo: MiTUndo | None = model.__dict__.get(UNDO_NAME)
    for module in list(model.modules()):
        kv = module._modules.get(KV_INFUSION_NAME)
        if isinstance(kv, MiTKVInfusion):
            delattr(module, KV_INFUSION_NAME)
        ffn = module._modules.get(FFN_INFUSION_NAME)
        if isinstance(ffn, MiTFFNInfusion):
            down_proj = getattr(module, "down_proj", None)
            if isinstance(down_proj, nn.Module):
                _remove_pre_hooks_of(down_proj, ffn)
            delattr(module, FFN_INFUSION_NAME)
        if module is not model and isinstance(module, (MiTDecoderLayerMixin, MiTMLPMixin)):
            module.__class__ = module._mit_base
    current = model.config._attn_implementation
    if undo is not None and undo.installed_implementation is not None and current == undo.installed_implementation:
        model.config._attn_implementation = undo.attn_implementation
    elif is_mit_implementation(current):
        model.config._attn_implementation = base_implementation(current)
    if undo is not None:
        for name, param in model.named_parameters():
            if name in undo.requires_grad:
                param.requires_grad_(undo.requires_grad[name])
    model.__class__ = model._mit_base
    del model.mit_config
    model.__dict__.pop(UNDO_NAME, None)
    return model


def _remove_pre_hooks_of(module: nn.Module, infusion: MiTFFNInfusion) -> None:
    """Remove ``infusion.scale_down_proj_input`` from ``module``'s forward pre-hooks (found by the bound method, so
    it works after ``copy.deepcopy`` / pickling, where the registration's handle would not)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        method = getattr(hook, "__func__", None)
        if getattr(hook, "__self__", None) is infusion and method is MiTFFNInfusion.scale_down_proj_input:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


@contextlib.contextmanager
def disable_mit_adapter(model: nn.Module) -> Iterator[None]:
    """Context manager: inside it, ``model`` (an MiT model) computes its base model, bit for bit, in every thread.

    A ``modality_embedding`` given to ``forward`` / ``generate`` inside the context is accepted and ignored (not even
    validated), so the call that computes the adapted model also computes the base one (a reference model, as peft's
    ``disable_adapter`` serves); padding-aware positions are not derived either (the base model's own positions).
    Contexts nest; on exit the previous state comes back, also after an exception. ValueError for a model that is
    not an MiT model."""
    if not is_mit_model(model):
        raise ValueError(f"model: disable_adapter needs a model returned by mit.apply_mit, got {type(model).__name__}")
    previous = model.__dict__.get(DISABLED_NAME, 0)
    model.__dict__[DISABLED_NAME] = previous + 1
    try:
        yield
    finally:
        if previous:
            model.__dict__[DISABLED_NAME] = previous
        else:
            model.__dict__.pop(DISABLED_NAME, None)


def apply_mit(model: nn.Module, config: MiTConfig) -> nn.Module:
    """Turn a Hugging Face decoder model (``*ForCausalLM`` or bare ``*Model`` of a family in
    :data:`mit.integrations.families.FAMILIES`) into an MiT model, in place, and return it.

    Freezes every base parameter; infuses the layers ``config.resolved_layers(num_layers)`` with zero-initialised
    maps (so the model's outputs are unchanged until training moves them); leaves the other layers untouched.
    Everything is validated and built (:func:`plan_mit`) before the model changes."""
    return plan_mit(model, config).install(model)


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
    layers = _plan_layers(model, config)
    implementation = None
    if config.infuse_kv:
        attention = decoder_of(model).config._attn_implementation
        implementation = mit_implementation(base_implementation(attention or "eager"))
    return MiTPlan(config, implementation, layers)


def _plan_layers(
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
    layers = _plan_layers(model, config, torch.empty(0, device="meta"))
    return {name: p.shape for name, p in MiTPlan(config, None, layers).named_parameters()}
