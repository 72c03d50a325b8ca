"""MiT's attention function, registered in transformers' ``AttentionInterface`` around the model's own one.

``apply_mit`` switches ``config._attn_implementation`` from ``base`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``
...) to ``"mit_" + base``, registered here in ``AttentionInterface`` (the function below) and in
``AttentionMaskInterface`` (``base``'s own mask function, so transformers builds exactly the mask it builds for
``base``; a name registered without one silently receives no padding mask). The function gets q, k, v after the
projections, q/k norms, rotary and the cache update, with k/v un-repeated (B, Hkv, Lk, D); the cache therefore holds
raw (un-infused) K/V, and every step re-infuses them on load.

For a layer with a :class:`~mit.integrations.infusion.MiTKVInfusion` and a ``modality_embedding`` in its kwargs (put
there by the MiT model's ``forward``, with the call's :class:`CallMemo`; transformers forwards both through every
decoder layer to this function):

- **fused**: when the attention to compute is exactly "bottom-right causal + key padding" (what transformers asks for
  in training, prefill and decoding of a causal LM), it calls :func:`mit_kernels.mit_attention`, which infuses each
  K/V tile as it loads it;
- **exact fallback** otherwise (logit soft-capping, a sliding window that masks keys, bidirectional attention,
  attention dropout, ``output_attentions``, a mask of another form such as sdpa's top-left ``is_causal`` at a
  static-cache prefill, an implementation whose mask semantics are not known here): it infuses K and V in eager
  PyTorch with the reference functions and calls ``base``'s own function with the same arguments.

Without an embedding, or in a layer without key/value infusion reached anyway, it calls ``base``'s function
unchanged: bit for bit the frozen model. (An MiT model's layers without key/value infusion read ``base`` from their
configs and never come here: :mod:`mit.integrations.attention_config`.)
Packed / varlen batches (``cu_seq_lens_*``) are refused: one embedding per sample cannot be attributed to packed rows.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from mit_kernels import mit_attention
from mit_kernels.backends import attention_function, ffn_gate_function
from mit_kernels.reference import infuse, infusion_gate
from mit_kernels.validation import check_scale

from .infusion import MiTFFNInfusion, MiTKVInfusion, check_modality

PREFIX = "mit_"
KV_INFUSION_NAME = "mit_kv_infusion"  # attribute of the attention module holding its MiTKVInfusion

# How each known base implementation reads its mask; fused dispatch is only decided for these.
_SDPA, _EAGER, _FLASH = "sdpa", "eager", "flash"


def _mask_kind(base: str) -> str | None:
    if base == "sdpa":
        return _SDPA
    if base == "eager":
        return _EAGER
    if base.startswith("flash_attention"):
        return _FLASH
    return None  # flex_attention (BlockMask), user-registered functions: always the exact fallback


_UNKNOWN = object()
# _mask_kind per implementation name, worked out once: a dict lookup per call, no Python frame (functools.cache would
# do the same, but torch.compile warns at every traced call of a cached function)
_MASK_KINDS: dict[str, str | None] = {}


def is_mit_implementation(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def base_implementation(name: str) -> str:
    """``"mit_sdpa"`` -> ``"sdpa"``; a base name is returned as is."""
    return name[len(PREFIX) :] if is_mit_implementation(name) else name


def mit_implementation(base: str | None) -> str:
    """Register (once, process-wide) the MiT attention function and mask function wrapping ``base`` and return their
    name, ``"mit_" + base``. ``base=None`` means ``"eager"`` (transformers' default when nothing is set)."""
    from transformers.masking_utils import AttentionMaskInterface  # transformers is imported when a model is wrapped
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    base = "eager" if base is None else base
    if not isinstance(base, str):
        raise ValueError(
            f"MiT needs one attention implementation name for the whole model, got {base!r} (per-sub-config dicts "
            "are not supported)"
        )
    if is_mit_implementation(base):
        return base
    if base.startswith("paged"):
        raise ValueError(
            f"attention implementation {base!r} (continuous batching, paged KV cache) is not supported by MiT: one "
            "modality embedding per sample cannot be attributed to the rows of a paged batch"
        )
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not registered in transformers' AttentionInterface")
    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention_function(base))
    if name not in AttentionMaskInterface._global_mapping and base in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


