"""NeuralTuningConfig: which layers get sparse task neurons, how many, and how sparse."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

TARGETS = ("qv", "qkv")
# The reference run's task tokens: segmentation answers (<LCL-1..5>) and the text-to-image embedding token (<GLB>).
TASK_TOKENS = ("<LCL-1>", "<LCL-2>", "<LCL-3>", "<LCL-4>", "<LCL-5>", "<GLB>")


@dataclasses.dataclass
class NeuralTuningConfig:
    """Configuration of neural tuning (arXiv 2408.03001, read from the authors' reference code).

    Attributes:
        rank: r, the number of task neurons per adapted layer (128 in the reference run).
        sparsity: rho0, the fraction of neurons kept active per token (0.4).
        alpha: weight of the previous adapted layer's normalised neurons in the cross-layer average (0.2).
        dropout: dropout on ``W_b Z^a`` (0.0).
        start_layer: first adapted layer (0-based); every layer from it to the last is adapted. None = half the
            depth (16 of LLaMA-2-7B's 32, as in the reference run).
        targets: ``"qv"`` (deltas on queries and values, the reference) or ``"qkv"`` (also keys, with their own
            slice of ``W_b``: the reference code gives K and V the same slice, a bug not reproduced here).
        zero_init_b: zero-initialise ``W_b`` so the tuned model is exactly the base model until training moves it
            (the reference uses PyTorch's default init, which perturbs the model from step 0).
        jitter: relative standard deviation of the training-time sparsity draw, rho ~ N(rho0, (jitter rho0)^2).
        inference_jitter: also draw rho in eval mode (what the reference code does when it evaluates); default off:
            rho = rho0, deterministic.
        image_dim: width of the image patch tokens (1024 for CLIP ViT-L/14); None = no image projection.
        new_tokens: tokens added to the tokenizer whose embedding (and LM-head) rows train, e.g. :data:`TASK_TOKENS`.
    """

    rank: int = 128
    sparsity: float = 0.4
    alpha: float = 0.2
    dropout: float = 0.0
    start_layer: int | None = None
    targets: str = "qv"
    zero_init_b: bool = False
    jitter: float = 0.1
    inference_jitter: bool = False
    image_dim: int | None = None
    new_tokens: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not 0.0 < float(self.sparsity) <= 1.0:
            raise ValueError(f"sparsity (the active fraction rho0) must be in (0, 1], got {self.sparsity!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if float(self.jitter) < 0.0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ValueError(f"start_layer must be None or an int >= 0, got {self.start_layer!r}")
        if self.image_dim is not None and (not isinstance(self.image_dim, int) or self.image_dim < 1):
            raise ValueError(f"image_dim must be None or a positive int, got {self.image_dim!r}")
        self.new_tokens = list(self.new_tokens)
        if len(set(self.new_tokens)) != len(self.new_tokens) or not all(isinstance(t, str) for t in self.new_tokens):
            raise ValueError(f"new_tokens must be distinct strings, got {self.new_tokens!r}")

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The adapted layer indices, ``start_layer .. num_layers - 1`` (validated)."""
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        if not 0 <= start < num_layers:
            raise ValueError(f"start_layer must be in [0, {num_layers}) for this model, got {start}")
        return list(range(start, num_layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuralTuningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NeuralTuningConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)
