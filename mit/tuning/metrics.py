"""Evaluation metrics, as fractions in [0, 1] (the paper reports percentages).

- Referring segmentation (LAVT / CRIS conventions): overall IoU ``oIoU = sum_i I_i / sum_i U_i`` over the split,
  mean IoU ``mIoU = mean_i I_i / U_i`` (a sample with an empty union counts 0, as in LAVT), and precision at IoU
  thresholds 0.5 ... 0.9.
- Classification: accuracy, macro F1 (mean over the classes present in the labels or predictions) and
  support-weighted F1.
- Sentiment (CMU-MOSI / MOSEI, the MMSA / MISA / MMIM evaluation code): MAE and Pearson correlation of the raw scores;
  ``acc2_has0`` / ``f1_has0``: negative (< 0) vs non-negative (>= 0) over all samples; ``acc2_non0`` / ``f1_non0``:
  negative vs positive over the samples whose label is not 0; F1s support-weighted; ``acc7`` / ``acc5``: scores
  clipped to [-3, 3] / [-2, 2] and rounded (numpy's round-half-to-even), predictions against labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union pixel counts of boolean masks (B, H, W) (or one mask (H, W))."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred, target = pred.bool(), target.bool()
    if pred.dim() == 2:
        pred, target = pred[None], target[None]
    dims = tuple(range(1, pred.dim()))
    return (pred & target).sum(dims), (pred | target).sum(dims)


def segmentation_metrics(intersections: Sequence[float], unions: Sequence[float]) -> dict[str, float]:
    """oIoU, mIoU and P@{0.5..0.9} from per-sample intersection and union counts."""
    i, u = _numpy(intersections).astype(np.float64), _numpy(unions).astype(np.float64)
    if i.shape != u.shape or i.ndim != 1 or len(i) == 0:
        raise ValueError(f"intersections and unions must be equal-length non-empty 1-D, got {i.shape} and {u.shape}")
    iou = np.where(u > 0, i / np.maximum(u, 1), 0.0)
    out = {"oIoU": float(i.sum() / u.sum()) if u.sum() > 0 else 0.0, "mIoU": float(iou.mean())}
    for t in IOU_THRESHOLDS:
        out[f"P@{t}"] = float((iou >= t).mean())
    return out


def _f1_per_class(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.union1d(np.unique(label), np.unique(pred))
    f1, support = [], []
    for c in classes:
        tp = np.sum((pred == c) & (label == c))
        fp = np.sum((pred == c) & (label != c))
        fn = np.sum((pred != c) & (label == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(np.sum(label == c))
    return np.asarray(f1, dtype=np.float64), np.asarray(support, dtype=np.float64)


def f1_score(pred, label, average: str = "macro") -> float:
    """F1 of integer predictions against labels; ``average`` is "macro" or "weighted" (by label support)."""
    pred, label = _numpy(pred).ravel(), _numpy(label).ravel()
    if pred.shape != label.shape or len(pred) == 0:
        raise ValueError(f"pred and label must be equal-length and non-empty, got {pred.shape} and {label.shape}")
    f1, support = _f1_per_class(pred, label)
    if average == "macro":
        return float(f1.mean())
    if average == "weighted":
        return float((f1 * support).sum() / support.sum()) if support.sum() else 0.0
    raise ValueError(f"average must be 'macro' or 'weighted', got {average!r}")


def classification_metrics(pred, label) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 of predicted class ids (or logits (N, C), arg-maxed) against labels."""
    pred, label = _numpy(pred), _numpy(label).ravel()
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    pred = pred.ravel()
    if pred.shape != label.shape or len(pred) == 0:
        raise ValueError(f"pred and label must be equal-length and non-empty, got {pred.shape} and {label.shape}")
    return {
        "accuracy": float((pred == label).mean()),
        "f1_macro": f1_score(pred, label, "macro"),
        "f1_weighted": f1_score(pred, label, "weighted"),
    }


def _multiclass_accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.sum(np.round(pred) == np.round(label)) / len(label))


def sentiment_metrics(pred, label) -> dict[str, float]:
    """MAE, Corr, Acc-2 / F1 (has-0 and non-0 variants), Acc-5 and Acc-7 of sentiment scores in [-3, 3]."""
    pred, label = _numpy(pred).astype(np.float64).ravel(), _numpy(label).astype(np.float64).ravel()
    if pred.shape != label.shape or len(pred) == 0:
        raise ValueError(f"pred and label must be equal-length and non-empty, got {pred.shape} and {label.shape}")
    if pred.std() > 0 and label.std() > 0:
        corr = float(np.corrcoef(pred, label)[0, 1])
    else:
        corr = float("nan")
    non0 = label != 0
    has0_pred, has0_label = pred >= 0, label >= 0
    non0_pred, non0_label = pred[non0] > 0, label[non0] > 0
    out = {
        "mae": float(np.abs(pred - label).mean()),
        "corr": corr,
        "acc2_has0": float((has0_pred == has0_label).mean()),
        "f1_has0": f1_score(has0_pred.astype(int), has0_label.astype(int), "weighted"),
        "acc2_non0": float((non0_pred == non0_label).mean()) if non0.any() else float("nan"),
        "f1_non0": f1_score(non0_pred.astype(int), non0_label.astype(int), "weighted") if non0.any() else float("nan"),
        "acc5": _multiclass_accuracy(np.clip(pred, -2.0, 2.0), np.clip(label, -2.0, 2.0)),
        "acc7": _multiclass_accuracy(np.clip(pred, -3.0, 3.0), np.clip(label, -3.0, 3.0)),
    }
    return out
