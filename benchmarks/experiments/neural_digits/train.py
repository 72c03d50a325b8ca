"""Batches of the task mix, their losses, and training on :func:`mit.tuning.loop.run_steps` with
:func:`mit.tuning.optim.warmup_cosine` (the loop and schedule of the tuning framework)."""

from __future__ import annotations

import time

import torch
from torch import nn

from mit.demo.digits import DigitsSplit
from mit.tuning.loop import run_steps
from mit.tuning.losses import dice_loss
from mit.tuning.optim import warmup_cosine

from .config import NeuralDigitsConfig
from .models import DigitsModel
from .tasks import half_mask, make_canvases


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


def train(model: DigitsModel, tasks: tuple[str, ...], samples_per_task: int, train_split: DigitsSplit,
          cfg: NeuralDigitsConfig, name: str):  # fmt: skip
    """AdamW on the trainable parameters (:meth:`DigitsModel.parameter_groups`), warm-up then cosine decay
    (:func:`mit.tuning.optim.warmup_cosine`), every batch ``samples_per_task`` samples of each of ``tasks``, steps by
    :func:`mit.tuning.loop.run_steps` (a non-finite loss raises :class:`mit.tuning.errors.TrainingDiverged`). Returns
    per-step loss rows and the training seconds."""
    optimiser = torch.optim.AdamW(model.parameter_groups(cfg.lr, cfg.head_lr), weight_decay=0.0)
    schedule = warmup_cosine(optimiser, cfg.warmup_steps, cfg.steps)
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    model.train()

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        parts = [build_rows(model, task, train_split, samples_per_task, gen, draw_target=cfg.draw_target)
                 for task in tasks]  # fmt: skip
        outputs = task_outputs(model, list(tasks), parts)
        loss, per = batch_loss(model, list(tasks), outputs, cfg.draw_weight, cfg.draw_class_weight)
        return loss, {f"loss_{t}": v for t, v in per.items()}

    start = time.perf_counter()
    curve = run_steps(step_loss, optimiser, cfg.steps, schedule, name=name)
    return curve, time.perf_counter() - start