def _eager_function(module: torch.nn.Module) -> Callable:
    """The model family's own ``eager_attention_forward`` (Gemma2's applies soft-capping, for instance)."""
    for cls in type(module).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if function is not None:
            return function
    raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling module")


_ATTENTION_FUNCTIONS = None  # transformers' ALL_ATTENTION_FUNCTIONS, imported at the first call (not at import)


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    global _ATTENTION_FUNCTIONS
    if base == "eager":
        return _eager_function(module)
    if _ATTENTION_FUNCTIONS is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _ATTENTION_FUNCTIONS = ALL_ATTENTION_FUNCTIONS
    return _ATTENTION_FUNCTIONS[base]


# --------------------------------------------------------------------------------------------------------------------
# Is the mask exactly "bottom-right causal + key padding"?
# --------------------------------------------------------------------------------------------------------------------


def key_padding_mask(attention_mask: torch.Tensor, batch: int, lq: int, lk: int) -> torch.Tensor | None:
    """The (B, Lk) bool key padding mask of a 4-D mask transformers built, or None when the mask is not exactly of the
    form "bottom-right causal AND key padding" (the exact fallback then runs with the mask as it is).

    ``attention_mask`` is (B or 1, 1, Lq, Lk), bool (True = attend; sdpa) or additive float (0 = attend, the dtype's
    minimum = masked; eager): any other additive value is a bias the fused kernel does not apply, so it is not of the
    form. A row that sees no key in that form may be all masked or, as transformers does to keep softmax finite, all
    unmasked; any other content (a block-diagonal / packed mask, say) is not of the form."""
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (lq, lk) or attention_mask.shape[1] != 1:
        return None
    if lq == 1 and attention_mask.dtype == torch.bool:
        # A decoding step: one query row, which the bottom-right causal mask lets see every key, so every bool mask
        # is of the form and its row is the key padding mask (nothing to read: no host-device sync per step).
        return attention_mask[:, 0, 0, :].expand(batch, lk).clone()
    allowed = allowed_keys(attention_mask)
    if allowed is None:
        return None  # an additive bias
    allowed = allowed[:, 0].expand(batch, lq, lk)
    kv_mask = allowed[:, -1, :].clone()  # the last query row sees every key the causal mask allows (a copy: a view
    # would keep the whole (B, 1, Lq, Lk) mask alive in a forward's CallMemo)
    i = torch.arange(lq, device=allowed.device)[:, None]
    j = torch.arange(lk, device=allowed.device)[None, :]
    expected = kv_mask[:, None, :] & (j <= i + (lk - lq))
    rows_with_keys = expected.any(dim=-1, keepdim=True)
    if not torch.equal(allowed & rows_with_keys, expected):
        return None
    empty_rows = allowed.masked_select(~rows_with_keys).view(-1, lk)  # rows that see no key: all False or all True
    if not bool((empty_rows.all(dim=-1) | ~empty_rows.any(dim=-1)).all()):
        return None
    return kv_mask


