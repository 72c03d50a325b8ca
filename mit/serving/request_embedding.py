"""A request's modality embedding, as it reaches a vLLM server: a list of numbers under ``mit_embedding`` in the
request's extra arguments (``vllm_xargs`` in the OpenAI-compatible API, ``SamplingParams.extra_args`` offline).

Validation happens once, in the server's front end, before the request is queued: a bad embedding is a ``ValueError``
(HTTP 400 there) naming the field, what was received and what was expected, and never reaches the engine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

EMBEDDING_KEY = "mit_embedding"
FIELD = f"vllm_xargs.{EMBEDDING_KEY}"  # how the field is named in errors (the OpenAI-compatible request's spelling)


def has_embedding(extra_args: Mapping[str, object] | None) -> bool:
    """Whether the request's extra arguments carry an MiT embedding."""
    return extra_args is not None and EMBEDDING_KEY in extra_args


def parse_embedding(extra_args: Mapping[str, object] | None, modality_dim: int | None) -> torch.Tensor | None:
    """The request's embedding as a (modality_dim,) float32 tensor, or None when it carries none.

    ``modality_dim`` is the served adapter's (None: the server serves no adapter, and a request carrying an embedding
    is an error). ValueError naming the field unless the value is a list of ``modality_dim`` finite numbers."""
    if not has_embedding(extra_args):
        return None
    value = extra_args[EMBEDDING_KEY]
    if modality_dim is None:
        raise ValueError(
            f"{FIELD}: this server serves no MiT adapter, so a modality embedding cannot be used (start the server "
            "with MIT_VLLM_ADAPTER=<adapter directory>, or send the request without the field)"
        )
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{FIELD} must be a list of {modality_dim} numbers, got {type(value).__name__}")
    if len(value) != modality_dim:
        raise ValueError(f"{FIELD} must hold {modality_dim} numbers (the adapter's modality_dim), got {len(value)}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"{FIELD}[{i}] must be a number, got {type(x).__name__} {x!r}")
        if not math.isfinite(x):
            raise ValueError(f"{FIELD}[{i}] must be finite, got {x!r}")
    embedding = torch.tensor(value, dtype=torch.float64)
    if not torch.isfinite(embedding.to(torch.float32)).all():
        raise ValueError(f"{FIELD}: a value overflows float32 (|x| > 3.4e38); expected finite float32 values")
    return embedding.to(torch.float32)


def embedding_salt(embedding: torch.Tensor) -> str:
    """A prefix-cache salt derived from the embedding's float32 bytes: requests share cached key/value blocks only
    when their embeddings are bit-identical (the cached keys and values are the infused ones)."""
    digest = hashlib.sha256(embedding.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
    return f"mit-embedding:{digest}"
