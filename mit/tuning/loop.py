"""The optimizer-step loop of a single process: what every step does (a finite loss, gradients cleared, backward,
optimizer and scheduler steps) and the per-step loss log. The :class:`~mit.tuning.trainer.Trainer` runs the same
step under accelerate (gradient accumulation, several processes) with :func:`check_finite_loss`; experiments and
notebooks that need none of that use :func:`run_steps`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import TrainingDiverged

StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


def check_finite_loss(value: float, where: str) -> None:
    """Raise :class:`TrainingDiverged` ("<where>: the training loss is nan") when ``value`` is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"{where}: the training loss is {value}")


def run_steps(
    step_loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    steps: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    name: str = "train",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``steps`` optimizer steps. ``step_loss(step)`` (``step`` = 1 .. ``steps``) builds its batch and returns the
    scalar loss to minimise and named parts of it to log (floats). Each step: the loss must be finite (else
    :class:`TrainingDiverged`, before the update), gradients are cleared (``set_to_none``), then backward, optimizer
    step, scheduler step. Returns one row per step: ``{"run": name, "step", "loss", **parts}``."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from ..utils.progress import progress_bar

        bar = progress_bar(total=steps, desc=name, unit="step", leave=False, nested=True)
    try:
        for step in range(1, steps + 1):
            loss, parts = step_loss(step)
            value = loss.item()
            check_finite_loss(value, f"{name}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            rows.append({"run": name, "step": step, "loss": value, **parts})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)  # redraws follow the bar's interval
    finally:
        if bar is not None:
            bar.close()
    return rows


__all__ = ["StepLoss", "check_finite_loss", "run_steps"]
