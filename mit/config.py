"""MiTConfig: which layers are infused and how."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from mit_kernels.backends import BACKENDS

from .utils.settings import from_mapping, setting, validate


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
    """Configuration of Multimodal Infusion Tuning. Every field is validated by type and range on construction
    (ValueError naming the field); the help text beside each field is what ``mit train --help`` shows.

    Attributes:
        modality_dim: size of the per-sample modality embedding (768 for CLIP ViT-L/14-336's image embedding).
        layers: 0-based indices of the decoder layers to infuse (non-empty, sorted and de-duplicated on construction);
            None = :func:`default_layers` of the model's depth.
        infuse_kv: infuse keys and values in the attention (paper's "K/V-Inf").
        infuse_ffn: infuse the feed-forward block (paper's "FF-Inf").
        head_rescale: gate the infusion per KV head by ``sigmoid(lambda + cos(v_t, v_add))`` (paper's "A.R"); off
            means a gate of 1.
        head_logit_init: initial lambda (1.0, as in the authors' code).
        backend: kernel backend passed to mit_kernels ("auto", "reference", "triton", "cpu", "sdpa").
    """

    modality_dim: int = setting(
        help="size of the modality embedding (msa: the sequence encoder's output; image tasks use CLIP's size)",
        metavar="N",
        low=1,
    )
    layers: list[int] | None = setting(
        None,
        help="0-based LLM layers to infuse, e.g. 12,16,20,24,28,31 (default: the paper's rule for the model's depth)",
        metavar="LIST",
        low=0,
        nonempty=True,
    )
    infuse_kv: bool = setting(True, help="infuse keys and values")
    infuse_ffn: bool = setting(True, help="infuse the feed-forward block")
    head_rescale: bool = setting(True, help="adaptive per-head rescaling (the gate sigmoid(lambda + cos))")
    head_logit_init: float = setting(1.0, help="initial per-head gate logit lambda", metavar="X")
    backend: str = setting("auto", help="kernel backend", choices=BACKENDS)

    def __post_init__(self) -> None:
        validate(self)
        if self.layers is not None:
            self.layers = sorted(set(self.layers))
        if not (self.infuse_kv or self.infuse_ffn):
            raise ValueError("infuse_kv, infuse_ffn: at least one must be True, got both False")

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
        return from_mapping(cls, data, "MiTConfig")

    @classmethod
    def from_json(cls, text: str) -> MiTConfig:
        return cls.from_dict(json.loads(text))
