"""An MiT adapter (saved by :func:`mit.save_adapter`) prepared for serving, and the infusion it applies per token.

A server batches the tokens of many requests into one flat sequence (vLLM: ``(num_tokens, heads * head_dim)``), each
token belonging to one request, and each request carrying its own modality embedding or none. Per infused layer:

- keys and values: ``K'_t = k_t + g_t (k_t ⊙ k_mul_r + k_add_r)``, ``V'_t = v_t + g_t (v_t ⊙ v_mul_r + v_add_r)``,
  ``g_t = sigmoid(λ_h + cos(v_t, v_add_r))`` (:func:`mit_kernels.reference.infusion_gate` / ``infuse``, the
  contract), where ``r`` is the token's request. ``K'`` / ``V'`` depend only on the token's own key / value and its
  request's vectors, so writing them to the paged cache is exact: attention over the cache is then plain attention.
- the MLP: the down-projection's input ``silu(gate) * up`` is multiplied by ``1 + f_r``.

A request without an embedding gets zero vectors: ``x + g (x ⊙ 0 + 0) = x`` and ``x (1 + 0) = x`` bit for bit, so it is
served by the frozen base exactly (docs/semantics.md, "Identity at initialisation"). Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import torch

from mit_kernels.reference import infuse, infusion_gate

from ..hf.adapter_files import check_adapter_tensors, check_shape, config_shape, read_adapter
from ..integrations.adapter import MIT_SCHEMA
from ..integrations.infusion import MiTFFNInfusion, MiTKVInfusion


@dataclasses.dataclass
class ServedLayer:
    """The adapter's modules of one decoder layer (None where the config infuses nothing)."""

    index: int
    kv: MiTKVInfusion | None
    ffn: MiTFFNInfusion | None


class ServedAdapter:
    """The adapter at ``directory`` for a base with the (transformers) ``hf_config``: its infusion modules per infused
    layer, on the CPU in fp32 until :meth:`to`.

    Loading checks everything :func:`mit.load_adapter` checks (both files' schema; the base's family and shape against
    the saved ones; every tensor's name and shape) and raises a ValueError naming the file otherwise."""

    def __init__(self, directory: pathlib.Path, config, layers: dict[int, ServedLayer], shape: dict) -> None:
        self.directory, self.config, self.layers, self.shape = directory, config, layers, shape

    @classmethod
    def load(cls, directory: str | os.PathLike, hf_config) -> ServedAdapter:
        files = read_adapter(directory, MIT_SCHEMA)
        shape = config_shape(hf_config)
        check_shape(files, shape)
        config = files.config
        like = torch.empty(0, dtype=torch.float32)
        heads, head_dim = int(shape["num_key_value_heads"]), int(shape["head_dim"])
        layers, params = {}, {}
        for index in config.resolved_layers(int(shape["num_hidden_layers"])):
            kv = MiTKVInfusion(config, heads, head_dim, like) if config.infuse_kv else None
            ffn = (
                MiTFFNInfusion(config, int(shape["intermediate_size"]), like, fused=False)
                if config.infuse_ffn
                else None
            )
            layers[index] = ServedLayer(index, kv, ffn)
            for module, name in ((kv, "self_attn.mit_kv_infusion"), (ffn, "mlp.mit_ffn_infusion")):
                if module is not None:
                    params.update(module.named_parameters(prefix=f"model.layers.{index}.{name}"))
        check_adapter_tensors(files, {n: p.shape for n, p in params.items()}, "the MiT parameters of its config")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(files.tensors[n])
        for layer in layers.values():
            for module in (layer.kv, layer.ffn):
                if module is not None:
                    module.requires_grad_(False)
        return cls(pathlib.Path(files.directory), config, layers, shape)

    @property
    def modality_dim(self) -> int:
        return int(self.config.modality_dim)

    def to(self, device: torch.device | str) -> ServedAdapter:
        for layer in self.layers.values():
            for module in (layer.kv, layer.ffn):
                if module is not None:
                    module.to(device)
        return self

    @torch.no_grad()
    def request_vectors(self, embedding: torch.Tensor) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per infused layer: the request's ``(4, Hkv, D)`` k_mul, k_add, v_mul, v_add and its ``(d_ff,)`` f, in the
        maps' dtype (fp32), from its ``(modality_dim,)`` embedding."""
        out = {}
        for index, layer in self.layers.items():
            kv = ffn = None
            if layer.kv is not None:
                weight = layer.kv.map.weight
                kv = layer.kv.map(embedding.to(weight)).view(4, layer.kv.num_kv_heads, layer.kv.head_dim)
            if layer.ffn is not None:
                weight = layer.ffn.map.weight
                ffn = layer.ffn.map(embedding.to(weight))
            out[index] = (kv, ffn)
        return out


