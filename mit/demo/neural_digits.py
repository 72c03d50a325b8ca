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
  segment_digit   [canvas] "Segment the 3" -> "<LCL-1>..<LCL-5>"; the canvas is two different digits side by side
                  (8x16), the mask is the half holding the named digit
  segment_larger  [canvas] "Segment the larger number" -> "<LCL-1>..<LCL-5>"; the mask is the larger digit's half

Segmentation: the mean of the <LCL-k> tokens' final hidden states FiLM-conditions a small mask decoder over the patch
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

    mit demo neural-digits                        # every variant, learning rate and seed (hours on 2 CPU cores)
    mit demo neural-digits --variants mit --lrs 3e-3 --out DIR       # a part of the grid
    mit demo neural-digits --from-runs DIR1 DIR2 --out DIR           # merge parts: summary, CSVs, plot
    mit demo neural-digits --variants neural --lrs 3e-3 --seeds 0 --selectivity-fractions 0.02 0.05 0.1 0.2 --out DIR
    mit demo neural-digits --quick                # the neural run only, few steps (~1 minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import time

import torch
from torch import nn
from tqdm import tqdm

from ..neural import TASK_TOKENS, NeuralTuningConfig, apply_neural_tuning
from ..utils.results import pyplot, write_csv
from .digits import DigitsSplit, load_digits_split, pixel_statistics

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
    """The neural run only, 25 steps, smaller evaluation: the CI check (~3 minutes on 2 cores)."""
    return NeuralDigitsConfig(
        steps=25, variants=("neural",), lrs=(3e-3,), seeds=(0,), selectivity=False, eval_caption=20, eval_segment=40
    )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def caption_text(digit: int) -> str:
    return f"a handwritten {WORDS[digit]}"


