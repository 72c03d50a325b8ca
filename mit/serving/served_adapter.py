"""An MiT adapter (saved by :func:`mit.save_adapter`) prepared for serving, and the infusion it applies per token.

A server batches the tokens of many requests into one flat sequence (vLLM: ``(num_tokens, heads * head_dim)``), each
token belonging to one request, and each request carrying its own modality embedding or none. Per infused layer:

- keys and values: ``K'_t = k_t + g_t (k_t ⊙ k_mul_r + k_add_r)``, ``V'_t = v_t + g_t (v_t ⊙ v_mul_r + v_add_r)``,
  ``g_t = sigmoid(λ_h + cos(v_t, v_add_r))`` (the arithmetic of :func:`mit_kernels.reference.infusion_gate` /
  ``infuse``, the contract), where ``r`` is the token's request. ``K'`` / ``V'`` depend only on the token's own key /
  value and its request's vectors, so writing them to the paged cache is exact: attention over the cache is then
  plain attention.
- the MLP: the down-projection's input ``silu(gate) * up`` is multiplied by ``1 + f_r``.

The tokens of a request without an embedding are not touched at all, so it is served by the frozen base exactly.
Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import torch
import torch.nn.functional as F

from mit_kernels.reference import COSINE_EPS

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
        return self.requests_vectors(embedding[None])[0]

    @torch.no_grad()
    def requests_vectors(
        self, embeddings: torch.Tensor
    ) -> list[dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]]:
        """:meth:`request_vectors` of each row of ``embeddings`` (R, modality_dim), the maps applied to all rows at
        once (their weights, tens of MB for a 7B base, are read once, not once per request)."""
        out: list[dict] = [{} for _ in range(embeddings.shape[0])]
        for index, layer in self.layers.items():
            kv = ffn = None
            if layer.kv is not None:
                weight = layer.kv.map.weight
                kv = layer.kv.map(embeddings.to(weight)).view(-1, 4, layer.kv.num_kv_heads, layer.kv.head_dim)
            if layer.ffn is not None:
                weight = layer.ffn.map.weight
                ffn = layer.ffn.map(embeddings.to(weight))
            for row, vectors in enumerate(out):
                vectors[index] = (None if kv is None else kv[row], None if ffn is None else ffn[row])
        return out


class BatchVectors:
    """The infusion vectors of a set of requests (those of a batch that carry an embedding), stacked per layer:
    ``kv[index]`` (R, 4, Hkv, D) and ``ffn_scale[index]`` (R, d_ff) = ``1 + f``. A decoding batch keeps its requests
    from step to step, so the model reuses one of these while its set of requests is unchanged."""

    def __init__(
        self, adapter: ServedAdapter, vectors: list[dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]]
    ):
        self.kv: dict[int, torch.Tensor] = {}
        self.ffn_scale: dict[int, torch.Tensor] = {}
        for index, layer in adapter.layers.items():
            if layer.kv is not None:
                self.kv[index] = torch.stack([v[index][0] for v in vectors])
            if layer.ffn is not None:
                self.ffn_scale[index] = 1 + torch.stack([v[index][1] for v in vectors])


class StepInfusion:
    """The infusion of one forward pass over a flat batch of ``num_tokens`` tokens.

    ``token_rows`` (num_tokens,), on the host, gives each token's row in ``batch`` (:class:`BatchVectors`), or -1 for
    a token that is not infused: a token of a request without an embedding, or padding. Those keep their keys, values
    and MLP input bit for bit (they are not computed on at all). Which tokens are infused is worked out on the host
    and the indices copied to ``device`` once per step: no device-to-host synchronisation in the layers."""

    def __init__(
        self, adapter: ServedAdapter, token_rows: torch.Tensor, batch: BatchVectors, device: torch.device | None = None
    ) -> None:
        self.adapter, self.batch = adapter, batch
        device = token_rows.device if device is None else device
        token_rows = token_rows.cpu()
        infused = token_rows >= 0
        if bool(infused.all()):
            self.tokens, self.rows = None, token_rows.to(device)  # every token: computed whole, no scatter
        else:
            tokens = infused.nonzero().squeeze(1)
            self.tokens, self.rows = tokens.to(device), token_rows[tokens].to(device)
        self._logits = {i: layer.kv.gate_logits(device) for i, layer in adapter.layers.items() if layer.kv}

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tokens is None else x[self.tokens]

    def _place(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return new.reshape(x.shape)
        out = x.clone()
        out[self.tokens] = new.reshape(-1, x.shape[-1])
        return out

    def infuse_kv(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``, ``v`` (num_tokens, Hkv * D), rotary applied to k -> K', V' of the same shape and dtype.

        The contract's arithmetic op for op (:func:`mit_kernels.reference.infusion_gate` and ``infuse``, each
        infused token read as a sample of one position): the gate in fp32, the infusion in the input dtype."""
        layer = self.adapter.layers[index].kv
        if self.rows.numel() == 0:
            return k, v
        heads, dim = layer.num_kv_heads, layer.head_dim
        k_mul, k_add, v_mul, v_add = self.batch.kv[index][self.rows].to(k.dtype).unbind(1)  # (n, Hkv, D) each
        kt = self._select(k).view(-1, heads, dim)
        vt = self._select(v).view(-1, heads, dim)
        ct = torch.float64 if v.dtype == torch.float64 else torch.float32
        if layer.rescale:
            cos = F.cosine_similarity(vt.to(ct), v_add.to(ct), dim=-1, eps=COSINE_EPS)
            gate = torch.sigmoid(self._logits[index].to(ct)[None, :] + cos)[..., None].to(k.dtype)
            k_new = kt + gate * (kt * k_mul + k_add)
            v_new = vt + gate * (vt * v_mul + v_add)
        else:  # g = 1
            k_new = kt + (kt * k_mul + k_add)
            v_new = vt + (vt * v_mul + v_add)
        return self._place(k, k_new), self._place(v, v_new)

    def scale_ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input ``x`` (num_tokens, d_ff) -> ``x * (1 + f)`` per infused token."""
        if self.rows.numel() == 0:
            return x
        scale = self.batch.ffn_scale[index][self.rows].to(x.dtype)
        return self._place(x, self._select(x) * scale)
