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
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..hf.classes import Rebuildable, method_subclass
from ..hf.decoder import decoder_of, padding_aware_position_ids
from ..hf.families import family_of
from ..hf.method_model import MethodModelMixin, RefusesPretrained
from ..hf.reversible import disabled, disabled_depth, freeze, remove_hooks, restore_class, restore_requires_grad
from ..hf.signature import splice_keyword_inputs
from .config import NeuralTuningConfig
from .neurons import NEURONS_NAME, NeuralState, NeuralTuningLayer
from .tokens import ImageProjection, NewTokenRows, prepend_image_tokens

STATE_KWARG = "nt_state"
UNDO_NAME = "_nt_undo"  # instance attribute of a neural-tuning model: its NeuralUndo
DISABLED_NAME = "_nt_adapter_disabled"  # instance attribute while disable_adapter() contexts are open: their depth
IMAGE_NAME, TOKENS_NAME = "nt_image_projection", "nt_new_tokens"
ADAPTERS_NAME = "_nt_adapters"  # instance attribute of a neural-tuning model: {adapter name: NeuralAdapter}
ACTIVE_NAME = "_nt_active_adapter"  # instance attribute of a neural-tuning model: the name of the attached adapter
DEFAULT_ADAPTER = "default"  # the name apply_neural_tuning / load_neural_adapter give an adapter (peft's)
_NT_NAME = re.compile(r"(^|\.)nt_")


def neural_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every neural-tuning parameter: those under a module attribute named ``nt_*`` (the
    neurons, the image projection, the new-token rows, and task heads attached as ``nt_*`` by later code)."""
    return [(name, p) for name, p in model.named_parameters() if _NT_NAME.search(name)]


class NTDecoderLayerMixin(Rebuildable):
    """Mixin of ``NT<DecoderLayer>``: the base layer's forward, with the per-forward :class:`NeuralState` (from the
    kwargs, so a gradient-checkpointing recomputation gets the same one) handed to the layer's neurons."""

    _mit_prefix = "NT"

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
    signature = splice_keyword_inputs(base, (), "neural-tuning").spliced

    def forward(self, *args, **kwargs):
        refuse_modality_embedding(self, kwargs)
        kwargs.setdefault(STATE_KWARG, NeuralState())
        return base.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    return {"forward": forward}


def _model_forward(base: type) -> dict:
    """``forward`` of ``NT<Model>``: the base signature plus keyword-only ``image_features`` (B, P, image_dim) and
    ``image_mask`` (B,)."""
    spliced = splice_keyword_inputs(base, ("image_features", "image_mask"), "neural-tuning")
    signature, nt_signature, var_keyword = spliced.base, spliced.spliced, spliced.var_keyword

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

    _mit_prefix = "NT"

    @classmethod
    def subclass_attributes(cls, base: type) -> dict:
        """``forward`` with the per-forward state (:func:`_decoder_forward`)."""
        return _decoder_forward(base)

    _method = "neural tuning"
    _pretrained_hint = ("mit.save_neural_adapter", "mit.load_neural_adapter")


@dataclasses.dataclass(frozen=True)
class NeuralUndo:
    """What :func:`unload_neural` needs to give the base model back exactly, recorded by
    :func:`apply_neural_tuning` (plain data: it survives ``copy.deepcopy`` and pickling with the model).

    Attributes:
        requires_grad: ``requires_grad`` of every base parameter, by name, before neural tuning froze them.
        vocab_size: the input embedding's number of rows before the new tokens resized it (None: not resized).
        base_vocab_size: the input embedding's number of rows before neural tuning, resized or not (None: recorded
            by an earlier release, which had one adapter: ``vocab_size``, or the rows it has while attached).
    """

    requires_grad: dict[str, bool]
    vocab_size: int | None
    base_vocab_size: int | None = None


