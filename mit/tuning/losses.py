"""Losses of the paper's tasks: DICE (+ optional BCE) for segmentation, cross-entropy, RMSE."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft DICE loss ``1 - (2 |p ∩ y| + s) / (|p| + |y| + s)`` per sample on ``p = sigmoid(logits)``, averaged over
    the batch (paper Eq. 8). ``logits`` and ``target`` are (B, H, W); ``smooth`` keeps empty masks finite."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    p = torch.sigmoid(logits.float()).flatten(1)
    y = target.float().flatten(1)
    intersection = (p * y).sum(1)
    return (1 - (2 * intersection + smooth) / (p.sum(1) + y.sum(1) + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.0, smooth: float = 1.0
) -> torch.Tensor:
    """DICE loss plus ``bce_weight`` x binary cross-entropy (the paper uses DICE alone: ``bce_weight=0``)."""
    loss = dice_loss(logits, target, smooth)
    if bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return loss


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (paper Eq. 9)."""
    return F.cross_entropy(logits.float(), labels.long())


def rmse_loss(predictions: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``sqrt(mean((p - y)^2) + eps)`` (paper Eq. 10); ``eps`` keeps the gradient finite at zero error."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    return torch.sqrt(F.mse_loss(predictions.float(), targets.float()) + eps)


def embedding_regression_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(p, y)) + mean((p - y)^2)`` over (N, D) predicted and target embeddings: the cosine term aligns
    the direction (what retrieval / a CLIP-conditioned generator reads), the MSE term the scale."""
    if predictions.shape != targets.shape or predictions.dim() != 2:
        raise ValueError(
            f"predictions and targets: expected equal (N, D) shapes, got {tuple(predictions.shape)} and "
            f"{tuple(targets.shape)}"
        )
    p, y = predictions.float(), targets.float()
    return (1 - F.cosine_similarity(p, y, dim=-1)).mean() + F.mse_loss(p, y)