class StepInfusion:
    """The infusion of one forward pass over a flat batch of ``num_tokens`` tokens.

    ``token_rows`` (num_tokens,) gives each token's row in ``vectors``; ``vectors`` holds, per request, what
    :meth:`ServedAdapter.request_vectors` gave, or None for a request without an embedding. Tokens of such requests and
    padding tokens (``token_rows`` = -1) keep their keys, values and MLP input bit for bit."""

    def __init__(
        self,
        adapter: ServedAdapter,
        token_rows: torch.Tensor,
        vectors: list[dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None],
    ) -> None:
        self.adapter, self.vectors = adapter, vectors
        rows = len(vectors)
        # rows without an embedding, and padding, read the zero row appended after the requests' rows
        frozen = torch.tensor([v is None for v in vectors] + [True], dtype=torch.bool)
        rows_of_tokens = torch.where(token_rows < 0, rows, token_rows)
        self.token_rows = rows_of_tokens
        self.infused_tokens = ~frozen[rows_of_tokens]
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def _rows(self, index: int, which: int, like: torch.Tensor) -> torch.Tensor:
        """(rows + 1, ...) stacked vectors of layer ``index`` (0: kv, 1: ffn), zero for frozen rows."""
        key = (index, "kv" if which == 0 else "ffn")
        hit = self._cache.get(key)
        if hit is None:
            present = [v[index][which] for v in self.vectors if v is not None]
            zero = torch.zeros_like(present[0])
            hit = torch.stack([zero if v is None else v[index][which] for v in self.vectors] + [zero])
            self._cache[key] = hit = hit.to(like.device)
        return hit

    def infuse_kv(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``, ``v`` (num_tokens, Hkv * D), rotary applied to k -> K', V' of the same shape and dtype."""
        layer = self.adapter.layers[index].kv
        tokens = self.infused_tokens.nonzero().squeeze(1).to(k.device)
        if tokens.numel() == 0:
            return k, v
        heads, dim = layer.num_kv_heads, layer.head_dim
        vec = self._rows(index, 0, k)[self.token_rows.to(k.device)[tokens]].to(k.dtype)  # (n, 4, Hkv, D)
        k_mul, k_add, v_mul, v_add = vec.unbind(1)
        # the contract's functions over (n, Hkv, 1, D): each infused token is a "sample" of one position
        kt = k[tokens].view(-1, heads, 1, dim)
        vt = v[tokens].view(-1, heads, 1, dim)
        logit = layer.gate_logits(k.device)
        gate = infusion_gate(vt, v_add, logit, rescale=layer.rescale)
        k_new, v_new = k.clone(), v.clone()
        k_new[tokens] = infuse(kt, k_mul, k_add, gate).reshape(-1, heads * dim)
        v_new[tokens] = infuse(vt, v_mul, v_add, gate).reshape(-1, heads * dim)
        return k_new, v_new

    def scale_ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input ``x`` (num_tokens, d_ff) -> ``x * (1 + f)`` per token (frozen tokens: x)."""
        tokens = self.infused_tokens.nonzero().squeeze(1).to(x.device)
        if tokens.numel() == 0:
            return x
        f = self._rows(index, 1, x)[self.token_rows.to(x.device)[tokens]].to(x.dtype)
        out = x.clone()
        out[tokens] = x[tokens] * (1 + f)
        return out