class NeuralTuningModelMixin(MethodModelMixin, Rebuildable):
    """What ``apply_neural_tuning`` adds to the top-level model (mixin of ``NT<ModelClass>``). transformers'
    ``save_pretrained`` / ``from_pretrained`` are refused (:class:`~mit.hf.method_model.RefusesPretrained`):
    :func:`mit.save_neural_adapter` / :func:`mit.load_neural_adapter` round-trip the method."""

    neural_config: NeuralTuningConfig
    nt_new_token_ids: list[int]
    _mit_prefix = "NT"
    _method = "neural tuning"
    _pretrained_hint = ("mit.save_neural_adapter", "mit.load_neural_adapter")

    def neural_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every neural-tuning parameter (see :func:`neural_named_parameters`)."""
        return neural_named_parameters(self)

    @classmethod
    def subclass_attributes(cls, base: type) -> dict:
        """``forward`` with ``image_features`` / ``image_mask`` (:func:`_model_forward`)."""
        return _model_forward(base)

    @property
    def active_adapter(self) -> str:
        """The name of the adapter the model computes with (``"default"`` unless named otherwise)."""
        return active_neural_adapter(self)

    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (transformers' spelling: one adapter is active at a time)."""
        return [active_neural_adapter(self)]

    @property
    def adapter_names(self) -> list[str]:
        """The names of the model's adapters, the active one included, in the order they were added."""
        return list(neural_adapters(self))

    def add_adapter(
        self,
        adapter_config: NeuralTuningConfig,
        adapter_name: str | None = None,
        tokenizer=None,
        *,
        new_token_ids: list[int] | None = None,
    ) -> None:
        """Add a new adapter ``adapter_name`` with its own ``NeuralTuningConfig`` (layers, image dim, new tokens...),
        initialised as :func:`apply_neural_tuning` would, inactive: :meth:`set_adapter` switches to it (see
        :func:`add_neural_adapter`)."""
        if adapter_name is None:
            raise ValueError("adapter_name: expected the new adapter's name, got None")
        add_neural_adapter(self, adapter_config, adapter_name, tokenizer, new_token_ids=new_token_ids)

    def set_adapter(self, adapter_name: str) -> None:
        """Compute with the adapter ``adapter_name`` from now on (see :func:`set_neural_adapter`)."""
        set_neural_adapter(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the inactive adapter ``adapter_name`` (see :func:`delete_neural_adapter`)."""
        delete_neural_adapter(self, adapter_name)

    def unload(self) -> nn.Module:
        """Remove neural tuning from this model, in place, and return the base model (see :func:`unload_neural`)."""
        return unload_neural(self)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it, the model computes the base model (see :func:`disable_neural_adapter`)."""
        return disable_neural_adapter(self)

    def neural_adapter_disabled(self) -> bool:
        """True inside a :meth:`disable_adapter` context."""
        return disabled_depth(self, DISABLED_NAME) > 0

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


def _hook_neurons(layer: nn.Module, index: int, neurons: NeuralTuningLayer) -> None:
    """Attach ``neurons`` to decoder layer ``layer`` (``self_attn.nt_neurons``), with their forward hooks on the
    attention's projections, and switch the layer to its ``NT<Layer>`` class."""
    attention = layer.self_attn
    if all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        hooks = [(attention.q_proj, neurons.add_q), (attention.v_proj, neurons.add_v)]
        if neurons.with_k:
            hooks.append((attention.k_proj, neurons.add_k))
    elif isinstance(getattr(attention, "qkv_proj", None), nn.Linear):
        if attention.qkv_proj.out_features != neurons.q_features + 2 * neurons.kv_features:
            raise ValueError(
                f"qkv_proj of layer {index} has {attention.qkv_proj.out_features} outputs, expected "
                f"Hq*D + 2*Hkv*D = {neurons.q_features + 2 * neurons.kv_features}"
            )
        hooks = [(attention.qkv_proj, neurons.add_qkv)]
    else:
        raise ValueError(
            f"neural tuning needs q_proj/k_proj/v_proj or qkv_proj Linear modules; {type(attention).__name__} of "
            f"layer {index} has neither"
        )
    setattr(attention, NEURONS_NAME, neurons)
    for module, hook in hooks:
        module.register_forward_hook(hook)
    layer.__class__ = method_subclass(NTDecoderLayerMixin, type(layer))


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


def apply_neural_tuning(
    model: nn.Module,
    config: NeuralTuningConfig,
    tokenizer=None,
    *,
    new_token_ids: list[int] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Turn a Hugging Face decoder model of a supported family into a neural-tuning model, in place, and return it.

    ``tokenizer`` is needed when ``config.new_tokens`` is not empty: the tokens are added to it (as special tokens)
    and the model's embedding is resized to hold them. ``new_token_ids`` (used by the adapter loader) gives their ids
    instead of a tokenizer. The adapter is named ``adapter_name`` (more are added with
    ``model.add_adapter(config, name)``)."""
    check_adapter_name(adapter_name)
    if not isinstance(config, NeuralTuningConfig):
        raise ValueError(f"config must be a mit.NeuralTuningConfig, got {type(config).__name__}")
    if isinstance(model, Rebuildable):  # MiT or neural tuning already applied
        raise ValueError(f"apply_neural_tuning needs a plain model; this one is already a {type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_neural_tuning needs a Hugging Face decoder model, got {type(model).__name__}")
    decoder = decoder_of(model)
    family_of(decoder.config)  # validates the model type
    config.resolved_layers(len(decoder.layers))
    if config.new_tokens and new_token_ids is None:
        if tokenizer is None:
            raise ValueError(f"config.new_tokens={config.new_tokens} need a tokenizer to add them to, got None")
        tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
        new_token_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(config.new_tokens))]
    new_token_ids = _resolve_new_token_ids(config, None, new_token_ids)

    rows = model.get_input_embeddings().num_embeddings
    grown = bool(new_token_ids) and rows < new_token_ids[0] + len(new_token_ids)
    undo = NeuralUndo(requires_grad=freeze(model), vocab_size=rows if grown else None, base_vocab_size=rows)
    if grown:  # the new rows are initialised by transformers' resize, as they were before named adapters
        model.resize_token_embeddings(new_token_ids[0] + len(new_token_ids))
        _freeze_vocabulary(model)
    adapter = _build_adapter(model, config, new_token_ids)
    _attach(model, adapter, rows)
    if decoder is not model:
        decoder.__class__ = method_subclass(NTDecoderMixin, type(decoder))
    model.__class__ = method_subclass(NeuralTuningModelMixin, type(model))
    model.__dict__[UNDO_NAME] = undo
    model.__dict__[ADAPTERS_NAME] = {adapter_name: adapter}
    model.__dict__[ACTIVE_NAME] = adapter_name
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
    their place; the ``nt_*`` modules are detached (task heads attached as ``nt_*`` too) and every named adapter goes;
    every ``NT<Class>`` instance gets its own class back; every base parameter's ``requires_grad`` gets its recorded
    value; ``neural_config`` and ``nt_new_token_ids`` go. When the active adapter's new tokens had grown the
    vocabulary, the embeddings are resized back with ``resize_token_embeddings`` (the rows kept are the original ones,
    bit for bit, and ``config.vocab_size`` comes back; an untied LM head is then a new module of the same class, as it
    already was after the resize that grew it). A tokenizer that got the new tokens keeps them. ValueError for a model
    that is not a neural-tuning model, or inside its ``disable_adapter()`` context."""
    if not is_neural_model(model):
        raise ValueError(f"model: unload needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}")
    if model.neural_adapter_disabled():
        raise ValueError("model: unload inside its disable_adapter() context; leave the context first")
    undo: NeuralUndo | None = model.__dict__.get(UNDO_NAME)
    base_vocab = _base_vocab_size(model)
    owners = _method_modules(model)
    for module in list(model.modules()):
        remove_hooks(module, owners, _HOOK_METHODS, pre=False)
        for name in list(module._modules):
            if name.startswith("nt_"):  # the neurons, the image projection, the new-token rows, nt_* task heads
                delattr(module, name)
        if module is not model and isinstance(module, (NTDecoderLayerMixin, NTDecoderMixin)):
            restore_class(module)
    if model.get_input_embeddings().num_embeddings != base_vocab:
        model.resize_token_embeddings(base_vocab)
    if undo is not None:
        restore_requires_grad(model, undo.requires_grad)
    restore_class(model)
    del model.neural_config
    del model.nt_new_token_ids
    for name in (UNDO_NAME, ADAPTERS_NAME, ACTIVE_NAME):
        model.__dict__.pop(name, None)
    return model


@dataclasses.dataclass
class NeuralAdapter:
    """One named adapter of a neural-tuning model: its config, its new tokens' ids and its modules (the same objects
    whether it is attached or not, so its parameters keep their identity across switches).

    Attributes:
        config: its :class:`NeuralTuningConfig` (while active, ``model.neural_config`` is the one in force).
        new_token_ids: its new tokens' ids (while active, ``model.nt_new_token_ids``).
        neurons: decoder layer index -> its :class:`NeuralTuningLayer`.
        image: its :class:`ImageProjection` (None without ``image_dim``).
        tokens: its :class:`NewTokenRows` (None without new tokens).
        grown_rows: while detached, the input embedding's (and an untied LM head's) rows beyond the base vocabulary
            it had grown, given back when it is attached again (None: none).
    """

    config: NeuralTuningConfig
    new_token_ids: list[int]
    neurons: dict[int, NeuralTuningLayer]
    image: ImageProjection | None = None
    tokens: NewTokenRows | None = None
    grown_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def modules(self) -> list[nn.Module]:
        """Its modules: the neurons, then the image projection and the new-token rows when it has them."""
        return [*self.neurons.values(), *(m for m in (self.image, self.tokens) if m is not None)]

    def named_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Its parameters, named as they are in ``model`` while it is the active adapter."""
        decoder = decoder_of(model)
        names = {id(m): n for n, m in model.named_modules()}
        for index, neurons in self.neurons.items():
            yield from neurons.named_parameters(prefix=f"{names[id(decoder.layers[index].self_attn)]}.{NEURONS_NAME}")
        if self.image is not None:
            yield from self.image.named_parameters(prefix=IMAGE_NAME)
        if self.tokens is not None:
            yield from self.tokens.named_parameters(prefix=TOKENS_NAME)


def check_adapter_name(adapter_name: object) -> str:
    """``adapter_name`` when it is a non-empty string without dots, else ValueError naming it."""
    if not (isinstance(adapter_name, str) and adapter_name and "." not in adapter_name):
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    return adapter_name


def _require_neural(model: object, what: str) -> None:
    if not is_neural_model(model):
        raise ValueError(f"model: {what} needs a model returned by mit.apply_neural_tuning, got {type(model).__name__}")


def _attached_adapter(model: nn.Module) -> NeuralAdapter:
    """The adapter attached to ``model`` now (for a model pickled by an earlier release, which records none)."""
    neurons = {}
    for index, layer in enumerate(decoder_of(model).layers):
        found = layer.self_attn._modules.get(NEURONS_NAME)
        if isinstance(found, NeuralTuningLayer):
            neurons[index] = found
    image, tokens = model._modules.get(IMAGE_NAME), model._modules.get(TOKENS_NAME)
    return NeuralAdapter(model.neural_config, list(model.nt_new_token_ids), neurons, image, tokens)


def neural_adapters(model: nn.Module) -> dict[str, NeuralAdapter]:
    """The adapters of a neural-tuning model, by name: the active one attached, the others kept (with their own
    modules and parameters) off the model, outside its module tree and state dict."""
    _require_neural(model, "neural_adapters")
    adapters = model.__dict__.get(ADAPTERS_NAME)
    if adapters is None:  # pickled by an earlier release: one adapter, attached
        adapters = model.__dict__[ADAPTERS_NAME] = {DEFAULT_ADAPTER: _attached_adapter(model)}
        model.__dict__[ACTIVE_NAME] = DEFAULT_ADAPTER
    return adapters


def active_neural_adapter(model: nn.Module) -> str:
    """The name of the adapter a neural-tuning model computes with now."""
    neural_adapters(model)
    return model.__dict__[ACTIVE_NAME]


def _base_vocab_size(model: nn.Module) -> int:
    """The input embedding's number of rows before neural tuning."""
    undo: NeuralUndo | None = model.__dict__.get(UNDO_NAME)
    if undo is not None and undo.base_vocab_size is not None:
        return undo.base_vocab_size
    if undo is not None and undo.vocab_size is not None:
        return undo.vocab_size
    return model.get_input_embeddings().num_embeddings  # an earlier release's model: its one adapter did not grow it


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _resolve_new_token_ids(config: NeuralTuningConfig, tokenizer, new_token_ids: list[int] | None) -> list[int] | None:
    """The new tokens' ids: ``new_token_ids`` checked, or (with a tokenizer) the ids the tokenizer would give them,
    without adding them yet."""
    if config.new_tokens and new_token_ids is None:
        if tokenizer is None:
            raise ValueError(f"config.new_tokens={config.new_tokens} need a tokenizer to add them to, got None")
        new_token_ids = _ids_after_adding(tokenizer, list(config.new_tokens))
    if new_token_ids is not None and len(new_token_ids) != len(config.new_tokens):
        raise ValueError(
            f"new_token_ids must have one id per new token ({len(config.new_tokens)}), got {new_token_ids}"
        )
    _check_contiguous(list(new_token_ids or []))
    return [int(i) for i in new_token_ids] if new_token_ids else None


def _ids_after_adding(tokenizer, tokens: list[str]) -> list[int]:
    """The ids ``tokenizer.add_tokens(tokens)`` would give (a token already known keeps its id; new ones are numbered
    from ``len(tokenizer)`` in order), without adding them."""
    vocab = tokenizer.get_vocab()
    ids, following = [], len(tokenizer)
    for token in tokens:
        if token in vocab:
            ids.append(int(vocab[token]))
        else:
            vocab[token] = following
            ids.append(following)
            following += 1
    return ids


def _add_tokens(tokenizer, config: NeuralTuningConfig, expected: list[int] | None) -> None:
    """Add the config's new tokens to ``tokenizer`` (as special tokens); ValueError unless they get ``expected``."""
    tokenizer.add_tokens(list(config.new_tokens), special_tokens=True)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(config.new_tokens))]
    if ids != expected:
        raise ValueError(f"tokenizer: gave the new tokens {config.new_tokens} ids {ids}, expected {expected}")


