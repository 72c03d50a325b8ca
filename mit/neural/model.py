"""``apply_neural_tuning``: neural tuning on a Hugging Face decoder model, through the same machinery as MiT.

In place, it:

1. freezes every base parameter;
2. attaches :class:`~mit.neural.neurons.NeuralTuningLayer` (``self_attn.nt_neurons``) to the layers
   ``start_layer .. N - 1``, with forward hooks on ``q_proj`` / ``v_proj`` (/ ``k_proj``), or on a fused
   ``qkv_proj``, that add the deltas to the projections' outputs (before q/k norms and rotary); those decoder layers
   become ``NT<Layer>`` pass-through subclasses that hand the per-forward state to their neurons;
3. optionally adds ``nt_image_projection`` and ``nt_new_tokens`` (:mod:`mit.neural.tokens`);
4. switches the decoder (and the top-level model) to ``NT<Class>``, whose ``forward`` creates the per-forward state in
   transformers' ``**kwargs``; the top-level one also takes a keyword-only ``image_features`` (B, P, image_dim).

The attention implementation is untouched: no transformers ``forward`` is copied and no argument is passed
positionally to transformers code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..integrations.classes import Rebuildable, RefusesPretrained, mit_subclass, register_kind
from ..integrations.families import family_of
from ..integrations.model import count_parameters, decoder_of, is_mit_model, padding_aware_position_ids
from .config import NeuralTuningConfig
from .neurons import NEURONS_NAME, NeuralState, NeuralTuningLayer
from .tokens import ImageProjection, NewTokenRows, prepend_image_tokens

STATE_KWARG = "nt_state"
UNDO_NAME = "_nt_undo"  # instance attribute of a neural-tuning model: its NeuralUndo
DISABLED_NAME = "_nt_adapter_disabled"  # instance attribute while disable_adapter() contexts are open: their depth
IMAGE_NAME, TOKENS_NAME = "nt_image_projection", "nt_new_tokens"
_NT_NAME = re.compile(r"(^|\.)nt_")


def neural_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every neural-tuning parameter: those under a module attribute named ``nt_*`` (the
    neurons, the image projection, the new-token rows, and task heads attached as ``nt_*`` by later code)."""
    return [(name, p) for name, p in model.named_parameters() if _NT_NAME.search(name)]


class NTDecoderLayerMixin(Rebuildable):
    """Mixin of ``NT<DecoderLayer>``: the base layer's forward, with the per-forward :class:`NeuralState` (from the
    kwargs, so a gradient-checkpointing recomputation gets the same one) handed to the layer's neurons."""

    def forward(self, *args, **kwargs):
        neurons: NeuralTuningLayer = getattr(self.self_attn, NEURONS_NAME)
        checkpoint = getattr(self, "_gradient_checkpointing_func", None)
        if (
            self.training
            and getattr(self, "gradient_checkpointing", False)
            and isinstance(checkpoint, functools.partial)
            and checkpoint.keywords.get("use_reentrant", True) is not False  # torch's default when absent: True
        ):
            raise ValueError(
                f"gradient_checkpointing_kwargs={checkpoint.keywords} (reentrant checkpointing) is not supported by "
                "neural tuning (the cross-layer neurons would get no gradient through the recomputation); expected "
                "use_reentrant=False (transformers' default when no kwargs are given)"
            )
        neurons.state = kwargs.get(STATE_KWARG)
        try:
            return super().forward(*args, **kwargs)
        finally:
            neurons.clear()


