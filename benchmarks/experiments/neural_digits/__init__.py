"""Real-model demonstration of neural tuning: one frozen SmolLM2-135M, one adapter, four tasks on real digit images.

Data: scikit-learn's digits (1797 real 8x8 images), split by image (stratified 80 / 20): training samples are built
from training images only, test samples from test images only. The four tasks, mixed equally in every batch, with no
task id (the prompt selects the task):

  caption         [image] "Caption:" -> " a handwritten seven" (LM loss on the answer; greedy generation must equal
                  the caption exactly; chance 10%)
  draw            "Draw a 7" -> "<GLB>"; the <GLB> token's final hidden state -> an MLP -> 64 pixels (MSE to the
                  digit's mean training image, plus the cross-entropy of a linear digit read-out of the same state);
                  a logistic-regression digit classifier trained independently on the training split's real images
                  scores the generated image (accuracy = predicted digit == 7)
  segment_digit   [canvas] "Segment the 3" -> "<LCL-1>"; the canvas is two different digits side by side (8x16),
                  the mask is the half holding the named digit
  segment_larger  [canvas] "Segment the larger number" -> "<LCL-1>"; the mask is the larger digit's half

A segmentation answer is ``segment_tokens`` of <LCL-1>..<LCL-5> (default 1, --segment-tokens). Segmentation: the mean
of the <LCL-k> tokens' final hidden states FiLM-conditions a small mask decoder over the patch
features; mIoU and P@0.5 (fraction of samples with IoU > 0.5) against the half mask; picking a half at random gives
P@0.5 = 50%, the whole canvas (IoU exactly 0.5) 0%.

Image tokens: no CLIP weights exist offline. Each 8x8 digit (one for captions, two for a canvas) is one patch,
standardised with the training split's per-pixel statistics, through a small patch encoder (an MLP giving
``tokens_per_patch`` tokens of width ``patch_dim``, plus a learned position per patch), first pretrained as a digit
classifier on the training images (:func:`pretrain_encoder`, the analogue of a pretrained CLIP encoder), then trained
on with the adapter; its tokens are neural tuning's ``image_features`` (B, P, patch_dim), projected by the trainable
``nt_image_projection`` and placed after ``<|im_start|>`` and before the prompt.
The <LCL-k> / <GLB> tokens are teacher-forced at evaluation (their positions are known); the LM loss also trains the
model to emit them.

Trainable: the task neurons of the adapted layers, the image projection, the new tokens' rows (SmolLM2 ties its
embedding and LM head: one row set), the patch encoder, the mask decoder and the draw MLP; the LLM stays frozen.

Variants (same data, steps, optimiser, heads and samples of each task per step):
  neural     the main run: sparse task neurons (rho0 = ``sparsity``), one adapter for the four tasks;
  dense      rho0 = 1 (every neuron but the smallest active: ``active_count(r, 1.0) = r - 1``), one adapter;
  per_task   one adapter per task, each trained on its task alone for the same number of steps on the same samples
             of its task per step as a joint adapter (batch_size / 4): the same data and compute in total;
  mit        Multimodal Infusion Tuning on the three tasks with an image (drawing has no image to infuse): the
             per-sample modality embedding is the patch encoder's feature of each digit (a canvas: both, left then
             right; a single digit: its feature and zeros), infused into the paper's layers for this depth (12, 16,
             20, 24, 28, 29); one adapter. MiT has no
             image tokens and no new tokens: a segmentation is conditioned on the last prompt token's final hidden
             state (no LM loss on an answer token); captions are decoded with the modality embedding.

Learning rates: each variant's adapter learning rate (``lr``: neurons or infusion maps; ``head_lr`` stays fixed) is
chosen from ``lrs`` on a validation split of the training images (``validation_fraction``, split by image, stratified),
by the mean of the variant's validation accuracies (caption, draw) and mIoUs (segmentation) at the first seed; the test
metrics of the chosen learning rate are reported (mean over ``seeds``). The test images are never used for a choice.
Runs with another recipe (``RECIPE_FIELDS``: ``--steps``, ``--segment-tokens``, ``--head-lr``, the encoder's
pretraining / freezing) are another setting: summarised, and their learning rate chosen, apart.
P@0.5 counts IoU > 0.5 strictly (the whole canvas has IoU exactly 0.5); ``*_p50_incl`` counts IoU >= 0.5.

Task selectivity (after the neural runs at the chosen learning rate): each unit's mean activation Z^a per task is
measured on training prompts; switching off (zeroing in Z^a, through a pre-hook of ``b_proj``) the units most
selective for task t (mean on t minus mean on the others) should hurt t and not the others; the same number of random
units is the control. Several doses (``selectivity_fractions``) give a dose-response.

Run from a source checkout (the experiment is not part of the installed package; ``mit demo neural-digits`` runs
this script when there is one)::

    python benchmarks/experiments/neural_digits/run.py             # every variant, lr and seed (hours on 2 CPU cores)
    python benchmarks/experiments/neural_digits/run.py --variants mit --lrs 3e-3 --out DIR    # a part of the grid
    python benchmarks/experiments/neural_digits/run.py --from-runs DIR1 DIR2 --out DIR        # merge parts
    python benchmarks/experiments/neural_digits/run.py --variants neural --lrs 3e-3 --seeds 0 \
        --selectivity-fractions 0.02 0.05 0.1 0.2 --out DIR                                   # dose-response
    python benchmarks/experiments/neural_digits/run.py --quick     # the neural run only, few steps (~1 minute)

Modules (one idea each): ``config`` (settings, tasks, variants, recipe), ``tasks`` (the data of the four tasks),
``heads`` (patch encoder, mask decoder, draw head), ``models`` (the tuned LLM of each variant), ``train`` (batches,
losses; the loop and schedule are :mod:`mit.tuning.loop` / :mod:`mit.tuning.optim`), ``evaluate`` (metrics),
``selectivity``, ``selection`` (learning-rate choice, summaries), ``results`` (CSV files, merging), ``plot``, ``grid``
(one run, the grid) and ``run`` (the command line).
"""