def _initial_rows(weight: torch.Tensor, token_ids: list[int], base: int) -> torch.Tensor:
    """The rows ``token_ids`` of ``weight`` (num, hidden); an id beyond its rows gets the mean of the base rows (the
    centre of transformers' mean resizing, the vocabulary is not grown for an inactive adapter)."""
    mean = None
    rows = []
    for i in token_ids:
        if i < weight.shape[0]:
            rows.append(weight[i])
        else:
            if mean is None:
                mean = weight[:base].float().mean(0).to(weight.dtype)
            rows.append(mean)
    return torch.stack(rows).detach()


def _build_adapter(model: nn.Module, config: NeuralTuningConfig, new_token_ids: list[int] | None) -> NeuralAdapter:
    """A new adapter's modules for ``model`` (not attached), initialised as :func:`apply_neural_tuning` does: the
    neurons as configured, the new-token rows from the embedding (and untied LM head) rows at their ids."""
    decoder = decoder_of(model)
    layers = config.resolved_layers(len(decoder.layers))
    neurons = {
        index: _make_neurons(
            decoder.layers[index], index, config, decoder.config, next(decoder.layers[index].self_attn.parameters())
        )
        for index in layers
    }
    image = None
    if config.image_dim is not None:
        image = ImageProjection(config.image_dim, decoder.config.hidden_size, next(decoder.parameters()))
    tokens = None
    if new_token_ids:
        base = _base_vocab_size(model) if is_neural_model(model) else model.get_input_embeddings().num_embeddings
        embedding, head = model.get_input_embeddings(), _output_embeddings(model)
        tied = head is not None and head.weight is embedding.weight
        init_head = None if head is None or tied else _initial_rows(head.weight, new_token_ids, base)
        tokens = NewTokenRows(new_token_ids[0], _initial_rows(embedding.weight, new_token_ids, base), init_head, tied)
    return NeuralAdapter(config, list(new_token_ids or []), neurons, image, tokens)