def _signature_with(base: type, extra: list[inspect.Parameter]) -> tuple[inspect.Signature, inspect.Signature, str]:
    signature = inspect.signature(base.forward)
    parameters = list(signature.parameters.values())
    var_keyword = next((p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        raise ValueError(f"{base.__name__}.forward takes no **kwargs: the neural-tuning state cannot reach its layers")
    where = parameters.index(var_keyword)
    return signature, signature.replace(parameters=[*parameters[:where], *extra, *parameters[where:]]), var_keyword.name


def refuse_modality_embedding(model: nn.Module, kwargs: dict) -> None:
    """ValueError when ``kwargs`` hold MiT's ``modality_embedding``: a neural-tuning model would pass it on to
    transformers, which ignores it, and return the outputs without it."""
    if kwargs.get("modality_embedding") is not None:
        raise ValueError(
            f"modality_embedding was given to {type(model).__name__}, a neural-tuning model, which has no MiT "
            "infusion and would ignore it; neural tuning takes images as image_features (B, P, image_dim). For MiT, "
            "use a model returned by mit.apply_mit or mit.load_adapter"
        )


def _decoder_forward(base: type) -> dict:
    """``forward`` of ``NT<Decoder>``: the base one with a fresh :class:`NeuralState` in its ``**kwargs``."""
    _, signature, _ = _signature_with(base, [])

    def forward(self, *args, **kwargs):
        refuse_modality_embedding(self, kwargs)
        kwargs.setdefault(STATE_KWARG, NeuralState())
        return base.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    return {"forward": forward}


def _model_forward(base: type) -> dict:
    """``forward`` of ``NT<Model>``: the base signature plus keyword-only ``image_features`` (B, P, image_dim) and
    ``image_mask`` (B,)."""
    images = inspect.Parameter(
        "image_features", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.Tensor | None
    )
    image_mask = inspect.Parameter(
        "image_mask", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.Tensor | None
    )
    signature, nt_signature, var_keyword = _signature_with(base, [images, image_mask])

    def forward(
        self, *args, image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None, **kwargs
    ):
        refuse_modality_embedding(self, kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments.setdefault(var_keyword, {}).setdefault(STATE_KWARG, NeuralState())
        if self.neural_adapter_disabled():  # the base model: the image inputs are ignored
            image_features = image_mask = None
        if image_features is not None:
            self._nt_prepare_images(bound.arguments, image_features, image_mask)
        elif image_mask is not None:
            raise ValueError("image_mask: given without image_features")
        return base.forward(*bound.args, **bound.kwargs)

    forward.__signature__ = nt_signature
    forward.__doc__ = (
        f"{base.__name__}.forward with ``image_features`` (B, P, image_dim): CLIP patch tokens, projected and "
        "placed before each prompt's first real token (None: text only); ``image_mask`` (B,) bool: False for rows "
        "that have no image (their image positions are masked out)."
    )
    return {"forward": forward}


class NTDecoderMixin(RefusesPretrained, Rebuildable):
    """Mixin of ``NT<Decoder>`` (the module holding ``layers``, when it is not the top-level model); its
    ``save_pretrained`` / ``from_pretrained`` are refused, as the top-level model's."""

    _method = "neural tuning"
    _pretrained_hint = ("mit.save_neural_adapter", "mit.load_neural_adapter")


@dataclasses.dataclass(frozen=True)
class NeuralUndo:
    """What :func:`unload_neural` needs to give the base model back exactly, recorded by
    :func:`apply_neural_tuning` (plain data: it survives ``copy.deepcopy`` and pickling with the model).

    Attributes:
        requires_grad: ``requires_grad`` of every base parameter, by name, before neural tuning froze them.
        vocab_size: the input embedding's number of rows before the new tokens resized it (None: not resized).
    """

    requires_grad: dict[str, bool]
    vocab_size: int | None


class NeuralTuningModelMixin(RefusesPretrained, Rebuildable):
    """What ``apply_neural_tuning`` adds to the top-level model (mixin of ``NT<ModelClass>``). transformers'
    ``save_pretrained`` / ``from_pretrained`` are refused (:class:`~mit.integrations.classes.RefusesPretrained`):
    :func:`mit.save_neural_adapter` / :func:`mit.load_neural_adapter` round-trip the method."""

    neural_config: NeuralTuningConfig
    nt_new_token_ids: list[int]
    _method = "neural tuning"
    _pretrained_hint = ("mit.save_neural_adapter", "mit.load_neural_adapter")

    def neural_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every neural-tuning parameter (see :func:`neural_named_parameters`)."""
        return neural_named_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
        trainable, total = count_parameters(self)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def unload(self) -> nn.Module:
        """Remove neural tuning from this model, in place, and return the base model (see :func:`unload_neural`)."""
        return unload_neural(self)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it, the model computes the base model (see :func:`disable_neural_adapter`)."""
        return disable_neural_adapter(self)

    def neural_adapter_disabled(self) -> bool:
        """True inside a :meth:`disable_adapter` context."""
        return self.__dict__.get(DISABLED_NAME, 0) > 0

    def _nt_prepare_images(
        self, arguments: dict, image_features: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> None:
        """Replace ``input_ids`` by ``inputs_embeds`` with the image tokens inserted (mask, labels and padding-aware
        positions follow) in the bound ``arguments``."""
        projection: ImageProjection | None = getattr(self, IMAGE_NAME, None)
        if projection is None:
            raise ValueError("image_features were given but the NeuralTuningConfig has image_dim=None")
        ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError("image_features need exactly one of input_ids and inputs_embeds (the prompt)")
        extra = arguments.get("kwargs") or {}
        if any(where.get(name) is not None for where in (arguments, extra) for name in ("cache", "past_key_values")):
            raise ValueError("image_features belong to the prefill: pass them without a KV cache (cache=None)")
        if embeds is None:
            embeds = self.get_input_embeddings()(ids)
        mask = arguments.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        elif not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"with image_features, attention_mask must be a (B, L) padding mask, got {mask!r:.80}")
        images = projection(image_features, embeds.dtype).to(embeds.device)
        embeds, mask, labels = prepend_image_tokens(embeds, mask, images, arguments.get("labels"), image_mask)
        arguments.pop("input_ids", None)
        arguments["inputs_embeds"], arguments["attention_mask"] = embeds, mask
        if labels is not None:
            arguments["labels"] = labels
        if arguments.get("position_ids") is None:
            arguments["position_ids"] = padding_aware_position_ids(mask, mask.shape[1])

    def generate(
        self, *args, image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None, **kwargs
    ):
        """transformers' ``generate``; with ``image_features`` (B, P, image_dim) the prompt's embeddings get the image
        tokens first and the call returns only the new tokens (as generate does for ``inputs_embeds``)."""
        refuse_modality_embedding(self, kwargs)
        if image_features is None or self.neural_adapter_disabled():  # disabled: the images are ignored
            return super().generate(*args, **kwargs)
        ids = args[0] if args else kwargs.pop("input_ids", None)
        if ids is None or len(args) > 1:
            raise ValueError("generate with image_features takes the prompt as input_ids (first argument) only")
        arguments = {"input_ids": ids, "attention_mask": kwargs.pop("attention_mask", None)}
        self._nt_prepare_images(arguments, image_features, image_mask)
        del arguments["position_ids"]  # generate derives them from the mask at every step
        return super().generate(inputs_embeds=arguments["inputs_embeds"], attention_mask=arguments["attention_mask"],
                                **kwargs)  # fmt: skip


register_kind("nt_decoder_layer", NTDecoderLayerMixin, prefix="NT")
register_kind("nt_decoder", NTDecoderMixin, _decoder_forward, prefix="NT")
register_kind("nt_model", NeuralTuningModelMixin, _model_forward, prefix="NT")


def is_neural_model(model: object) -> bool:
    """True for a model returned by :func:`apply_neural_tuning`."""
    return isinstance(model, NeuralTuningModelMixin)


def _make_neurons(layer: nn.Module, index: int, config: NeuralTuningConfig, model_config, like: torch.Tensor):
    """The :class:`NeuralTuningLayer` for decoder layer ``layer`` (parameters on ``like``'s device)."""
    attention = layer.self_attn
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(attention, "head_dim", None) or model_config.hidden_size // heads
    eps = float(getattr(model_config, "rms_norm_eps", None) or 1e-6)
    return NeuralTuningLayer(config, index, model_config.hidden_size, heads * head_dim, kv_heads * head_dim, eps, like)


def _attach_neurons(layer: nn.Module, index: int, config: NeuralTuningConfig, model_config) -> None:
    attention = layer.self_attn
    neurons = _make_neurons(layer, index, config, model_config, next(attention.parameters()))
    setattr(attention, NEURONS_NAME, neurons)
    if all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        attention.q_proj.register_forward_hook(neurons.add_q)
        attention.v_proj.register_forward_hook(neurons.add_v)
        if neurons.with_k:
            attention.k_proj.register_forward_hook(neurons.add_k)
    elif isinstance(getattr(attention, "qkv_proj", None), nn.Linear):
        if attention.qkv_proj.out_features != neurons.q_features + 2 * neurons.kv_features:
            raise ValueError(
                f"qkv_proj of layer {index} has {attention.qkv_proj.out_features} outputs, expected "
                f"Hq*D + 2*Hkv*D = {neurons.q_features + 2 * neurons.kv_features}"
            )
        attention.qkv_proj.register_forward_hook(neurons.add_qkv)
    else:
        raise ValueError(
            f"neural tuning needs q_proj/k_proj/v_proj or qkv_proj Linear modules; {type(attention).__name__} of "
            f"layer {index} has neither"
        )
    layer.__class__ = mit_subclass(NTDecoderLayerMixin, type(layer))


def planned_neural_parameters(
    model: nn.Module, config: NeuralTuningConfig, new_token_ids: list[int] | None
) -> dict[str, torch.Size]:
    """Name -> shape of every parameter :func:`apply_neural_tuning` (``model``, ``config``, ``new_token_ids=...``)
    would add, built on the meta device from the same constructors, without changing ``model``: what
    :func:`mit.load_neural_adapter` checks a file against before it touches the model."""
    decoder = decoder_of(model)
    family_of(decoder.config)
    names = {id(m): n for n, m in model.named_modules()}
    meta = torch.empty(0, device="meta", dtype=next(decoder.parameters()).dtype)
    shapes: dict[str, torch.Size] = {}

    def add(prefix: str, module: nn.Module) -> None:
        shapes.update({f"{prefix}.{n}": p.shape for n, p in module.named_parameters()})

    for index in config.resolved_layers(len(decoder.layers)):
        layer = decoder.layers[index]
        add(f"{names[id(layer.self_attn)]}.{NEURONS_NAME}", _make_neurons(layer, index, config, decoder.config, meta))
    if config.image_dim is not None:
        add(IMAGE_NAME, ImageProjection(config.image_dim, decoder.config.hidden_size, meta))
    if new_token_ids:
        _check_contiguous(list(new_token_ids))
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = head is not None and head.weight is embedding.weight
        rows = torch.empty(len(new_token_ids), embedding.weight.shape[1], device="meta", dtype=meta.dtype)
        add(TOKENS_NAME, NewTokenRows(new_token_ids[0], rows, None if head is None or tied else rows, tied))
    return shapes


def _check_contiguous(token_ids: list[int]) -> None:
    if token_ids and token_ids != list(range(token_ids[0], token_ids[0] + len(token_ids))):
        raise ValueError(f"the new tokens must have contiguous ids, got {token_ids}")


def _add_new_tokens(model: nn.Module, token_ids: list[int]) -> None:
    first = token_ids[0]
    embedding = model.get_input_embeddings()
    if embedding.num_embeddings < first + len(token_ids):
        model.resize_token_embeddings(first + len(token_ids))
        embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embedding.weight
    rows = slice(first, first + len(token_ids))
    init_head = None if head is None or tied else head.weight[rows]
    tokens = NewTokenRows(first, embedding.weight[rows], init_head, tied)
    embedding.weight.requires_grad_(False)
    setattr(model, TOKENS_NAME, tokens)
    embedding.register_forward_hook(tokens.embed_hook)
    if tokens.head is not None:
        head.weight.requires_grad_(False)
        head.register_forward_hook(tokens.head_hook)


def apply_neural_tuning(
    model: nn.Module, config: NeuralTuningConfig, tokenizer=None, *, new_token_ids: list[int] | None = None
) -> nn.Module:
    """Turn a Hugging Face decoder model of a supported family into a neural-tuning model, in place, and return it.

    ``tokenizer`` is needed when ``config.new_tokens`` is not empty: the tokens are added to it (as special tokens)
    and the model's embedding is resized to hold them. ``new_token_ids`` (used by the adapter loader) gives their ids
    instead of a tokenizer."""
    if not isinstance(config, NeuralTuningConfig):
        raise ValueError(f"config must be a mit.NeuralTuningConfig, got {type(config).__name__}")
    if is_neural_model(model) or is_mit_model(model):
        raise ValueError(f"apply_neural_tuning needs a plain model; this one is already a {type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_neural_tuning needs a Hugging Face decoder model, got {type(model).__name__}")
    decoder = decoder_of(model)
    family_of(decoder.config)  # validates the model type
    layers = config.resolved_layers(len(decoder.layers))
    if config.new_tokens and new_token_ids is None:
        if tokenizer is None:
            raise ValueError(f"config.new_tokens={config.new_tokens} need a tokenizer to add them to, got None")
        tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
        new_token_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(config.new_tokens))]
    if new_token_ids is not None and len(new_token_ids) != len(config.new_tokens):
        raise ValueError(
            f"new_token_ids must have one id per new token ({len(config.new_tokens)}), got {new_token_ids}"
        )
    _check_contiguous(list(new_token_ids or []))

    undo = NeuralUndo(
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        vocab_size=model.get_input_embeddings().num_embeddings
        if new_token_ids and model.get_input_embeddings().num_embeddings < new_token_ids[0] + len(new_token_ids)
        else None,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for index in layers:
        _attach_neurons(decoder.layers[index], index, config, decoder.config)
    like = next(decoder.parameters())
    if config.image_dim is not None:
        setattr(model, IMAGE_NAME, ImageProjection(config.image_dim, decoder.config.hidden_size, like))
    if new_token_ids:
        _add_new_tokens(model, list(new_token_ids))
    if decoder is not model:
        decoder.__class__ = mit_subclass(NTDecoderMixin, type(decoder))
    model.__class__ = mit_subclass(NeuralTuningModelMixin, type(model))
    for name, module in model.named_modules():  # new modules follow the model's train / eval mode
        if _NT_NAME.search(name):
            module.train(model.training)
    model.neural_config = config
    model.nt_new_token_ids = list(new_token_ids or [])
    model.__dict__[UNDO_NAME] = undo
    return model


_HOOK_METHODS = (
    NeuralTuningLayer.add_q,
    NeuralTuningLayer.add_k,
    NeuralTuningLayer.add_v,
    NeuralTuningLayer.add_qkv,
    NewTokenRows.embed_hook,
    NewTokenRows.head_hook,
)


def _method_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose hooks carry neural tuning: every layer's neurons and the new-token rows."""
    return [module for module in model.modules() if isinstance(module, (NeuralTuningLayer, NewTokenRows))]


def unload_neural(model: nn.Module) -> nn.Module:
    """Remove neural tuning from ``model``, in place, and return it: the base model as it was before
    :func:`apply_neural_tuning` / :func:`mit.load_neural_adapter`.

    The forward hooks neural tuning registered (on the attention projections, the input embedding and the LM head;
    found by their bound methods, so this works after ``copy.deepcopy`` / pickling) are removed and other hooks keep
    their place; the ``nt_*`` modules are detached (task heads attached as ``nt_*`` too); every ``NT<Class>``
    instance gets its own class back; every base parameter's ``requires_grad`` gets its recorded value;
    ``neural_config`` and ``nt_new_token_ids`` go. When the new tokens had grown the vocabulary, the embeddings are
    resized back with ``resize_token_embeddings`` (the rows kept are the original ones, bit for bit, and
    ``config.vocab_size`` comes back; an untied LM head is then a new module of the same class, as it already was
    after the resize that grew it). A tokenizer that got the new tokens keeps them. ValueError for a model that is
    not a neural-tuning model, or inside its ``disable_adapter()`` context."""
    if not is_neural_model(model):
        raise ValueError(f"model: unload needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}")
    if model.neural_adapter_disabled():
        raise ValueError("model: unload inside its disable_adapter() context; leave the context first")
    undo: NeuralUndo | None = model.__dict__.get(UNDO_NAME)
    owners = {id(module) for module in _method_modules(model)}
    for module in list(model.modules()):
        for key, hook in list(module._forward_hooks.items()):
            if id(getattr(hook, "__self__", None)) in owners and getattr(hook, "__func__", None) in _HOOK_METHODS:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for name in list(module._modules):
            if name.startswith("nt_"):  # the neurons, the image projection, the new-token rows, nt_* task heads
                delattr(module, name)
        if module is not model and isinstance(module, (NTDecoderLayerMixin, NTDecoderMixin)):
            module.__class__ = module._mit_base
    if undo is not None and undo.vocab_size is not None:
        model.resize_token_embeddings(undo.vocab_size)
    if undo is not None:
        for name, param in model.named_parameters():
            if name in undo.requires_grad:
                param.requires_grad_(undo.requires_grad[name])
    model.__class__ = model._mit_base
    del model.neural_config
    del model.nt_new_token_ids
    model.__dict__.pop(UNDO_NAME, None)
    return model


@contextlib.contextmanager
def disable_neural_adapter(model: nn.Module) -> Iterator[None]:
    """Context manager: inside it, ``model`` (a neural-tuning model) computes its base model, bit for bit: the
    neurons' deltas and the new-token rows are off (their hooks return the modules' own outputs), and
    ``image_features`` / ``image_mask`` given to ``forward`` / ``generate`` are accepted and ignored. With new tokens
    that grew the vocabulary, the logits keep the grown width; the original vocabulary's columns are the base
    model's. Contexts nest; on exit the previous state comes back, also after an exception. The switch is on the
    modules, so it holds for every thread using the model. ValueError for a model that is not a neural-tuning
    model."""
    if not is_neural_model(model):
        raise ValueError(
            f"model: disable_adapter needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}"
        )
    previous = model.__dict__.get(DISABLED_NAME, 0)
    model.__dict__[DISABLED_NAME] = previous + 1
    modules = _method_modules(model)
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        if previous:
            model.__dict__[DISABLED_NAME] = previous
        else:
            model.__dict__.pop(DISABLED_NAME, None)
            for module in modules:
                module.__dict__.pop("disabled", None)