def allowed_keys(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """A transformers mask as bool, True = attend: a bool mask as it is, an additive one (0 = attend, the dtype's
    minimum = masked) compared; None for an additive mask holding any other value (a bias)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    if not bool((masked | (attention_mask == 0)).all()):
        return None
    return ~masked


def unseen_key_tail(attention_mask: torch.Tensor, lk: int) -> int | None:
    """``n`` < Lk when keys ``n`` .. Lk - 1 of a (B or 1, 1, Lq, Lk) mask are seen by no query row (rows that see every
    key aside: transformers unmasks a row that would see none, to keep softmax finite), else None.

    At the prefill of a static KV cache the mask spans all the cache's slots; query i (cache position p + i) sees the
    slots up to p + i, so relative to the slots in use (the first p + Lq) the mask is bottom-right causal again. Cut
    to those slots it is "causal + key padding" (:func:`key_padding_mask`), and the slots after them hold nothing."""
    allowed = allowed_keys(attention_mask)
    if allowed is None:
        return None
    rows = allowed[:, 0]  # (B or 1, Lq, Lk)
    partial = rows & ~rows.all(dim=-1, keepdim=True)
    seen = partial.any(dim=1).any(dim=0).nonzero()  # (keys seen by some row that does not see every key, 1)
    if seen.numel() == 0:
        return None
    used = int(seen[-1, 0]) + 1
    return used if used < lk else None


class AttentionPlan(NamedTuple):
    """What an infused layer's fused attention takes besides q, k, v and the mask, for one embedding (a
    :class:`CallMemo`'s plan, made once per ``generate`` call)."""

    embedding: torch.Tensor  # the (B, modality_dim) embedding it was made for (held: identity is the key)
    dtype: torch.dtype  # q's dtype
    scaling: object  # the attention module's ``scaling`` kwarg, as given
    vectors: tuple[torch.Tensor, ...]  # k_mul, k_add, v_mul, v_add (B, Hkv, D) in ``dtype``
    head_logit: torch.Tensor  # (Hkv,)
    function: Callable | None  # the resolved backend's attention function (None until the first fused call)
    scale: float | None  # ``scaling`` checked (None: 1/sqrt(D))


class GatePlan(NamedTuple):
    """What an infused MLP's fused gate takes besides its two projections, for one embedding (made once per
    ``generate`` call, as :class:`AttentionPlan`)."""

    embedding: torch.Tensor
    dtype: torch.dtype  # the MLP input's dtype
    gate_dtype: torch.dtype  # the gate projection's output dtype
    ffn_mul: torch.Tensor  # f (B, d_ff) in ``gate_dtype``
    function: Callable  # the resolved backend's FFN gate function


# Device types whose autocast state torch can be asked for (it raises for others, such as the meta device).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu")

_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_enabled() -> bool:
    """Whether autocast is on for any device type: one probe (torch's own where it has one) instead of one per
    device type and layer."""
    if _any_autocast_enabled is not None:
        return bool(_any_autocast_enabled())
    return any(torch.is_autocast_enabled(device_type) for device_type in AUTOCAST_DEVICE_TYPES)


MEMO_KWARG = "mit_call_memo"  # the kwarg carrying a forward's CallMemo to its decoder layers and attention functions


class CallMemo:
    """What one forward call works out once for all its layers: the mask analyses (:func:`key_padding_mask` results)
    and the fused kernels' functions (the backend resolved, :func:`mit_kernels.backends.attention_function`). Created
    by the MiT model's ``forward`` and passed to every decoder layer and attention function in the kwargs transformers
    forwards, next to ``modality_embedding`` (so a gradient-checkpointing recomputation in backward gets the same
    object). Nothing is shared between calls or threads, so a backend that falls back (a Triton failure) is seen by
    the next call.

    Every layer of one forward gets the same mask tensor (Gemma: one per layer type): each is analysed once, keyed by
    identity (and version), remembering the last few; inference-mode tensors (which carry no version) are analysed on
    every call.

    ``functions``: where the resolved functions are kept; by default a dict of this call's own. The forwards of one
    ``generate`` call share its :class:`~mit.integrations.scope.GenerationCache`'s, so the backends are resolved at
    the first decoding step, not at every one (the fallback of a Triton failure, decided when a kernel runs, is
    unaffected).

    ``plans``: where each infused module's kernel arguments besides the activations and the mask are kept
    (:meth:`attention_plan`, :meth:`gate_plan`); given (the call's ``GenerationCache``'s) only inside ``generate``
    with grad and autocast off, None otherwise: then every layer works them out at every forward."""

    def __init__(
        self,
        size: int = 4,
        checked_embedding: torch.Tensor | None = None,
        functions: dict[tuple, Callable] | None = None,
        plans: dict[torch.nn.Module, tuple] | None = None,
    ) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref, tuple, tuple[bool, torch.Tensor | None]]] = []
        self.functions: dict[tuple, Callable] = {} if functions is None else functions
        self.checked_embedding = checked_embedding
        self.plans = plans

    def attention_plan(
        self, infusion: MiTKVInfusion, modality_embedding: torch.Tensor, query: torch.Tensor, kwargs: dict
    ) -> AttentionPlan:
        """What the fused attention of ``infusion``'s layer takes besides q, k, v and the mask (``kwargs``: the
        attention function's). With ``plans`` (in ``generate``, grad and autocast off) it is kept, and reused while the
        embedding (the same tensor), q's dtype and the module's scaling stay; without, it is made for this call."""
        plans = self.plans
        plan = plans.get(infusion) if plans is not None else None
        scaling = kwargs.get("scaling")
        if (
            plan is None
            or plan.embedding is not modality_embedding
            or plan.dtype is not query.dtype
            or (plan.scaling != scaling)
        ):
            if not self.embedding_checked(modality_embedding, query.shape[0]):
                check_modality(modality_embedding, query.shape[0], infusion.map.in_features)
            plan = AttentionPlan(
                modality_embedding, query.dtype, scaling, tuple(infusion.vectors(modality_embedding, query.dtype)),
                infusion.gate_logits(query.device), None, check_scale(scaling),
            )  # fmt: skip
            if plans is not None:
                plans[infusion] = plan
        return plan

    def fused_attention(self, infusion: MiTKVInfusion, plan: AttentionPlan, query: torch.Tensor) -> Callable:
        """The attention function of ``plan``, resolved at the first fused call (a layer that always falls back never
        asks for a kernel its backend may refuse) and kept in the plan when plans are kept."""
        if plan.function is not None:
            return plan.function
        function = self.attention_function(infusion.backend, query.device, query.shape[-1])
        if self.plans is not None:  # (then the function is the decoding one: attention_function)
            self.plans[infusion] = plan._replace(function=function)
        return function

    def gate_plan(
        self, infusion: MiTFFNInfusion, modality_embedding: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
    ) -> GatePlan:
        """The fused FFN gate's ``f`` (B, d_ff) in the dtype of ``gate`` (the gate projection's output; ``x``: the
        MLP's input) and its function, kept or made for this call as in :meth:`attention_plan`."""
        plans = self.plans
        plan = plans.get(infusion) if plans is not None else None
        if (
            plan is None
            or plan.embedding is not modality_embedding
            or plan.dtype is not x.dtype
            or (plan.gate_dtype is not gate.dtype)
        ):
            if not self.embedding_checked(modality_embedding, x.shape[0]):
                check_modality(modality_embedding, x.shape[0], infusion.map.in_features)
            plan = GatePlan(
                modality_embedding, x.dtype, gate.dtype,
                infusion.multiplier(modality_embedding, x.dtype).to(gate.dtype),
                self.ffn_gate_function(infusion.backend, gate.device),
            )  # fmt: skip
            if plans is not None:
                plans[infusion] = plan
        return plan

    def embedding_checked(self, modality_embedding: torch.Tensor, batch: int) -> bool:
        """Whether the model's forward already validated this very embedding for this batch size (then a layer's
        check would repeat it: every infusion map of one adapter takes the same modality_dim)."""
        checked = self.checked_embedding
        return checked is modality_embedding and checked.shape[0] == batch

    def attention_function(self, backend: str, device: torch.device, head_dim: int) -> Callable:
        """The attention function ``backend`` resolves to on ``device`` for ``head_dim``, resolved once per call: with
        ``plans`` (decoding steps: no grad, no autocast, not compiled), the backend's decoding function
        (:attr:`mit_kernels.backends.Backend.attention_decoding`)."""
        decoding = self.plans is not None
        key = ("attention", backend, device, head_dim, decoding)
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = attention_function(backend, device, head_dim, decoding=decoding)
        return function

    def base_function(self, base: str, module: torch.nn.Module) -> Callable:
        """The base implementation's attention function for ``module`` (a layer without infusion calls it as is),
        looked up once per call."""
        key = ("base", base, type(module))
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = _base_function(base, module)
        return function

    def ffn_gate_function(self, backend: str, device: torch.device) -> Callable:
        """The FFN gate function ``backend`` resolves to on ``device``, resolved once per call (the decoding one with
        ``plans``, as :meth:`attention_function`)."""
        decoding = self.plans is not None
        key = ("ffn_gate", backend, device, decoding)
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = ffn_gate_function(backend, device, decoding=decoding)
        return function

    def lookup(self, mask: torch.Tensor, batch: int, lq: int, lk: int) -> tuple[bool, torch.Tensor | None]:
        """``(is "causal + key padding", its (B, Lk) key padding mask or None)`` for a (B or 1, 1, Lq, Lk) mask."""
        cacheable = not mask.is_inference()
        key = (mask._version, batch, lq, lk) if cacheable else None
        if cacheable:
            for ref, entry_key, result in self.entries:
                if ref() is mask and entry_key == key:
                    return result
        result = analyse_mask(mask, batch, lq, lk)
        if cacheable:
            self.entries = [(weakref.ref(mask), key, result), *self.entries[: self.size - 1]]
        return result