def _freeze_vocabulary(model: nn.Module) -> None:
    """``requires_grad=False`` on the input embedding and LM head weights (a resize may give a new LM head)."""
    model.get_input_embeddings().weight.requires_grad_(False)
    head = _output_embeddings(model)
    if head is not None:
        head.weight.requires_grad_(False)


def _attach(model: nn.Module, adapter: NeuralAdapter, base_vocab: int) -> None:
    """Put ``adapter``'s modules (and their hooks) on ``model`` (growing the vocabulary when its new tokens need it)
    and make its config and new token ids the model's."""
    decoder = decoder_of(model)
    for index, neurons in adapter.neurons.items():
        _hook_neurons(decoder.layers[index], index, neurons)
    if adapter.image is not None:
        setattr(model, IMAGE_NAME, adapter.image)
    tokens = adapter.tokens
    if tokens is not None:
        end = tokens.first_id + tokens.num
        if model.get_input_embeddings().num_embeddings < end:
            model.resize_token_embeddings(end)
            _freeze_vocabulary(model)
            if adapter.grown_rows is not None:  # the rows it had grown before, bit for bit
                grown_embedding, grown_head = adapter.grown_rows
                with torch.no_grad():
                    model.get_input_embeddings().weight[base_vocab:].copy_(grown_embedding)
                    if grown_head is not None:
                        _output_embeddings(model).weight[base_vocab:].copy_(grown_head)
        adapter.grown_rows = None
        embedding, head = model.get_input_embeddings(), _output_embeddings(model)
        setattr(model, TOKENS_NAME, tokens)
        embedding.register_forward_hook(tokens.embed_hook)
        if tokens.head is not None:
            head.register_forward_hook(tokens.head_hook)
    for module in adapter.modules():  # the modules follow the model's train / eval mode
        module.train(model.training)
    model.neural_config = adapter.config
    model.nt_new_token_ids = list(adapter.new_token_ids)


