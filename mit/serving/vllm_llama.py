"""vLLM's Llama with an MiT adapter: per-request modality infusion in prefill and in every decoding step.

The model is vLLM's own :class:`~vllm.model_executor.models.llama.LlamaForCausalLM`, unchanged; in each infused layer
two forward pre-hooks apply :class:`~mit.serving.served_adapter.StepInfusion` for the tokens of the current batch:

- on the layer's ``attn`` (vLLM's paged attention, called as ``attn(q, k, v)`` after the rotary embedding): the keys
  and values become ``K'`` / ``V'`` before the attention writes them to the paged cache (exact: they depend only on
  the token and its request's vectors);
- on the MLP's ``down_proj``: its input ``silu(gate) * up`` is multiplied by ``1 + f``.

Which request each token belongs to is bound for one forward by :meth:`MiTLlamaForCausalLM.mit_bind_step`, which the
model runner calls (:mod:`mit.serving.vllm_internals`); forwards without a binding (vLLM's profiling and warm-up
runs) and batches whose requests carry no embedding run the frozen base, untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

from . import ADAPTER_ENV
from .request_embedding import parse_embedding
from .served_adapter import BatchVectors, ServedAdapter, StepInfusion
from .vllm_internals import check_serving_config, check_vllm_internals, install_runner_hook

logger = logging.getLogger(__name__)
_UNSEEN = (object(), None)  # a request the model has not seen (its extra_args may be None)


def adapter_directory() -> str:
    """The adapter directory the server serves (``MIT_VLLM_ADAPTER``); ValueError when it is not set."""
    directory = os.environ.get(ADAPTER_ENV)
    if not directory:
        raise ValueError(f"{ADAPTER_ENV} is not set: it must name the MiT adapter directory to serve")
    return directory


class MiTLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` serving the MiT adapter named by ``MIT_VLLM_ADAPTER``.

    The adapter is checked against the served base when the model is built (family, shape, every tensor): a wrong
    adapter stops the server at start-up with a ValueError naming the file."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_serving_config(vllm_config)
        problems = check_vllm_internals()
        if problems:
            logger.warning("mit: this vLLM differs from the supported releases: %s", "; ".join(problems))
        install_runner_hook()  # (this process runs the model: its runner gets each batch's requests bound)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        adapter = ServedAdapter.load(adapter_directory(), vllm_config.model_config.hf_config)
        self.mit_adapter = adapter.to(vllm_config.device_config.device)
        self.mit_adapter_device = torch.device(vllm_config.device_config.device)
        self._mit_step: StepInfusion | None = None
        # the last batch's requests' vectors (held, so compared by identity) and their stacks
        self._mit_batch: tuple[list[dict], BatchVectors] | None = None
        self._mit_requests: dict[str, tuple[object, dict | None]] = {}  # req_id -> (extra_args seen, vectors)
        for index, served in adapter.layers.items():
            layer = self.model.layers[index]
            if served.kv is not None:
                layer.self_attn.attn.register_forward_pre_hook(functools.partial(self._infuse_kv, index))
            if served.ffn is not None:
                layer.mlp.down_proj.register_forward_pre_hook(functools.partial(self._scale_ffn, index))

    def _infuse_kv(self, index: int, module: torch.nn.Module, args: tuple) -> tuple | None:
        step = self._mit_step
        if step is None:
            return None
        q, k, v, *rest = args
        k, v = step.infuse_kv(index, k, v)
        return (q, k, v, *rest)

    def _scale_ffn(self, index: int, module: torch.nn.Module, args: tuple) -> tuple | None:
        step = self._mit_step
        if step is None:
            return None
        x, *rest = args
        return (step.scale_ffn(index, x), *rest)

    def _vectors(self, req_ids: Sequence[str], extra_args: Sequence[Mapping[str, object] | None]) -> list[dict | None]:
        """Each request's infusion vectors (None without an embedding): computed when it is first scheduled, for all
        new requests of the step at once, and kept while it stays in the batch."""
        fresh = [
            i for i, (r, a) in enumerate(zip(req_ids, extra_args)) if self._mit_requests.get(r, _UNSEEN)[0] is not a
        ]
        if fresh:
            dim = self.mit_adapter.modality_dim
            embeddings = [parse_embedding(extra_args[i], dim) for i in fresh]  # (validated by the front end)
            given = [i for i, e in zip(fresh, embeddings) if e is not None]
            computed = (
                self.mit_adapter.requests_vectors(torch.stack([e for e in embeddings if e is not None]))
                if given
                else []
            )
            found = dict(zip(given, computed))
            for i in fresh:
                self._mit_requests[req_ids[i]] = (extra_args[i], found.get(i))
        vectors = [self._mit_requests[r][1] for r in req_ids]
        for stale in self._mit_requests.keys() - set(req_ids):  # finished or preempted (recomputed if it returns)
            del self._mit_requests[stale]
        return vectors

    @contextlib.contextmanager
    def mit_bind_step(
        self,
        req_ids: Sequence[str],
        extra_args: Sequence[Mapping[str, object] | None],
        query_start_loc: np.ndarray,
        num_tokens: int,
    ) -> Iterator[None]:
        """Bind, for one forward over ``num_tokens`` flat tokens, request ``i``'s tokens
        ``query_start_loc[i]:query_start_loc[i + 1]`` to its embedding (``extra_args[i]``); tokens past the last
        request are padding."""
        if len(req_ids) != len(extra_args) or len(query_start_loc) != len(req_ids) + 1:
            raise RuntimeError(
                f"mit_bind_step: {len(req_ids)} requests, {len(extra_args)} argument sets and {len(query_start_loc)} "
                "query offsets do not describe one batch"
            )
        scheduled = int(query_start_loc[-1]) if len(req_ids) else 0
        if scheduled > num_tokens:
            raise RuntimeError(f"mit_bind_step: {scheduled} scheduled tokens in a forward over {num_tokens}")
        vectors = self._vectors(req_ids, extra_args)
        infused = [i for i, v in enumerate(vectors) if v is not None]
        if not infused:
            yield
            return
        members = [vectors[i] for i in infused]
        cached = self._mit_batch
        if cached is None or len(cached[0]) != len(members) or any(a is not b for a, b in zip(cached[0], members)):
            cached = self._mit_batch = (members, BatchVectors(self.mit_adapter, members))
        compact = np.full(len(req_ids), -1, dtype=np.int64)
        compact[infused] = np.arange(len(infused))
        counts = np.diff(np.asarray(query_start_loc, dtype=np.int64))
        rows = np.full(num_tokens, -1, dtype=np.int64)
        rows[:scheduled] = np.repeat(compact, counts)
        self._mit_step = StepInfusion(self.mit_adapter, torch.from_numpy(rows), cached[1], self.mit_adapter_device)
        try:
            yield
        finally:
            self._mit_step = None
