"""The experiment's configuration, its tasks and variants, and the recipe fields that make two runs
different experiments."""

from __future__ import annotations

import dataclasses

from mit.neural import TASK_TOKENS

TASKS = ("caption", "draw", "segment_digit", "segment_larger")
IMAGE_TASKS = ("caption", "segment_digit", "segment_larger")  # the tasks MiT can serve: an image to infuse
VARIANTS = ("neural", "dense", "per_task", "mit")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LCL = TASK_TOKENS[:5]
GLB = TASK_TOKENS[5]
TARGETS = {"caption": 0.9, "draw": 0.9, "segment_digit": 0.9, "segment_larger": 0.9}


@dataclasses.dataclass
class NeuralDigitsConfig:
    steps: int = 400
    batch_size: int = 8  # batch_size / 4 samples of each task
    lr: float = 3e-3  # the adapter: task neurons (neural, dense, per_task) or infusion maps (mit)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the adapter learning rates tried per variant (lr is ignored then)
    seeds: tuple[int, ...] = (0, 1, 2)  # every run of the grid at the first seed; the chosen lr at all of them
    extend_edges: int = 2  # while the chosen lr is the smallest / largest tried, try half a decade further (at most)
    head_lr: float = 3e-3  # patch encoder, image projection, new tokens' rows, mask decoder, draw head
    warmup_steps: int = 10
    rank: int = 64
    sparsity: float = 0.4
    alpha: float = 0.2
    start_layer: int = 12  # layers 12..29 adapted
    patch_dim: int = 128
    tokens_per_patch: int = 4
    segment_tokens: int = 1  # how many of <LCL-1..5> a segmentation answer has
    draw_weight: float = 10.0  # weight of the pixel MSE (pixels in [0, 1]: ~0.05 for the mean image)
    draw_target: str = "mean"  # "mean": the digit's mean training image; "sample": a random training image of it
    draw_class_weight: float = 1.0  # weight of the cross-entropy of a linear digit read-out of the <GLB> state
    encoder_pretrain_steps: int = 300  # full-batch Adam steps of the patch encoder as a digit classifier (0: none)
    train_encoder: bool = True  # False: the pretrained patch encoder stays frozen (as the paper's CLIP encoder)
    bos: bool = True  # start every row with <|im_start|>, so the image tokens are not the attention-sink position 0
    variants: tuple[str, ...] = VARIANTS
    selectivity: bool = True
    selectivity_fractions: tuple[float, ...] = (0.05,)  # doses: fractions of all units (layers x rank) switched off
    selectivity_samples: int = 50  # test images / canvases per task for each condition of the selectivity test
    eval_caption: int | None = 150  # test images for the caption metric (None: all)
    eval_segment: int = 200  # test canvases per segmentation task
    seed: int = 0  # of one run (the grid sets it from ``seeds``)
    test_fraction: float = 0.2
    validation_fraction: float = 0.2  # of the training images, held out to choose the learning rate


def quick_config() -> NeuralDigitsConfig:
    """The neural run only: 25 steps after 150 encoder pretraining steps, a small evaluation (10 caption images, 20
    canvases per segmentation task): the CI check of the wiring and that the losses fall (~30 s on 2 cores), not of
    the metrics."""
    return NeuralDigitsConfig(
        steps=25, variants=("neural",), lrs=(3e-3,), seeds=(0,), selectivity=False, encoder_pretrain_steps=150,
        eval_caption=10, eval_segment=20,
    )  # fmt: skip


RECIPE_FIELDS = ("steps", "segment_tokens", "head_lr", "encoder_pretrain_steps", "train_encoder")


def recipe(cfg: NeuralDigitsConfig) -> dict:
    """The fields of ``cfg`` that make a run part of one experiment rather than another (besides its variant)."""
    return {field: getattr(cfg, field) for field in RECIPE_FIELDS}