def _detach(model: nn.Module, adapter: NeuralAdapter, base_vocab: int) -> None:
    """Take ``adapter``'s modules and hooks off ``model`` (other hooks keep their place), give its layers their own
    classes back and the vocabulary its base size (keeping the grown rows in ``adapter.grown_rows``)."""
    owners = adapter.modules()
    for module in list(model.modules()):
        remove_hooks(module, owners, _HOOK_METHODS, pre=False)
    decoder = decoder_of(model)
    for index, neurons in adapter.neurons.items():
        layer = decoder.layers[index]
        if layer.self_attn._modules.get(NEURONS_NAME) is neurons:
            delattr(layer.self_attn, NEURONS_NAME)
        if isinstance(layer, NTDecoderLayerMixin):
            restore_class(layer)
    for name, module in ((IMAGE_NAME, adapter.image), (TOKENS_NAME, adapter.tokens)):
        if module is not None and model._modules.get(name) is module:
            delattr(model, name)
    embedding = model.get_input_embeddings()
    if embedding.num_embeddings > base_vocab:
        head = _output_embeddings(model)
        untied = head is not None and head.weight is not embedding.weight and head.weight.shape[0] > base_vocab
        adapter.grown_rows = (
            embedding.weight[base_vocab:].detach().clone(),
            head.weight[base_vocab:].detach().clone() if untied else None,
        )
        model.resize_token_embeddings(base_vocab)
        _freeze_vocabulary(model)


