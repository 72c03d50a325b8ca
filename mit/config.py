"""MiTConfig: which layers are infused and how."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def default_layers(num_layers: int) -> list[int]:
    """The paper's best setting scaled to the model's depth.

    The paper (Table 5) infuses LLaMA-7B's 32 layers at 12, 16, 20, 24, 28 and 31 (0-based): every 4th layer across
    the last 60% of the stack, plus the final layer. For ``N`` layers: ``range(floor(0.4 N), N - 1, max(1,
    round(N / 8)))`` plus ``N - 1``. 32 layers give [12, 16, 20, 24, 28, 31]; SmolLM2's 30 give
    [12, 16, 20, 24, 28, 29]; 4 layers give [1, 2, 3]."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    step = max(1, round(num_layers / 8))
    layers = set(range(math.floor(0.4 * num_layers), num_layers - 1, step))
    layers.add(num_layers - 1)
    return sorted(layers)


@dataclasses.dataclass
class MiTConfig:
    """Configuration of Multimodal Infusion Tuning.

    Attributes:
        modality_dim: size of the per-sample modality embedding (768 for CLIP ViT-L/14-336's image embedding).
        layers: 0-based indices of the decoder layers to infuse; None = :func:`default_layers` of the model's depth.
        infuse_kv: infuse keys and values in the attention (paper's "K/V-Inf").
        infuse_ffn: infuse the feed-forward block (paper's "FF-Inf").
        head_rescale: gate the infusion per KV head by ``sigmoid(lambda + cos(v_t, v_add))`` (paper's "A.R"); off
            means a gate of 1.
        head_logit_init: initial lambda (1.0, as in the authors' code).
        backend: kernel backend passed to mit_kernels ("auto", "reference", "triton", "cpu").
    """

    modality_dim: int
    layers: list[int] | None = None
    infuse_kv: bool = True
    infuse_ffn: bool = True
    head_rescale: bool = True
    head_logit_init: float = 1.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.modality_dim, int) or self.modality_dim < 1:
            raise ValueError(f"modality_dim must be a positive int, got {self.modality_dim!r}")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
        if not (self.infuse_kv or self.infuse_ffn):
            raise ValueError("at least one of infuse_kv and infuse_ffn must be True")

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The layer indices for a model with ``num_layers`` decoder layers (validated)."""
        layers = default_layers(num_layers) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers must be in [0, {num_layers}) for this model, got {bad}")
        return layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MiTConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MiTConfig:
        return cls.from_dict(json.loads(text))