from __future__ import annotations

from mit.demo.digits import load_digits_split, pixel_statistics
from mit.tuning.losses import dice_loss
from mit.utils.results import write_csv

from .config import (
    GLB,
    IMAGE_TASKS,
    LCL,
    RECIPE_FIELDS,
    TARGETS,
    TASKS,
    VARIANTS,
    NeuralDigitsConfig,
    quick_config,
    recipe,
)
from .evaluate import EvalSets, digit_classifier, eval_sets, evaluate, greedy_answers, headline, iou
from .grid import run_demo, run_variant
from .heads import DrawHead, MaskDecoder, PatchEncoder, pretrain_encoder
from .models import DigitsModel, MiTDigits, NeuralDigits, build_model
from .results import merge_runs, read_rows, write_results
from .run import main
from .selection import METRIC_KEYS, beyond_edge, choose_lr, setting, setting_label, summarise, validation_score
from .selectivity import selectivity_test, switch_off, unit_activity
from .tasks import canvas_image, caption_text, half_mask, make_canvases, split_validation, variant_groups
from .train import batch_loss, build_rows, task_outputs, train

__all__ = [
    "GLB",
    "IMAGE_TASKS",
    "LCL",
    "METRIC_KEYS",
    "RECIPE_FIELDS",
    "TARGETS",
    "TASKS",
    "VARIANTS",
    "DigitsModel",
    "DrawHead",
    "EvalSets",
    "MaskDecoder",
    "MiTDigits",
    "NeuralDigits",
    "NeuralDigitsConfig",
    "PatchEncoder",
    "batch_loss",
    "beyond_edge",
    "build_model",
    "build_rows",
    "canvas_image",
    "caption_text",
    "choose_lr",
    "dice_loss",
    "digit_classifier",
    "eval_sets",
    "evaluate",
    "greedy_answers",
    "half_mask",
    "headline",
    "iou",
    "load_digits_split",
    "main",
    "make_canvases",
    "merge_runs",
    "pixel_statistics",
    "pretrain_encoder",
    "quick_config",
    "read_rows",
    "recipe",
    "run_demo",
    "run_variant",
    "selectivity_test",
    "setting",
    "setting_label",
    "split_validation",
    "summarise",
    "switch_off",
    "task_outputs",
    "train",
    "unit_activity",
    "validation_score",
    "variant_groups",
    "write_csv",
    "write_results",
]
