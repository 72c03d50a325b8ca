"""Optimizers and learning-rate schedules: the paper's (Adam, x ``lr_gamma`` every ``lr_step`` epochs) and a linear
warm-up then cosine decay per optimizer step, for loops that count steps rather than epochs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .config import OptimConfig


def paper_optimizer(
    parameters: Iterable[torch.nn.Parameter], optim: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The paper's recipe (Sec. 3.3): Adam at ``optim.lr`` with ``optim.weight_decay``, and a StepLR multiplying the
    learning rate by ``optim.lr_gamma`` every ``optim.lr_step`` scheduler steps (the trainer steps it once per
    epoch)."""
    optimizer = torch.optim.Adam(list(parameters), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step, gamma=optim.lr_gamma)
    return optimizer, scheduler


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at (0-based) ``step``: linear warm-up ``(step + 1) / warmup_steps`` over the first
    ``warmup_steps``, then cosine decay from 1 to 0 at ``total_steps`` (and 0 after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler of :func:`warmup_cosine_factor`, stepped once per optimizer step."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    factor: Callable[[int], float] = lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["paper_optimizer", "warmup_cosine", "warmup_cosine_factor"]
