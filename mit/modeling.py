"""Drop-in MiT for Hugging Face Llama models: ``apply_mit(model, MiTConfig(...))``.

``apply_mit`` works in place. It freezes every base parameter and turns the chosen decoder layers into MiT layers by
switching their classes to the subclasses below, so base weights keep their state-dict keys:

- :class:`MiTLlamaAttention` (a ``LlamaAttention``) computes the four infusion vectors with one zero-initialised
  ``Linear(modality_dim -> 4 * Hkv * D)`` and holds the per-KV-head gate logit lambda (init 1). It calls
  :func:`mit_kernels.mit_attention` on the post-rotary keys and the raw values, GQA without ``repeat_kv``.
- :class:`MiTLlamaMLP` (a ``LlamaMLP``) scales the SwiGLU activation by ``1 + f`` with ``f`` from a zero-initialised
  ``Linear(modality_dim -> d_ff)``, fused by :func:`mit_kernels.mit_ffn_gate`.
- :class:`MiTLlamaDecoderLayer` hands the modality embedding to its MLP (``LlamaMLP.forward`` takes no kwargs).
- The top-level model becomes :class:`MiTLlamaForCausalLM` / :class:`MiTLlamaModel`, whose ``forward`` names
  ``modality_embedding`` so that ``generate()`` accepts it (and expands it for beam search). It travels to every layer
  through transformers' ``**kwargs``.

Correctness with transformers' machinery:

- KV cache: the cache stores the raw post-rotary K and V (``past_key_values.update`` runs before the infusion); each
  step re-infuses the whole cache inside the kernel's tile load. Decoding is bottom-right causal attention of the new
  queries over the cache, which is the kernel's ``causal=True``.
- Padding: the model keeps its own attention implementation (sdpa, eager, ...), so transformers builds the mask it
  always builds; the MiT layer reads the key padding mask from it (last query row of the 4-D mask, or the 2-D mask
  flash-attention implementations get) and checks that the mask is exactly "causal and padding" before using it.
  Packed sequences or custom 4-D masks are refused with a ValueError instead of being silently misread.
- Positions: MiT's post-rotary ``k_add`` makes attention depend on absolute positions (rotary alone is
  shift-invariant), so with a modality embedding and no ``position_ids`` the top-level forward derives them from the
  2-D padding mask (``cumsum - 1``, as generate() does): a left-padded sample then computes exactly what it computes
  alone.
- A forward without ``modality_embedding`` runs the base modules' own code: exactly the frozen model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    apply_rotary_pos_emb,
)

from mit_kernels import mit_attention, mit_ffn_gate

from .config import MiTConfig

# Names of the MiT parameters inside the modules below (used to select them for saving and counting).
MIT_PARAMETER_NAMES = ("infusion.weight", "infusion.bias", "head_logit", "ffn_infusion.weight", "ffn_infusion.bias")


def _trainable_dtype(reference: torch.Tensor) -> torch.dtype:
    """MiT parameters are kept in fp32 for fp16/bf16 base models (like peft's adapter autocast), else in its dtype."""
    return torch.float32 if reference.dtype in (torch.float16, torch.bfloat16) else reference.dtype


def _zero_linear(in_features: int, out_features: int, like: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, device=like.device, dtype=_trainable_dtype(like))
    if like.device.type != "meta":
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return linear


def _check_modality(modality_embedding: torch.Tensor, batch: int, modality_dim: int) -> None:
    if not isinstance(modality_embedding, torch.Tensor):
        raise ValueError(f"modality_embedding must be a torch.Tensor, got {type(modality_embedding).__name__}")
    if modality_embedding.shape != (batch, modality_dim):
        raise ValueError(
            f"modality_embedding must have shape (batch, modality_dim) = ({batch}, {modality_dim}), "
            f"got {tuple(modality_embedding.shape)}"
        )


def key_padding_mask(attention_mask: torch.Tensor | None, batch: int, lq: int, lk: int) -> torch.Tensor | None:
    """The (B, Lk) bool key padding mask contained in the mask transformers built for the attention layer.

    Accepts None (no padding), a 2-D (B, Lk) mask (flash-attention implementations), or a 4-D (B or 1, 1, Lq, Lk)
    mask, bool (True = attend; sdpa) or additive float (0 = attend; eager). The 4-D mask must equal "bottom-right
    causal AND key padding" on every query row that sees at least one key; otherwise ValueError."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] < lk:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, the layer has {lk}")
        return attention_mask[:, -lk:].bool().expand(batch, lk)
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (lq, lk):
        raise ValueError(
            f"MiT attention expected a (B, 1, {lq}, {lk}) attention mask from transformers, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, 0].expand(batch, lq, lk)
    kv_mask = allowed[:, -1, :]  # the last query sees every key the causal mask allows
    i = torch.arange(lq, device=allowed.device)[:, None]
    j = torch.arange(lk, device=allowed.device)[None, :]
    expected = kv_mask[:, None, :] & (j <= i + (lk - lq))
    rows_with_keys = expected.any(dim=-1, keepdim=True)  # rows that see nothing may have been unmasked by transformers
    if not torch.equal(allowed & rows_with_keys, expected):
        raise ValueError(
            "MiT attention supports bottom-right causal attention with a key padding mask; the attention mask "
            "transformers passed is not of that form (packed sequences or a custom 4-D mask?)"
        )
    return kv_mask


class MiTLlamaAttention(LlamaAttention):
    """LlamaAttention with MiT key/value infusion. Same base state-dict keys; adds ``infusion`` and ``head_logit``."""

    mit_config: MiTConfig
    infusion: nn.Linear
    head_logit: nn.Parameter | None

    def init_mit(self, mit_config: MiTConfig) -> None:
        """Add the zero-initialised infusion map and lambda (called by apply_mit after the class switch)."""
        self.mit_config = mit_config
        hkv = self.config.num_key_value_heads
        like = self.k_proj.weight
        self.infusion = _zero_linear(mit_config.modality_dim, 4 * hkv * self.head_dim, like)
        self.head_logit = None
        if mit_config.head_rescale:
            init = torch.full((hkv,), mit_config.head_logit_init, device=like.device, dtype=_trainable_dtype(like))
            self.head_logit = nn.Parameter(init)

    def infusion_vectors(self, modality_embedding: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """k_mul, k_add, v_mul, v_add, each (B, Hkv, D) in ``dtype``, from the (B, modality_dim) embedding."""
        batch = modality_embedding.shape[0]
        vectors = self.infusion(modality_embedding.to(self.infusion.weight.dtype))
        vectors = vectors.view(batch, 4, self.config.num_key_value_heads, self.head_dim).to(dtype)
        return list(vectors.unbind(dim=1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        modality_embedding = kwargs.pop("modality_embedding", None)
        if modality_embedding is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        batch, lq = hidden_states.shape[:2]
        _check_modality(modality_embedding, batch, self.mit_config.modality_dim)
        hidden_shape = (batch, lq, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:  # the cache holds raw post-rotary K/V; infusion happens on every load
            key, value = past_key_values.update(key, value, self.layer_idx)

        kv_mask = key_padding_mask(attention_mask, batch, lq, key.shape[2])
        head_logit = self.head_logit
        if head_logit is None:  # rescale=False: lambda is unused by the kernel
            head_logit = torch.zeros(self.config.num_key_value_heads, device=query.device)
        out = mit_attention(
            query, key, value, *self.infusion_vectors(modality_embedding, query.dtype), head_logit,
            causal=True, scale=self.scaling, kv_mask=kv_mask, rescale=self.mit_config.head_rescale,
            backend=self.mit_config.backend,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, lq, -1)
        return self.o_proj(out), None


class MiTLlamaMLP(LlamaMLP):
    """LlamaMLP with the FFN infusion: ``down(silu(gate(x)) * up(x) * (1 + f))``, ``f = ffn_infusion(modality)``."""

    mit_config: MiTConfig
    ffn_infusion: nn.Linear

    def init_mit(self, mit_config: MiTConfig) -> None:
        self.mit_config = mit_config
        self.ffn_infusion = _zero_linear(mit_config.modality_dim, self.intermediate_size, self.up_proj.weight)

    def forward(self, x: torch.Tensor, modality_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if modality_embedding is None:
            return super().forward(x)
        _check_modality(modality_embedding, x.shape[0], self.mit_config.modality_dim)
        ffn_mul = self.ffn_infusion(modality_embedding.to(self.ffn_infusion.weight.dtype)).to(x.dtype)
        gated = mit_ffn_gate(self.gate_proj(x), self.up_proj(x), ffn_mul, backend=self.mit_config.backend)
        return self.down_proj(gated)


class MiTLlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer that passes ``modality_embedding`` to its MLP (the base layer calls ``self.mlp(h)``).

    Same computation as ``LlamaDecoderLayer.forward`` of transformers 5.x otherwise."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, MiTLlamaMLP):
            hidden_states = self.mlp(hidden_states, modality_embedding=kwargs.get("modality_embedding"))
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


def padding_aware_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions that start at 0 at each sample's first real token: ``cumsum(mask) - 1`` over the last ``seq_len``
    columns of the (B, past + seq_len) padding mask, as generate() computes them.

    MiT needs them for left-padded batches: its post-rotary ``k_add`` makes attention depend on absolute positions
    (rotary alone is shift-invariant), so with default positions a sample's output would depend on its padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]


def _positions_for(modality_embedding, position_ids, attention_mask, input_ids, inputs_embeds):
    if modality_embedding is None or position_ids is not None or attention_mask is None or attention_mask.dim() != 2:
        return position_ids
    seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    return padding_aware_position_ids(attention_mask, seq_len)


class _MiTModelMixin:
    """What apply_mit adds to the top-level model: the MiT config and the trainable-parameter report."""

    mit_config: MiTConfig

    def mit_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.endswith(MIT_PARAMETER_NAMES)]

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
        trainable, total = count_parameters(self)
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


class MiTLlamaForCausalLM(_MiTModelMixin, LlamaForCausalLM):
    """LlamaForCausalLM whose forward (and so generate) accepts ``modality_embedding`` (B, modality_dim).

    The signature repeats the base one: generate() inspects it (e.g. for ``attention_mask``)."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        modality_embedding: torch.Tensor | None = None,
        **kwargs,
    ):
        if modality_embedding is not None:
            kwargs["modality_embedding"] = modality_embedding
        position_ids = _positions_for(modality_embedding, position_ids, attention_mask, input_ids, inputs_embeds)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