def plan_neural_adapter(
    model: nn.Module,
    config: NeuralTuningConfig,
    adapter_name: str,
    tokenizer=None,
    new_token_ids: list[int] | None = None,
) -> NeuralAdapter:
    """A new adapter ``adapter_name`` with ``config`` for a neural-tuning model: its modules, initialised as
    :func:`apply_neural_tuning` would; neither the model nor ``tokenizer`` is touched. ValueError naming the argument
    for a name in use or a config that does not fit."""
    _require_neural(model, "add_adapter")
    adapters = neural_adapters(model)
    check_adapter_name(adapter_name)
    if adapter_name in adapters:
        raise ValueError(f"adapter_name {adapter_name!r} is in use; the model's adapters: {sorted(adapters)}")
    if not isinstance(config, NeuralTuningConfig):
        raise ValueError(f"config must be a mit.NeuralTuningConfig, got {type(config).__name__}")
    return _build_adapter(model, config, _resolve_new_token_ids(config, tokenizer, new_token_ids))


def add_neural_adapter(
    model: nn.Module,
    config: NeuralTuningConfig,
    adapter_name: str,
    tokenizer=None,
    *,
    new_token_ids: list[int] | None = None,
    adapter: NeuralAdapter | None = None,
) -> NeuralAdapter:
    """Add a new adapter ``adapter_name`` with ``config`` (its own layers, image dim, new tokens) to a neural-tuning
    model, inactive (as peft's ``add_adapter``): :func:`set_neural_adapter` makes it the one the model computes with.
    Its new tokens are added to ``tokenizer`` now (or given as ``new_token_ids``); the vocabulary grows when the adapter
    is activated. Its modules are ``adapter``'s (from :func:`plan_neural_adapter`, possibly filled since) or new ones.
    Returns it; its ``named_parameters(model)`` are its parameters, named as they are once active."""
    if adapter is None:
        adapter = plan_neural_adapter(model, config, adapter_name, tokenizer, new_token_ids)
    if tokenizer is not None and config.new_tokens:
        ids = _ids_after_adding(tokenizer, list(config.new_tokens))
        if ids != adapter.new_token_ids:  # checked before the tokenizer changes
            raise ValueError(
                f"tokenizer: would give the new tokens {config.new_tokens} ids {ids}, expected {adapter.new_token_ids}"
            )
        _add_tokens(tokenizer, config, adapter.new_token_ids)
    neural_adapters(model)[adapter_name] = adapter
    return adapter