def analyse_mask(mask: torch.Tensor, batch: int, lq: int, lk: int) -> tuple[bool, torch.Tensor | None]:
    """``(fused, kv_mask)`` of a 4-D mask: whether it is exactly "causal + key padding", and its key padding mask
    when it is (:func:`key_padding_mask`): (B, Lk), or (B, n) with n < Lk when keys n .. Lk - 1 are seen by no row and
    the mask cut to the first n keys is of that form (a static KV cache's prefill: :func:`unseen_key_tail`); the
    fused kernel then gets the first n keys."""
    kv_mask = key_padding_mask(mask, batch, lq, lk)
    if kv_mask is None and lq > 1:
        used = unseen_key_tail(mask, lk) if mask.dim() == 4 and mask.shape[-1] == lk else None
        if used is not None:
            kv_mask = key_padding_mask(mask[..., :used], batch, lq, used)
    return kv_mask is not None, kv_mask


def fused_kv_mask(
    base: str,
    module: torch.nn.Module,
    attention_mask: object,
    batch: int,
    lq: int,
    lk: int,
    kwargs: dict,
    analyses: CallMemo | None = None,
) -> tuple[bool, torch.Tensor | None, str, int]:
    """Whether ``base`` would compute bottom-right causal attention with a key padding mask here, over the first
    ``keys`` keys (all Lk but at a static KV cache's prefill, whose empty slots no row sees).

    ``analyses`` is the forward call's memo of 4-D mask analyses (None: the mask is analysed here). Returns
    ``(fused, kv_mask, reason, keys)``: when fused, ``kv_mask`` (B, keys) bool or None (no padding) and the number of
    leading keys the fused kernel gets (the others are seen by no row); else the reason for the exact fallback."""
    kind = _MASK_KINDS.get(base, _UNKNOWN)
    if kind is _UNKNOWN:
        kind = _MASK_KINDS[base] = _mask_kind(base)
    if kind is None:
        return False, None, f"implementation {base!r}", lk
    if kwargs.get("softcap") is not None:
        return False, None, "softcap", lk
    if kwargs.get("dropout"):
        return False, None, "attention dropout", lk
    if kwargs.get("output_attentions"):
        return False, None, "output_attentions", lk
    if kwargs.get("position_bias") is not None:
        return False, None, "position bias", lk
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and kind in (_SDPA, _EAGER):
        if torch.compiler.is_compiling():
            if lq == 1 and attention_mask.dtype == torch.bool:
                # a decoding step's bool mask is taken as it is, nothing read (key_padding_mask): fused in a graph too
                return True, key_padding_mask(attention_mask, batch, lq, lk), "", lk
            # reading the mask's content is data-dependent control flow, which a compiled graph cannot hold: the
            # exact fallback is right for every other mask (docs/integration.md, "torch.compile")
            return False, None, "4-D mask under torch.compile", lk
        # the mask carries any window
        lookup = analyses.lookup if analyses is not None else analyse_mask
        fused, kv_mask = lookup(attention_mask, batch, lq, lk)
        if not fused:
            return False, None, "mask is not causal + key padding", lk
        return True, kv_mask, "", lk if kv_mask is None else kv_mask.shape[1]  # (shorter: analyse_mask)
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return False, None, "mask type", lk
    window = kwargs.get("sliding_window")
    if window is not None and lk >= window:  # the window may mask keys (conservative by one)
        return False, None, "sliding window", lk
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if lq > 1:
        if not causal:
            return False, None, "bidirectional", lk
        if kind == _EAGER and attention_mask is None:
            return False, None, "no mask (eager attends to every key)", lk
        if kind == _SDPA and lq != lk and attention_mask is None:
            if lq < lk:
                # torch's is_causal is top-left aligned: query i sees keys 0 .. i, no row sees keys Lq .. Lk - 1 (a
                # static cache's empty slots at its first prefill, when transformers passes no mask), and over the
                # first Lq keys top-left and bottom-right agree
                return True, None, "", lq
            return False, None, "top-left causal (sdpa is_causal)", lk
    if attention_mask is None:
        return True, None, "", lk
    if kind != _FLASH or attention_mask.shape[-1] != lk:
        return False, None, "2-D mask", lk
    return True, attention_mask.bool(), "", lk