class MiTLlamaModel(_MiTModelMixin, LlamaModel):
    """LlamaModel whose forward accepts ``modality_embedding`` (B, modality_dim)."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        modality_embedding: torch.Tensor | None = None,
        **kwargs,
    ):
        if modality_embedding is not None:
            kwargs["modality_embedding"] = modality_embedding
        position_ids = _positions_for(modality_embedding, position_ids, attention_mask, input_ids, inputs_embeds)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


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


def _decoder(model: nn.Module) -> LlamaModel:
    if isinstance(model, LlamaForCausalLM):
        return model.model
    if isinstance(model, LlamaModel):
        return model
    raise ValueError(
        f"apply_mit supports LlamaForCausalLM and LlamaModel (config.model_type 'llama'), got {type(model).__name__}"
    )


def apply_mit(model: LlamaForCausalLM | LlamaModel, config: MiTConfig) -> LlamaForCausalLM | LlamaModel:
    """Turn a Llama model into an MiT model, in place, and return it.

    Freezes every base parameter; infuses the layers ``config.resolved_layers(num_layers)`` with zero-initialised
    maps (so the model's outputs are unchanged until training moves them); leaves the other layers untouched."""
    if not isinstance(config, MiTConfig):
        raise ValueError(f"config must be a mit.MiTConfig, got {type(config).__name__}")
    decoder = _decoder(model)
    if getattr(decoder.config, "model_type", None) != "llama":
        model_type = getattr(decoder.config, "model_type", None)
        raise ValueError(f"apply_mit needs a Llama model (config.model_type 'llama'), got {model_type!r}")
    if isinstance(model, _MiTModelMixin):
        raise ValueError("apply_mit was already applied to this model")
    if config.infuse_ffn and decoder.config.hidden_act != "silu":
        act = decoder.config.hidden_act
        raise ValueError(f"the FFN infusion fuses SwiGLU and needs hidden_act 'silu', got {act!r}")
    layers = config.resolved_layers(len(decoder.layers))

    for p in model.parameters():
        p.requires_grad_(False)
    for index in layers:
        layer = decoder.layers[index]
        layer.__class__ = MiTLlamaDecoderLayer
        if config.infuse_kv:
            layer.self_attn.__class__ = MiTLlamaAttention
            layer.self_attn.init_mit(config)
        if config.infuse_ffn:
            layer.mlp.__class__ = MiTLlamaMLP
            layer.mlp.init_mit(config)
    model.__class__ = MiTLlamaForCausalLM if isinstance(model, LlamaForCausalLM) else MiTLlamaModel
    model.mit_config = config
    return model