def _unknown(adapter_name: object, adapters: dict) -> ValueError:
    return ValueError(
        f"adapter_name {adapter_name!r} is not an adapter of this model; its adapters: {sorted(adapters)}"
    )


def set_neural_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter a neural-tuning model computes with: the active adapter's modules and hooks
    come off the model (kept, with their parameters, for a later switch back; a vocabulary it grew gets its base size
    back) and the named one's go on (growing the vocabulary when its new tokens need it). ``model.neural_config`` and
    ``model.nt_new_token_ids`` become its own. The parameters of each adapter stay the same objects across switches
    (an optimizer holding them keeps working). Refused inside a ``disable_adapter()`` context."""
    adapters = neural_adapters(model)
    if adapter_name not in adapters:
        raise _unknown(adapter_name, adapters)
    active = model.__dict__[ACTIVE_NAME]
    if adapter_name == active:
        return
    if model.neural_adapter_disabled():
        raise ValueError("model: set_adapter inside its disable_adapter() context; leave the context first")
    current = adapters[active]
    current.config, current.new_token_ids = model.neural_config, list(model.nt_new_token_ids)
    base_vocab = _base_vocab_size(model)
    _detach(model, current, base_vocab)
    _attach(model, adapters[adapter_name], base_vocab)
    model.__dict__[ACTIVE_NAME] = adapter_name


def delete_neural_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the inactive adapter ``adapter_name`` (its modules and parameters go with it; a tokenizer keeps its new
    tokens). The active adapter is not deleted (ValueError): switch to another one first, or :func:`unload_neural`
    the model."""
    adapters = neural_adapters(model)
    if adapter_name not in adapters:
        raise _unknown(adapter_name, adapters)
    if adapter_name == model.__dict__[ACTIVE_NAME]:
        raise ValueError(
            f"adapter_name {adapter_name!r} is the active adapter; set_adapter(...) another one first, or unload() "
            "the model"
        )
    del adapters[adapter_name]


def disable_neural_adapter(model: nn.Module) -> contextlib.AbstractContextManager[None]:
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
    modules = _method_modules(model)

    def switch_off() -> None:
        for module in modules:
            module.disabled = True

    def switch_on() -> None:
        for module in modules:
            module.__dict__.pop("disabled", None)

    return disabled(model, DISABLED_NAME, on_first=switch_off, on_last=switch_on)