def _fallback(
    base: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    infusion: MiTKVInfusion,
    vectors: tuple[torch.Tensor, ...] | list[torch.Tensor],
    head_logit: torch.Tensor,
    reason: str,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exact fallback: K and V infused in eager PyTorch (the reference functions), then ``base``'s own attention
    function with the same arguments."""
    infusion.record(f"fallback: {reason}")
    k_mul, k_add, v_mul, v_add = vectors
    gate = infusion_gate(value, v_add, head_logit, infusion.rescale)
    key, value = infuse(key, k_mul, k_add, gate), infuse(value, v_mul, v_add, gate)
    return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)


def _make_attention_function(base: str) -> Callable:
    def mit_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        modality_embedding = kwargs.pop("modality_embedding", None)
        analyses: CallMemo | None = kwargs.pop(MEMO_KWARG, None)
        # a child module is in _modules: looked up there, a layer without one costs no AttributeError (nn.Module's
        # __getattr__ raises one, with its message formatted, for every missing name)
        infusion: MiTKVInfusion | None = module._modules.get(KV_INFUSION_NAME)
        if modality_embedding is None or infusion is None:
            # (a layer without infusion comes here only without its config view: attention_config)
            function = _base_function(base, module) if analyses is None else analyses.base_function(base, module)
            return function(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
            raise ValueError(
                "MiT does not support packed (varlen) batches: one modality_embedding per sample cannot be attributed "
                "to packed rows; pad the batch instead"
            )
        batch, _, lq, _ = query.shape
        lk = key.shape[2]
        if (
            (analyses is None or analyses.plans is None)
            and query.device.type in AUTOCAST_DEVICE_TYPES
            and (torch.is_autocast_enabled(query.device.type))
        ):  # (with plans, autocast is off: CallMemo)
            # Under autocast the projections and the rotary embedding can leave q, k and v in different dtypes; the
            # model's own SDPA / eager attention then runs in the autocast dtype (SDPA and matmul are on autocast's
            # lower-precision list), and so does MiT's: infusion vectors included.
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        fused, kv_mask, reason, keys = fused_kv_mask(base, module, attention_mask, batch, lq, lk, kwargs, analyses)
        if keys != lk:  # a static cache's prefill: the slots in use (views), the others are seen by no row
            key, value = key[:, :, :keys], value[:, :, :keys]
        if analyses is not None:  # the arguments are built here (shapes from the model), once per call or generate
            plans = analyses.plans
            plan = plans.get(infusion) if plans is not None else None
            if (
                plan is None
                or plan.embedding is not modality_embedding
                or plan.dtype is not query.dtype
                or (plan.scaling != kwargs.get("scaling"))
            ):  # attention_plan's own check, inline: a decoding step reuses its plan without a call (each Python
                # function run once per infused layer costs ~5 us in a step: docs/decoding-cost.md)
                plan = analyses.attention_plan(infusion, modality_embedding, query, kwargs)
            vectors, head_logit = plan.vectors, plan.head_logit
            if fused:
                infusion.__dict__["last_dispatch"] = "fused"  # infusion.record("fused"), inline (one call less)
                infusion.dispatch_counts["fused"] += 1
                function = plan.function  # (resolved at the first fused call, then kept in the plan)
                if function is None:
                    function = analyses.fused_attention(infusion, plan, query)
                out = function(
                    query, key, value, *vectors, head_logit, causal=True, scale=plan.scale, kv_mask=kv_mask,
                    rescale=infusion.rescale,
                )  # fmt: skip
                return out.transpose(1, 2).contiguous(), None
        else:  # no forward of an MiT model above (a layer called on its own): the public op
            check_modality(modality_embedding, batch, infusion.map.in_features)
            vectors = infusion.vectors(modality_embedding, query.dtype)
            head_logit = infusion.gate_logits(query.device)
            if fused:
                infusion.record("fused")
                out = mit_attention(
                    query, key, value, *vectors, head_logit, causal=True, scale=kwargs.get("scaling"),
                    kv_mask=kv_mask, rescale=infusion.rescale, backend=infusion.backend,
                )  # fmt: skip
                return out.transpose(1, 2).contiguous(), None
        return _fallback(base, module, query, key, value, attention_mask, infusion, vectors, head_logit, reason, kwargs)

    mit_attention_forward.__name__ = f"mit_{base}_attention_forward"
    mit_attention_forward.__qualname__ = mit_attention_forward.__name__
    return mit_attention_forward
