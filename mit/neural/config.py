"""NeuralTuningConfig: which layers get sparse task neurons, how many, and how sparse."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..utils.settings import from_mapping, setting, validate

TARGETS = ("qv", "qkv")
# The reference run's task tokens: segmentation answers (<LCL-1..5>) and the text-to-image embedding token (<GLB>).
_FLAGS = {"dropout": "nt_dropout"}  # to_dict's field names -> flag names where they differ
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

    rank: int = setting(128, help="neural tuning: task neurons per adapted layer (r)", metavar="N", low=1)
    sparsity: float = setting(
        0.4,
        help="neural tuning: fraction of neurons active per token (rho0)",
        metavar="RHO",
        low=0,
        low_open=True,
        high=1,
    )
    alpha: float = setting(
        0.2,
        help="neural tuning: weight of the previous layer's neurons (cross-layer average)",
        metavar="A",
        low=0,
        high=1,
    )
    dropout: float = setting(
        0.0, help="neural tuning: dropout on W_b Z^a", metavar="P", low=0, high=1, high_open=True, flag="nt_dropout"
    )
    start_layer: int | None = setting(
        None, help="neural tuning: first adapted layer (default: half the depth)", metavar="N", low=0
    )
    targets: str = setting("qv", help="neural tuning: projections that get deltas", choices=TARGETS)
    zero_init_b: bool = setting(False, help="neural tuning: zero-initialise W_b (exact base model at step 0)")
    jitter: float = setting(
        0.1, help="neural tuning: relative std of the training-time sparsity draw", metavar="J", low=0
    )
    inference_jitter: bool = setting(False, help="neural tuning: also draw the sparsity at evaluation (reference)")
    image_dim: int | None = setting(None, help="width of the image patch tokens (None: no image projection)", low=1)
    new_tokens: list[str] = setting(
        default_factory=list, help="tokens added to the tokenizer whose rows train, e.g. <LCL-1>,<GLB>", metavar="LIST"
    )

    def __post_init__(self) -> None:
        validate(self)
        if len(set(self.new_tokens)) != len(self.new_tokens):
            raise ValueError(f"new_tokens: expected distinct strings, got {self.new_tokens!r}")

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
        return from_mapping(cls, {_FLAGS.get(k, k): v for k, v in data.items()}, "NeuralTuningConfig")