def make_canvases(
    split: DigitsSplit, count: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` canvases of two different digits side by side. Returns pixels (N, 2, 64) (left, right), their digits
    (N, 2), and, for "Segment the k", which side is named (N,) (alternating left / right: balanced)."""
    first = torch.randint(0, len(split.labels), (count,), generator=gen)
    second = torch.randint(0, len(split.labels), (count,), generator=gen)
    same = split.labels[first] == split.labels[second]
    while same.any():  # redraw until the two digits differ
        second[same] = torch.randint(0, len(split.labels), (int(same.sum()),), generator=gen)
        same = split.labels[first] == split.labels[second]
    pixels = torch.stack([split.images[first], split.images[second]], dim=1)
    digits = torch.stack([split.labels[first], split.labels[second]], dim=1)
    named = torch.arange(count) % 2
    return pixels, digits, named


def half_mask(side: torch.Tensor) -> torch.Tensor:
    """(N,) side index (0 = left) -> (N, 2, 64) masks: ones on that half of the 8x16 canvas."""
    return nn.functional.one_hot(side, 2).float()[..., None].expand(-1, -1, 64).contiguous()


def canvas_image(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 2, 64) -> (N, 8, 16), left digit then right digit."""
    return pixels.view(-1, 2, 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 16)


# --------------------------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------------------------


class PatchEncoder(nn.Module):
    """(B, n, 64) patches (8x8 digits in [0, 1]) -> tokens (B, n * T, patch_dim) and features (B, n, patch_dim).

    Each patch is standardised with the training images' per-pixel statistics, then an MLP gives T tokens; a learned
    position (per patch slot, at most ``max_patches``) is added to tokens and features."""

    def __init__(
        self, patch_dim: int, tokens_per_patch: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
        max_patches: int = 2, hidden: int = 256,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("pixel_mean", pixel_mean.clone())
        self.register_buffer("pixel_std", pixel_std.clone())
        self.tokens_per_patch, self.patch_dim = tokens_per_patch, patch_dim
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, (tokens_per_patch + 1) * patch_dim)
        )
        self.position = nn.Parameter(0.1 * torch.randn(max_patches, patch_dim))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if patches.dim() != 3 or patches.shape[-1] != 64 or patches.shape[1] > self.position.shape[0]:
            raise ValueError(f"patches must be (B, n <= {self.position.shape[0]}, 64), got {tuple(patches.shape)}")
        batch, n, _ = patches.shape
        out = self.net((patches - self.pixel_mean) / self.pixel_std).view(batch, n, self.tokens_per_patch + 1, -1)
        out = out + self.position[:n, None]
        return out[:, :, :-1].reshape(batch, n * self.tokens_per_patch, -1), out[:, :, -1]


def pretrain_encoder(encoder: PatchEncoder, train_split: DigitsSplit, steps: int, seed: int = 0) -> list[float]:
    """Train ``encoder`` (in place) as a digit classifier on the training split's images: a linear read-out of every
    token and of the feature (B, patch_dim) -> 10 logits, cross-entropy, full-batch Adam (lr 3e-3) for ``steps``;
    the read-outs are dropped. The analogue of the pretrained (CLIP) image encoder of the paper: the image tokens
    carry the digit from the start. Returns the loss per step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    readout = nn.Linear(encoder.patch_dim, 10)
    with torch.no_grad():
        readout.weight.copy_(torch.randn(10, encoder.patch_dim, generator=gen) / encoder.patch_dim**0.5)
        readout.bias.zero_()
    optimiser = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=3e-3)
    images, labels = train_split.images[:, None], train_split.labels
    losses = []
    for _ in range(steps):
        tokens, features = encoder(images)  # (N, T, C), (N, 1, C)
        logits = readout(torch.cat([tokens, features], dim=1))  # (N, T + 1, 10)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


class MaskDecoder(nn.Module):
    """FiLM of the patch features (B, n, C) by a condition (B, hidden), then per-patch pixel logits (B, n, 64)."""

    def __init__(self, hidden_size: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.film = nn.Linear(hidden_size, 2 * patch_dim)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(patch_dim, 64))

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(self.norm(condition)).chunk(2, dim=-1)
        return self.out(features * (1 + gamma[:, None]) + beta[:, None])


class DrawHead(nn.Module):
    """The <GLB> token's final hidden state (B, hidden) -> 64 pixel values (B, 64), and 10 digit logits (B, 10) of a
    linear read-out of the same (normalised) state: a training signal that separates the digits' <GLB> states (the
    pixels alone regressed about one mean image for every prompt); only the pixels are evaluated."""

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 64))
        self.digit = nn.Linear(hidden_size, 10)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.norm(hidden)
        return self.net(normed), self.digit(normed)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss, mean over samples; logits and target (N, ...)."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    return (1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)).mean()


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks (N, ...); an empty union counts as IoU 1."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


class DigitsModel(nn.Module):
    """A frozen SmolLM2 with an adapter (``llm``; :meth:`attach` in the subclass), the demo's patch encoder and task
    heads. Rows are ``[pad, <|im_start|> (cfg.bos), image part, prompt, answer]``, left-padded."""

    adapter_marker = ""  # a substring of the adapter's parameter names (their learning rate is ``lr``)

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> None:
        super().__init__()
        import copy

        self.tokenizer = copy.deepcopy(tokenizer)
        self.llm = copy.deepcopy(base)
        self.attach(cfg)
        hidden = self.llm.config.hidden_size
        self.encoder = PatchEncoder(cfg.patch_dim, cfg.tokens_per_patch, *pixel_stats)
        self.encoder_pretrain_loss: list[float] = []
        self.mask_decoder = MaskDecoder(hidden, cfg.patch_dim)
        self.draw_head = DrawHead(hidden)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.prefix = [tok.bos_token_id] if cfg.bos and tok.bos_token_id is not None else []
        self.caption_prompt = tok("Caption:").input_ids
        self.caption_answers = [[*tok(" " + caption_text(d)).input_ids, self.eos_id] for d in range(10)]
        self.draw_prompts = [tok(f"Draw a {d}").input_ids for d in range(10)]
        self.segment_prompts = [tok(f"Segment the {d}").input_ids for d in range(10)]
        self.larger_prompt = tok("Segment the larger number").input_ids

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        raise NotImplementedError

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, 64) patches -> (each row's image part, stacked (B, ...); the patch features (B, n, patch_dim))."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, head_lr: float) -> list[dict]:
        """AdamW groups: the adapter (names containing ``adapter_marker``) at ``lr``; everything else trainable (patch
        encoder, image projection, new tokens' rows, mask decoder, draw head) at ``head_lr``."""
        adapter, heads = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (adapter if self.adapter_marker in name else heads).append(param)
        return [{"params": adapter, "lr": lr}, {"params": heads, "lr": head_lr}]

    def layout(self, rows: list, image_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Token ids (B, L) with ``image_lengths[b]`` placeholder positions after the prefix, attention mask (B, L),
        padding-aware positions (B, L) and each row's padding length."""
        lead = self.prefix
        lengths = [len(lead) + n + len(p) + len(a) for (_, p, a), n in zip(rows, image_lengths)]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        pads = []
        for b, ((_, prompt, answer), n, total) in enumerate(zip(rows, image_lengths, lengths)):
            pad = width - total
            pads.append(pad)
            ids[b, pad : pad + len(lead)] = torch.tensor(lead, dtype=torch.long)
            ids[b, pad + len(lead) + n :] = torch.tensor(prompt + answer)
            mask[b, pad:] = 1
        return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), pads

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden)


class NeuralDigits(DigitsModel):
    """Neural tuning: the image part of a row is its image tokens (P, patch_dim), projected by the adapter's
    ``nt_image_projection`` into the sequence; answers of segmentation / draw are the new tokens <LCL-k> / <GLB>."""

    adapter_marker = ".nt_neurons."

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, sparsity: float, pixel_stats) -> None:
        self.sparsity = sparsity
        super().__init__(base, tokenizer, cfg, pixel_stats)
        self.segment_answer = self.tokenizer.convert_tokens_to_ids(list(LCL))[: cfg.segment_tokens]
        self.draw_answer = [self.tokenizer.convert_tokens_to_ids(GLB)]

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        config = NeuralTuningConfig(
            rank=cfg.rank, sparsity=self.sparsity, alpha=cfg.alpha, start_layer=cfg.start_layer,
            image_dim=cfg.patch_dim, new_tokens=list(TASK_TOKENS),
        )  # fmt: skip
        apply_neural_tuning(self.llm, config, self.tokenizer)

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(patches)

    def units(self) -> list[nn.Module]:
        """The adapted layers' neurons (``self_attn.nt_neurons``), in layer order."""
        return [m for m in self.llm.modules() if type(m).__name__ == "NeuralTuningLayer"]

    def run(self, rows: list[tuple[torch.Tensor | None, list[int], list[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Rows of (image tokens (P, patch_dim) or None, prompt ids, answer ids) through the tuned LLM. Returns the
        final hidden states (B, L, hidden) and each row's padding length."""
        llm = self.llm
        image_lengths = [0 if im is None else im.shape[0] for im, _, _ in rows]
        ids, mask, positions, pads = self.layout(rows, image_lengths)
        is_image = torch.zeros(ids.shape, dtype=torch.bool)
        for b, (n, pad) in enumerate(zip(image_lengths, pads)):
            is_image[b, pad + len(self.prefix) : pad + len(self.prefix) + n] = True
        embeds = llm.get_input_embeddings()(ids)
        images = [im for im, _, _ in rows if im is not None]
        if images:
            projected = llm.nt_image_projection(torch.cat(images)[None], embeds.dtype)[0]
            embeds = embeds.masked_scatter(is_image[..., None], projected)
        out = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state, pads


class MiTDigits(DigitsModel):
    """Multimodal Infusion Tuning: the image part of a row is one modality embedding (2 * patch_dim,): the patch
    encoder's feature of each digit, left then right (a single digit: its feature, then zeros), infused by
    :func:`mit.apply_mit` into the paper's layers (:func:`mit.config.default_layers`: 12, 16, 20, 24, 28, 29). No
    image tokens, no new tokens: a segmentation answer is empty (the condition is the last prompt token's state);
    drawing has no image and is not served."""

    adapter_marker = ".mit_"

    def __init__(self, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> None:
        super().__init__(base, tokenizer, cfg, pixel_stats)
        self.segment_answer: list[int] = []

    def attach(self, cfg: NeuralDigitsConfig) -> None:
        from ..config import MiTConfig
        from ..integrations import apply_mit

        apply_mit(self.llm, MiTConfig(modality_dim=2 * cfg.patch_dim))  # the paper's layers: 12, 16, ..., 28, 29

    def image_inputs(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, features = self.encoder(patches)  # (B, n, C)
        slots = self.encoder.position.shape[0]
        embedding = nn.functional.pad(features, (0, 0, 0, slots - features.shape[1])).flatten(1)
        return embedding, features

    def run(self, rows: list[tuple[torch.Tensor | None, list[int], list[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Rows of (modality embedding (2 * patch_dim,), prompt ids, answer ids) through the MiT model (its own
        top-level forward with ``modality_embedding``; the final hidden states are read by a forward hook on the
        decoder). Returns the final hidden states (B, L, hidden) and each row's padding length."""
        if any(im is None for im, _, _ in rows):
            raise ValueError("rows: MiT needs a modality embedding for every row (it cannot serve 'draw')")
        ids, mask, positions, pads = self.layout(rows, [0] * len(rows))
        captured = {}
        handle = self.llm.model.register_forward_hook(lambda m, a, out: captured.update(hidden=out.last_hidden_state))
        try:
            self.llm(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                modality_embedding=torch.stack([im for im, _, _ in rows]), logits_to_keep=1,
            )  # fmt: skip
        finally:
            handle.remove()
        return captured["hidden"], pads


def build_model(variant: str, base, tokenizer, cfg: NeuralDigitsConfig, pixel_stats) -> DigitsModel:
    if variant == "mit":
        return MiTDigits(base, tokenizer, cfg, pixel_stats)
    return NeuralDigits(base, tokenizer, cfg, 1.0 if variant == "dense" else cfg.sparsity, pixel_stats)


# --------------------------------------------------------------------------------------------------------------------
# Batches, losses, metrics
# --------------------------------------------------------------------------------------------------------------------


def build_rows(model: DigitsModel, task: str, split: DigitsSplit, count: int, gen: torch.Generator | None,
               index: torch.Tensor | None = None, draw_target: str = "mean"):  # fmt: skip
    """Samples of one task: (rows for :meth:`NeuralDigits.run`, what the loss / metric needs). ``draw_target``:
    "mean" (the digit's mean training image) or "sample" (a random training image of the digit)."""
    if draw_target not in ("mean", "sample"):
        raise ValueError(f"draw_target must be 'mean' or 'sample', got {draw_target!r}")
    if task == "caption":
        pick = index if index is not None else torch.randint(0, len(split.labels), (count,), generator=gen)
        tokens, _ = model.image_inputs(split.images[pick][:, None])
        digits = split.labels[pick]
        rows = [(tokens[i], model.caption_prompt, model.caption_answers[int(d)]) for i, d in enumerate(digits)]
        return rows, {"digits": digits}
    if task == "draw":
        digits = index if index is not None else torch.randint(0, 10, (count,), generator=gen)
        rows = [(None, model.draw_prompts[int(d)], model.draw_answer) for d in digits]
        target = None
        if gen is not None and draw_target == "mean":  # the digit's mean training image
            means = torch.stack([split.images[split.labels == d].mean(0) for d in range(10)])
            target = means[digits]
        elif gen is not None:  # a random training image of each digit
            target = torch.stack(
                [
                    split.images[split.labels == d][
                        torch.randint(0, int((split.labels == d).sum()), (1,), generator=gen)
                    ][0]
                    for d in digits.tolist()
                ]
            )
        return rows, {"digits": digits, "target": target}
    pixels, digits, named = index if index is not None else make_canvases(split, count, gen)
    tokens, features = model.image_inputs(pixels)
    if task == "segment_digit":
        side = named
        prompts = [model.segment_prompts[int(digits[i, s])] for i, s in enumerate(side)]
    else:
        side = (digits[:, 1] > digits[:, 0]).long()
        prompts = [model.larger_prompt] * len(side)
    rows = [(tokens[i], prompts[i], model.segment_answer) for i in range(len(side))]
    return rows, {"features": features, "mask": half_mask(side)}


def task_outputs(model: DigitsModel, tasks: list[str], parts: list[tuple[list, dict]]) -> list[dict]:
    """One forward over the rows of all ``parts``; per part: LM logits / targets of its answer tokens, and the draw
    pixels or mask logits."""
    rows = [r for part, _ in parts for r in part]
    hidden, _ = model.run(rows)
    width = hidden.shape[1]
    outputs, start = [], 0
    for task, (part, extra) in zip(tasks, parts):
        out: dict = dict(extra)
        positions, targets = [], []
        for i, (_, _, answer) in enumerate(part):
            end = width  # the answer occupies the last len(answer) positions; position t predicts token t + 1
            for j, token in enumerate(answer):
                positions.append((start + i, end - len(answer) + j - 1))
                targets.append(token)
        if positions:  # none for MiT's segmentation (its answer is empty)
            b, t = torch.tensor(positions).T
            out["lm_logits"] = model.lm_logits(hidden[b, t])
            out["lm_targets"] = torch.tensor(targets)
        n = len(part)
        rows_hidden = hidden[start : start + n]
        if task == "draw":
            out["pixels"], out["digit_logits"] = model.draw_head(rows_hidden[:, -1])
        elif task.startswith("segment"):
            condition = rows_hidden[:, -max(1, len(model.segment_answer)) :].mean(1)
            out["mask_logits"] = model.mask_decoder(out["features"], condition)
        outputs.append(out)
        start += n
    return outputs


def batch_loss(
    model: DigitsModel, tasks: list[str], outputs: list[dict], draw_weight: float = 1.0, draw_class_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the tasks of the LM loss on their answer tokens plus the task's own loss (draw: ``draw_weight`` times
    the MSE of the pixels plus ``draw_class_weight`` times the cross-entropy of the digit read-out; segmentation:
    Dice + BCE of the mask). Returns the loss and its per-task parts."""
    total, parts = 0.0, {}
    for task, out in zip(tasks, outputs):
        loss = torch.zeros(())
        if "lm_logits" in out:
            loss = nn.functional.cross_entropy(out["lm_logits"], out["lm_targets"])
        if task == "draw":
            loss = loss + draw_weight * nn.functional.mse_loss(out["pixels"], out["target"])
            if draw_class_weight:
                loss = loss + draw_class_weight * nn.functional.cross_entropy(out["digit_logits"], out["digits"])
        elif task.startswith("segment"):
            logits, mask = out["mask_logits"], out["mask"]
            loss = loss + dice_loss(logits, mask) + nn.functional.binary_cross_entropy_with_logits(logits, mask)
        total = total + loss
        parts[task] = loss.item()
    return total, parts


def lr_factor(step: int, cfg: NeuralDigitsConfig) -> float:
    """Linear warm-up over ``cfg.warmup_steps``, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: DigitsModel, tasks: tuple[str, ...], samples_per_task: int, train_split: DigitsSplit,
          cfg: NeuralDigitsConfig, name: str):  # fmt: skip
    """AdamW on the trainable parameters; every batch has ``samples_per_task`` samples of each of ``tasks``. Returns
    per-step loss rows and the training seconds."""
    per_task = samples_per_task
    optimiser = torch.optim.AdamW(model.parameter_groups(cfg.lr, cfg.head_lr), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    model.train()
    curve = []
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=name, unit="step", leave=False)
    for step in bar:
        parts = [build_rows(model, task, train_split, per_task, gen, draw_target=cfg.draw_target) for task in tasks]
        outputs = task_outputs(model, list(tasks), parts)
        loss, per = batch_loss(model, list(tasks), outputs, cfg.draw_weight, cfg.draw_class_weight)
        if not torch.isfinite(loss):
            raise ValueError(f"{name}: non-finite loss {loss.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        curve.append({"run": name, "step": step, "loss": loss.item(), **{f"loss_{t}": v for t, v in per.items()}})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return curve, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalSets:
    caption: torch.Tensor  # test image indices
    canvases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per segmentation task


def eval_sets(test: DigitsSplit, cfg: NeuralDigitsConfig, caption: int | None = None, segment: int | None = None):
    n = len(test.labels)
    count = n if caption is None else min(caption, n)
    gen = torch.Generator().manual_seed(12345)
    segment = segment or cfg.eval_segment
    return EvalSets(
        caption=torch.linspace(0, n - 1, count).round().long(),
        canvases={t: make_canvases(test, segment, gen) for t in ("segment_digit", "segment_larger")},
    )


def digit_classifier(train_split: DigitsSplit):
    """A logistic-regression digit classifier trained only on the training split's real images."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(train_split.images.numpy(), train_split.labels.numpy())


@torch.no_grad()
def greedy_answers(model: DigitsModel, tokens: torch.Tensor, prompt: list[int], max_new: int = 8) -> list[list[int]]:
    """Greedy decoding of (B, P, patch_dim) image tokens + ``prompt`` through :meth:`NeuralDigits.run` (the training
    layout, re-run in full at each step: the answers are a few tokens); each answer stops after its EOS."""
    answers: list[list[int]] = [[] for _ in range(len(tokens))]
    for _ in range(max_new):
        open_rows = [b for b, a in enumerate(answers) if not a or a[-1] != model.eos_id]
        if not open_rows:
            break
        hidden, _ = model.run([(tokens[b], prompt, answers[b]) for b in open_rows])
        for b, token in zip(open_rows, model.lm_logits(hidden[:, -1]).argmax(-1).tolist()):
            answers[b].append(token)
    return answers


@torch.no_grad()
def evaluate(model: DigitsModel, tasks: tuple[str, ...], test: DigitsSplit, sets: EvalSets, classifier,
             batch: int = 50) -> dict[str, float]:  # fmt: skip
    """The metrics of ``tasks``: caption exact-match accuracy (greedy decoding with the image tokens), draw accuracy
    (classifier on the generated images of "Draw a 0" .. "Draw a 9"), segmentation mIoU and P@0.5."""
    model.eval()
    out: dict[str, float] = {}
    if "caption" in tasks:
        correct = 0
        for s in range(0, len(sets.caption), batch):
            pick = sets.caption[s : s + batch]
            tokens, _ = model.image_inputs(test.images[pick][:, None])
            texts = model.tokenizer.batch_decode(greedy_answers(model, tokens, model.caption_prompt),
                                                 skip_special_tokens=True)  # fmt: skip
            correct += sum(t.strip() == caption_text(int(d)) for t, d in zip(texts, test.labels[pick]))
        out["caption_accuracy"] = correct / len(sets.caption)
    if "draw" in tasks:
        rows, extra = build_rows(model, "draw", test, 10, None, index=torch.arange(10))
        pixels = task_outputs(model, ["draw"], [(rows, extra)])[0]["pixels"].clamp(0, 1)
        out["draw_accuracy"] = float((classifier.predict(pixels.numpy()) == extra["digits"].numpy()).mean())
    for task in ("segment_digit", "segment_larger"):
        if task not in tasks:
            continue
        pixels, digits, named = sets.canvases[task]
        ious = []
        for s in range(0, len(named), batch):
            sl = slice(s, s + batch)
            part = build_rows(model, task, test, 0, None, index=(pixels[sl], digits[sl], named[sl]))
            result = task_outputs(model, [task], [part])[0]
            ious.append(iou(result["mask_logits"] > 0, result["mask"]))
        ious = torch.cat(ious)
        out[f"{task}_miou"] = ious.mean().item()
        # IoU > 0.5, strictly: the two halves are 64 pixels each, so the whole canvas (or any mask covering the named
        # half and as much of the other) has IoU exactly 0.5 and must not count as a hit
        out[f"{task}_p50"] = (ious > 0.5).float().mean().item()
        out[f"{task}_p50_incl"] = (ious >= 0.5).float().mean().item()  # IoU >= 0.5, which counts the whole canvas
    model.train()
    return out


def headline(metrics: dict[str, float], task: str) -> float:
    """The metric with the target: accuracy for caption / draw, P@0.5 for segmentation."""
    return metrics[f"{task}_accuracy"] if task in ("caption", "draw") else metrics[f"{task}_p50"]


# --------------------------------------------------------------------------------------------------------------------
# Task selectivity
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def unit_activity(model: NeuralDigits, train_split: DigitsSplit, count: int = 40) -> torch.Tensor:
    """Mean Z^a per task and unit, (tasks, layers, r), on ``count`` training samples per task (one task per forward:
    no padding within a forward)."""
    layers = model.units()
    sums = torch.zeros(len(TASKS), len(layers), layers[0].rank)
    current = {"task": 0}

    def record(i):
        def hook(module, args):
            sums[current["task"], i] += args[0].flatten(0, -2).mean(0)

        return hook

    handles = [layer.b_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    model.eval()
    gen = torch.Generator().manual_seed(777)
    try:
        for t, task in enumerate(TASKS):
            current["task"] = t
            task_outputs(model, [task], [build_rows(model, task, train_split, count, gen)])
    finally:
        for h in handles:
            h.remove()
        model.train()
    return sums


def switch_off(model: NeuralDigits, off: torch.Tensor) -> list:
    """Zero the units where ``off`` (layers, r) is True in every Z^a (pre-hooks of ``b_proj``); returns the handles."""
    keep = (~off).float()
    return [layer.b_proj.register_forward_pre_hook(lambda m, a, k=keep[i]: (a[0] * k,))
            for i, layer in enumerate(model.units())]  # fmt: skip


def selectivity_test(model, train_split, test, classifier, cfg: NeuralDigitsConfig) -> list[dict]:
    """Metrics with nothing off and, for each dose in ``cfg.selectivity_fractions``, with that fraction of the units
    off: the units most selective for each task, and as many random units (two draws). Rows: condition, units_off and
    the headline metric per task (``cfg.selectivity_samples`` test images or canvases per task)."""
    fractions = cfg.selectivity_fractions
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"selectivity_fractions must be fractions in (0, 1), got {fractions}")
    activity = unit_activity(model, train_split)
    total = activity[0].numel()
    sets = eval_sets(test, cfg, caption=cfg.selectivity_samples, segment=cfg.selectivity_samples)
    rows = []

    def measure(condition: str, off: torch.Tensor | None):
        handles = switch_off(model, off) if off is not None else []
        try:
            metrics = evaluate(model, TASKS, test, sets, classifier)
        finally:
            for h in handles:
                h.remove()
        rows.append({"condition": condition, "units_off": 0 if off is None else int(off.sum()),
                     **{t: headline(metrics, t) for t in TASKS}})  # fmt: skip
        tqdm.write(f"selectivity {condition:24s}: " + ", ".join(f"{t} {rows[-1][t]:.2f}" for t in TASKS))

    # selectivity of each unit for task t: its mean activity on t minus its mean on the other tasks, (tasks, total)
    scores = torch.stack([(activity[t] - torch.cat([activity[:t], activity[t + 1 :]]).mean(0)).flatten()
                          for t in range(len(TASKS))])  # fmt: skip
    gen = torch.Generator().manual_seed(4242)
    orders = [torch.randperm(total, generator=gen) for _ in range(2)]  # cut shorter per dose: nested random sets

    def units(indices: torch.Tensor) -> torch.Tensor:  # flat unit indices -> the (layers, r) mask
        off = torch.zeros(total, dtype=torch.bool)
        off[indices] = True
        return off.view_as(activity[0])

    measure("none", None)
    for fraction in fractions:
        m = max(1, round(fraction * total))
        for task, score in zip(TASKS, scores):
            measure(f"selective_{task}", units(score.topk(m).indices))
        for r, order in enumerate(orders):
            measure(f"random_{r}", units(order[:m]))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Runs and results
# --------------------------------------------------------------------------------------------------------------------


def split_validation(train_split: DigitsSplit, fraction: float, seed: int = 0) -> tuple[DigitsSplit, DigitsSplit]:
    """Stratified split of the training images, by image, into (training, validation): learning rates are chosen on
    the validation images; the test images are never used for a choice."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    from sklearn.model_selection import train_test_split

    keep, held = train_test_split(
        range(len(train_split.labels)), test_size=fraction, random_state=seed, stratify=train_split.labels.numpy()
    )
    keep, held = torch.tensor(keep), torch.tensor(held)
    part = lambda i: DigitsSplit(train_split.images[i], train_split.labels[i], train_split.index[i])  # noqa: E731
    return part(keep), part(held)


def variant_groups(variant: str) -> list[tuple[str, ...]]:
    """The task groups of ``variant``, one adapter each. Every adapter sees ``batch_size / 4`` samples of each of its
    tasks per step, so every variant trains on the same samples of a task (MiT: of its three tasks)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "per_task":
        return [(t,) for t in TASKS]
    return [IMAGE_TASKS if variant == "mit" else TASKS]


def validation_score(metrics: dict[str, float], tasks: tuple[str, ...] | None = None) -> float:
    """What a learning rate is chosen by: the mean over ``tasks`` (None: every task with validation metrics in
    ``metrics``) of the validation accuracy (caption, draw) or mIoU (segmentation: unlike P@0.5 it has no threshold
    a degenerate mask can sit on; a random half or the whole canvas scores 0.5)."""
    if tasks is None:
        tasks = tuple(t for t in TASKS if f"val_{t}_accuracy" in metrics or f"val_{t}_miou" in metrics)
    keys = [f"val_{t}_accuracy" if t in ("caption", "draw") else f"val_{t}_miou" for t in tasks]
    return statistics.fmean(float(metrics[k]) for k in keys)


def run_variant(variant: str, base, tokenizer, data, classifier, cfg: NeuralDigitsConfig):
    """Train ``variant`` at ``cfg.lr`` and ``cfg.seed``; evaluate on the validation and the test images. ``data`` is
    (training, validation, test) splits. Returns (metrics row, curve rows, the trained model of the last group)."""
    train_split, val, test = data
    sets = {name: eval_sets(split, cfg, caption=cfg.eval_caption) for name, split in (("val", val), ("test", test))}
    stats = pixel_statistics(train_split.images)
    groups = variant_groups(variant)
    if cfg.batch_size % len(TASKS):
        raise ValueError(f"batch_size must be a multiple of the {len(TASKS)} tasks, got {cfg.batch_size}")
    metrics, curves, seconds, params, served = {}, [], 0.0, 0, []
    model = None
    run_name = f"{variant} lr={cfg.lr:g} seed={cfg.seed}"
    for tasks in groups:
        torch.manual_seed(cfg.seed)
        model = build_model(variant, base, tokenizer, cfg, stats)
        model.encoder_pretrain_loss = pretrain_encoder(model.encoder, train_split, cfg.encoder_pretrain_steps, cfg.seed)
        model.encoder.requires_grad_(cfg.train_encoder)
        name = run_name if len(groups) == 1 else f"{run_name} task={tasks[0]}"
        curve, sec = train(model, tasks, cfg.batch_size // len(TASKS), train_split, cfg, name)
        curves += [{"variant": variant, **recipe(cfg), "lr": cfg.lr, "seed": cfg.seed, **c} for c in curve]
        seconds += sec
        params += sum(p.numel() for p in model.trainable_parameters())
        metrics.update({f"val_{k}": v for k, v in evaluate(model, tasks, val, sets["val"], classifier).items()})
        metrics.update(evaluate(model, tasks, test, sets["test"], classifier))
        served += tasks
    row = {"variant": variant, "lr": cfg.lr, "seed": cfg.seed, **recipe(cfg),
           "sparsity": 1.0 if variant == "dense" else (cfg.sparsity if variant != "mit" else float("nan")),
           "val_score": validation_score(metrics, tuple(served)), **metrics,
           "trainable_params": params, "train_seconds": seconds}  # fmt: skip
    tqdm.write(f"{run_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({seconds:.0f} s)")
    return row, curves, model


def run_demo(cfg: NeuralDigitsConfig, out_dir: pathlib.Path, base=None, tokenizer=None, stem: str = "neural_digits"):
    """Run every variant at every learning rate of ``cfg.lrs`` (first seed; while the best is at an edge, up to
    ``cfg.extend_edges`` more, half a decade further each), then each variant's chosen learning rate at the other seeds
    (and the selectivity test on the neural runs at the chosen learning rate); write the results
    (:func:`write_results`).
    Returns (summary rows, run rows, selectivity rows)."""
    from ..models import load_smollm2

    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {sorted(unknown)}")
    if not cfg.lrs or not cfg.seeds:
        raise ValueError(f"lrs and seeds must be non-empty, got lrs={cfg.lrs}, seeds={cfg.seeds}")
    if base is None:
        base, tokenizer = load_smollm2()
    train_split, test = load_digits_split(cfg.test_fraction)
    train_split, val = split_validation(train_split, cfg.validation_fraction)
    data = (train_split, val, test)
    classifier = digit_classifier(train_split)
    runs, curves, selectivity = [], [], []

    def one(variant: str, lr: float, seed: int, keep: bool):
        """Train and evaluate one run; return (the trained model if ``keep`` else None, its config)."""
        run_cfg = dataclasses.replace(cfg, lr=lr, seed=seed)
        row, curve, model = run_variant(variant, base, tokenizer, data, classifier, run_cfg)
        runs.append(row)
        curves.extend(curve)
        write_results(runs, curves, selectivity, out_dir, stem)  # after every run: an interrupted grid keeps its runs
        return (model if keep else None), run_cfg

    def select(model, run_cfg) -> None:  # the selectivity test, on neural runs at the chosen learning rate
        rows = selectivity_test(model, train_split, test, classifier, run_cfg)
        selectivity.extend({**recipe(run_cfg), "lr": run_cfg.lr, "seed": run_cfg.seed, **r} for r in rows)

    for variant in cfg.variants:
        tested = variant == "neural" and cfg.selectivity
        # each first-seed run's model is kept until the choice only when the selectivity test will need it
        first = {lr: one(variant, lr, cfg.seeds[0], keep=tested) for lr in cfg.lrs}
        chosen = choose_lr([r for r in runs if r["variant"] == variant], cfg.seeds[0])
        for _ in range(cfg.extend_edges if len(cfg.lrs) > 1 else 0):
            further = beyond_edge(chosen, list(first))
            if further is None:
                break
            first[further] = one(variant, further, cfg.seeds[0], keep=tested)
            chosen = choose_lr([r for r in runs if r["variant"] == variant], cfg.seeds[0])
        if tested:
            select(*first[chosen])
        del first
        for seed in cfg.seeds[1:]:
            model, run_cfg = one(variant, chosen, seed, keep=tested)
            if tested:
                select(model, run_cfg)
            del model
    summary = write_results(runs, curves, selectivity, out_dir, stem)
    return summary, runs, selectivity


def beyond_edge(chosen: float, tried: list[float]) -> float | None:
    """Half a decade beyond ``chosen`` on the 1, 3, 10, 30 ... grid when it is the smallest (or largest) of ``tried``,
    else None: a choice at the edge of a sweep says the best may lie outside it."""
    if chosen == min(tried):
        further = chosen / 10**0.5
    elif chosen == max(tried):
        further = chosen * 10**0.5
    else:
        return None
    exponent = math.floor(math.log10(further))
    mantissa = further / 10**exponent
    return float(f"{(1 if mantissa < 1.7 else 3 if mantissa < 5.5 else 10) * 10**exponent:.0e}")


def choose_lr(runs: list[dict], seed: int) -> float:
    """The learning rate of the run with the best :func:`validation_score` among ``runs`` at ``seed`` (ties: the
    smaller lr)."""
    candidates = sorted((r for r in runs if int(r["seed"]) == seed), key=lambda r: (-validation_score(r), r["lr"]))
    if not candidates:
        raise ValueError(f"runs: no run at seed {seed} to choose a learning rate from")
    return float(candidates[0]["lr"])


RECIPE_FIELDS = ("steps", "segment_tokens", "head_lr", "encoder_pretrain_steps", "train_encoder")


def recipe(cfg: NeuralDigitsConfig) -> dict:
    """The fields of ``cfg`` that make a run part of one experiment rather than another (besides its variant)."""
    return {field: getattr(cfg, field) for field in RECIPE_FIELDS}


_RECIPE_DEFAULTS = recipe(NeuralDigitsConfig())


def setting(row: dict) -> tuple:
    """A run's (variant, *recipe): the runs a learning rate is chosen among, and one row of the summary (runs of a
    variant with another recipe, e.g. more steps, are another experiment, never averaged with these). A field a row
    predates has its default."""
    values = []
    for field, default in _RECIPE_DEFAULTS.items():
        value = row.get(field, default)
        values.append(value in (True, "True", 1) if isinstance(default, bool) else type(default)(value))
    return (str(row["variant"]), *values)


def setting_label(row: dict, rows: list[dict]) -> str:
    """The variant of ``row``, with the recipe fields that differ among ``rows`` (e.g. "neural steps 800")."""
    keys = [setting(r) for r in rows]
    varying = [i for i, field in enumerate(RECIPE_FIELDS) if len({k[i + 1] for k in keys}) > 1]
    mine = setting(row)
    return " ".join([mine[0], *(f"{RECIPE_FIELDS[i]} {mine[i + 1]:g}" if isinstance(mine[i + 1], float)
                                 else f"{RECIPE_FIELDS[i]} {mine[i + 1]}" for i in varying)])  # fmt: skip


def summarise(runs: list[dict]) -> list[dict]:
    """One row per :func:`setting` (variant, recipe): its learning rate chosen on validation at the first seed, and
    the test metrics of that learning rate, mean / min / max over its seeds."""
    out = []
    for group in dict.fromkeys(setting(r) for r in runs):
        mine = [r for r in runs if setting(r) == group]
        variant = group[0]
        first = min(int(r["seed"]) for r in mine)
        lr = choose_lr(mine, first)
        chosen = [r for r in mine if float(r["lr"]) == lr]
        tried = " ".join(f"{x:g}" for x in sorted({float(r["lr"]) for r in mine}))
        row = {"variant": variant, "lr": lr, "lrs_tried": tried, "seeds": " ".join(str(int(r["seed"])) for r in chosen),
               **dict(zip(RECIPE_FIELDS, group[1:]))}  # fmt: skip
        row["val_score"] = statistics.fmean(validation_score(r) for r in chosen)
        for key in METRIC_KEYS:
            values = [float(r[key]) for r in chosen if r.get(key) not in (None, "")]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        row["trainable_params"] = chosen[0]["trainable_params"]
        row["train_seconds"] = statistics.fmean(float(r["train_seconds"]) for r in chosen)
        out.append(row)
    return out


METRIC_KEYS = ("caption_accuracy", "draw_accuracy", "segment_digit_miou", "segment_digit_p50", "segment_larger_miou",
               "segment_larger_p50", "segment_digit_p50_incl", "segment_larger_p50_incl")  # fmt: skip


def write_results(runs, curves, selectivity, out_dir: pathlib.Path, stem: str) -> list[dict]:
    """Write ``{stem}.csv`` (the summary per variant), ``{stem}_runs.csv`` (every run: validation and test metrics),
    ``{stem}_curves.csv`` (training losses), ``{stem}_selectivity.csv`` and ``{stem}.png``; return the summary."""
    summary = summarise(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(summary, out_dir / f"{stem}.csv")
    write_csv(runs, out_dir / f"{stem}_runs.csv")
    write_csv(curves, out_dir / f"{stem}_curves.csv")
    if selectivity:
        write_csv(selectivity, out_dir / f"{stem}_selectivity.csv")
    plot(summary, runs, curves, selectivity, out_dir / f"{stem}.png")
    return summary


def read_rows(path: pathlib.Path) -> list[dict]:
    """A CSV written by :func:`write_results`, numbers parsed (empty cells dropped)."""
    import csv

    def parse(value: str):
        for kind in (int, float):  # counts and seeds stay integers (write_csv writes floats with 6 digits)
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def merge_runs(dirs: list[pathlib.Path], out_dir: pathlib.Path, stem: str = "neural_digits") -> list[dict]:
    """Merge the ``{stem}_runs.csv`` / ``_curves.csv`` / ``_selectivity.csv`` of several invocations (parts of the
    grid run side by side) into one set of results in ``out_dir``. Runs are deterministic, so a run (variant, steps,
    lr, seed) present in several parts (e.g. repeated for more selectivity doses) must have the same metrics there and
    is kept once, with its first part's curves; different metrics are an error, as are different results of one
    selectivity condition (run, condition, units off). Rows written before they recorded (all of) their recipe get
    their run's, and the defaults for what the run did not record either."""
    runs, curves, selectivity = {}, {}, {}
    for d in dirs:
        d = pathlib.Path(d)
        if not (d / f"{stem}_runs.csv").exists():
            raise ValueError(f"from_runs: {d} has no {stem}_runs.csv")
        mine = [_with_recipe(r) for r in read_rows(d / f"{stem}_runs.csv")]
        recipes = {(r["variant"], float(r["lr"]), int(r["seed"])): {f: r[f] for f in RECIPE_FIELDS} for r in mine}
        new = set()
        for r in mine:
            key = (*setting(r), float(r["lr"]), int(r["seed"]))
            if key not in runs:
                runs[key] = r
                new.add(key)
            elif any(runs[key].get(k) != r.get(k) for k in _run_metric_keys(runs[key], r)):
                raise ValueError(f"from_runs: run {key} appears twice with different metrics (in {d})")
        for c in read_rows(d / f"{stem}_curves.csv"):
            c = {**recipes[(c["variant"], float(c["lr"]), int(c["seed"]))], **c}  # older rows: their run's recipe
            run = (*setting(c), float(c["lr"]), int(c["seed"]))
            if run in new:
                curves[(*run, c["run"], int(c["step"]))] = c
        if (d / f"{stem}_selectivity.csv").exists():  # the selectivity test runs on neural runs only
            for r in read_rows(d / f"{stem}_selectivity.csv"):
                r = {**recipes[("neural", float(r["lr"]), int(r["seed"]))], **r}  # older rows: their run's recipe
                key = (*setting({"variant": "neural", **r}), float(r["lr"]), int(r["seed"]), r["condition"],
                       int(r["units_off"]))  # fmt: skip
                if key in selectivity and any(float(selectivity[key][t]) != float(r[t]) for t in TASKS):
                    raise ValueError(f"from_runs: selectivity {key} appears twice with different metrics (in {d})")
                selectivity.setdefault(key, r)
    return write_results(list(runs.values()), list(curves.values()), list(selectivity.values()), out_dir, stem)


def _with_recipe(row: dict) -> dict:
    """A run's ``row`` with every recipe field (:data:`RECIPE_FIELDS`), the defaults for those it predates."""
    return {**row, **dict(zip(RECIPE_FIELDS, setting(row)[1:]))}


def _run_metric_keys(first: dict, second: dict) -> list[str]:
    """The keys two rows of one run must agree on: every validation and test metric either holds (not times)."""
    return [k for k in {*first, *second} if k.startswith("val_") or k in METRIC_KEYS]


def plot(summary: list[dict], runs: list[dict], curves: list[dict], selectivity: list[dict], path: pathlib.Path):
    plt = pyplot()
    if plt is None:
        return
    neural = [r for r in summary if r["variant"] == "neural"]
    selectivity = [r for r in selectivity if neural and float(r["lr"]) == neural[0]["lr"]  # the first neural setting
                   and setting({"variant": "neural", **r}) == setting(neural[0])]  # fmt: skip
    doses = sorted({int(r["units_off"]) for r in selectivity if r["condition"] != "none"})
    panels = 3 + bool(selectivity) + (len(doses) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    ax = axes[0]
    width = 0.8 / max(1, len(summary))
    step_counts = sorted({int(r["steps"]) for r in summary})

    def name(row: dict) -> str:  # the variant, with the recipe fields that vary among the settings
        return setting_label(row, summary)

    for i, row in enumerate(summary):
        keys = [f"{t}_accuracy" if t in ("caption", "draw") else f"{t}_p50" for t in TASKS]
        values = [float(row.get(k, float("nan"))) for k in keys]
        low = [v - float(row.get(f"{k}_min", v)) for k, v in zip(keys, values)]
        high = [float(row.get(f"{k}_max", v)) - v for k, v in zip(keys, values)]
        seeds = len(str(row["seeds"]).split())
        ax.bar([j + i * width for j in range(len(TASKS))], values, width, yerr=[low, high], capsize=2,
               label=f"{name(row)} (lr {row['lr']:g}, {seeds} seed{'s' if seeds > 1 else ''})")  # fmt: skip
    ax.axhline(0.9, color="black", linestyle="--", linewidth=1, label="target 0.9")
    ax.plot([-0.2, 1.6], [0.1, 0.1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.plot([1.6, 3.8], [0.5, 0.5], color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TASKS))], ["caption\nacc", "draw\nacc", "seg digit\nP@0.5",
                  "seg larger\nP@0.5"])  # fmt: skip
    steps_text = " / ".join(str(n) for n in step_counts)
    ax.set(ylim=(0, 1.05), title=f"test, chosen lr (bars: seed mean, min-max), {steps_text} steps")
    ax.legend(fontsize=6)
    ax = axes[1]
    for key in dict.fromkeys(setting(r) for r in runs):
        mine = [r for r in runs if setting(r) == key]
        first = min(int(r["seed"]) for r in mine)
        points = sorted((float(r["lr"]), validation_score(r)) for r in mine if int(r["seed"]) == first)
        ax.plot(*zip(*points), marker="o", label=name(mine[0]))
    ax.set(xscale="log", xlabel="adapter learning rate", ylabel="validation score (mean accuracy / mIoU)",
           title="learning-rate choice (validation images)")  # fmt: skip
    ax.legend(fontsize=7)
    ax = axes[2]
    for row in summary:
        first = min(int(s) for s in str(row["seeds"]).split())
        mine = [c for c in curves if setting(c) == setting(row) and float(c["lr"]) == row["lr"]
                and int(c["seed"]) == first]  # fmt: skip
        for run in dict.fromkeys(c["run"] for c in mine):  # one per task group (per_task: four)
            points = [c for c in mine if c["run"] == run]
            window = 10
            losses = [
                statistics.fmean(float(p["loss"]) for p in points[max(0, i - window + 1) : i + 1])
                for i in range(len(points))
            ]
            extra = name(row)[len(row["variant"]) :]  # the recipe fields that vary, if any
            ax.plot([p["step"] for p in points], losses, label=run + extra, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log", title="training loss (chosen lr)")
    ax.legend(fontsize=5)
    if selectivity:
        base_rows = {r["seed"]: r for r in selectivity if r["condition"] == "none"}

        def change(row: dict, task: str) -> float:  # of the task's metric against nothing off, same run
            return float(row[task]) - float(base_rows[row["seed"]][task])

        # the bars: the dose most runs have (every run has the default one)
        dose = max(doses, key=lambda n: (len({r["seed"] for r in selectivity if r["units_off"] == n}), -n))
        at_dose = [r for r in selectivity if int(r["units_off"]) == dose]
        ax = axes[3]
        conditions = list(dict.fromkeys(r["condition"] for r in at_dose))
        width = 0.8 / len(conditions)
        for i, condition in enumerate(conditions):
            mine = [r for r in at_dose if r["condition"] == condition]
            drops = [statistics.fmean(change(r, t) for r in mine) for t in TASKS]
            ax.bar([j + i * width for j in range(len(TASKS))], drops, width, label=condition)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TASKS))], ["caption", "draw", "seg digit", "seg larger"])
        runs_n = len({r["seed"] for r in at_dose})
        ax.set(ylabel="change of the test metric",
               title=f"{dose} units switched off (neural, mean of {runs_n} runs)")  # fmt: skip
        ax.legend(fontsize=6)
    if len(doses) > 1:  # dose-response: each task's change when its own selective units / random units are off
        ax = axes[4]
        seeds = sorted({r["seed"] for r in selectivity if int(r["units_off"]) not in (0, dose)})
        dosed = [r for r in selectivity if r["seed"] in seeds]

        def curve(task: str, off: str) -> list[tuple[int, float]]:  # (units off, mean change of the task) per dose
            points = []
            for n in doses:
                mine = [r for r in dosed if r["condition"].startswith(off) and int(r["units_off"]) == n]
                changes = [change(r, task) for r in mine]
                if changes:
                    points.append((n, statistics.fmean(changes)))
            return points

        for t, task in enumerate(TASKS):
            ax.plot(*zip(*curve(task, f"selective_{task}")), marker="o", color=f"C{t}", label=f"{task}: own units off")
            ax.plot(*zip(*curve(task, "random")), marker="x", linestyle="--", color=f"C{t}", label=f"{task}: random")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xlabel="units switched off", ylabel="change of the task's test metric",
               title=f"dose-response (seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))})")  # fmt: skip
        ax.legend(fontsize=5)
    fig.suptitle("Neural tuning vs dense / per-task / MiT, frozen SmolLM2-135M, four digit tasks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="mit demo neural-digits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the neural run only, 25 steps, smaller evaluation")
    parser.add_argument("--steps", type=int, help="optimiser steps per run")
    parser.add_argument("--lrs", type=float, nargs="+", help="adapter learning rates to try per variant (AdamW)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds: the grid at the first, the chosen lr at all")
    parser.add_argument("--extend-edges", type=int, help="at most this many lrs beyond an edge the choice sits on")
    parser.add_argument("--head-lr", type=float, help="learning rate of the patch encoder, projection, tokens, heads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="variants to run")
    parser.add_argument("--encoder-pretrain-steps", type=int, help="patch-encoder pretraining steps (0: none)")
    parser.add_argument("--segment-tokens", type=int, choices=range(1, len(LCL) + 1),
                        help="how many of <LCL-1..5> a segmentation answer has (the reference: 5)")  # fmt: skip
    parser.add_argument("--freeze-encoder", action="store_true", help="keep the pretrained patch encoder frozen")
    parser.add_argument("--no-selectivity", action="store_true", help="skip the task-selectivity test")
    parser.add_argument("--selectivity-fractions", type=float, nargs="+",
                        help="doses of the selectivity test: fractions of the units switched off")  # fmt: skip
    parser.add_argument("--from-runs", type=pathlib.Path, nargs="+", metavar="DIR",
                        help="train nothing: merge earlier invocations' results (their --out) into --out")  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"), help="output directory")
    args = parser.parse_args(argv)
    stem = "neural_digits" + ("_quick" if args.quick else "")
    if args.from_runs:
        summary = merge_runs(args.from_runs, args.out, stem)
    else:
        cfg = quick_config() if args.quick else NeuralDigitsConfig()
        for field, value in (("steps", args.steps), ("lrs", args.lrs), ("seeds", args.seeds),
                             ("head_lr", args.head_lr), ("variants", args.variants),
                             ("extend_edges", args.extend_edges),
                             ("selectivity_fractions", args.selectivity_fractions),
                             ("encoder_pretrain_steps", args.encoder_pretrain_steps),
                             ("segment_tokens", args.segment_tokens)):  # fmt: skip
            if value is not None:
                setattr(cfg, field, tuple(value) if isinstance(value, list) else value)
        if args.freeze_encoder:
            cfg.train_encoder = False
        if args.no_selectivity:
            cfg.selectivity = False
        summary, _, _ = run_demo(cfg, args.out, stem=stem)
    for row in summary:
        print(row)
    print(f"wrote {args.out}/{stem}.csv, {stem}_runs.csv, {stem}_curves.csv and {stem}.png")
    return summary


if __name__ == "__main__":
    main()
