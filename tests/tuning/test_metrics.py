"""Metrics against hand-computed values (and scikit-learn where it is installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mit.tuning.metrics import (
    classification_metrics,
    f1_score,
    intersection_union,
    segmentation_metrics,
    sentiment_metrics,
)


def test_intersection_union_and_segmentation_metrics():
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # 4 pixels
    target[0, :2, :3] = True  # 6 pixels, overlap 4 -> I 4, U 6
    pred[1, 0, 0] = True
    target[1, 3, 3] = True  # I 0, U 2
    inter, union = intersection_union(pred, target)
    assert inter.tolist() == [4, 0] and union.tolist() == [6, 2]
    m = segmentation_metrics([4, 0, 9], [6, 2, 10])
    assert m["oIoU"] == pytest.approx(13 / 18)  # sum I / sum U
    assert m["mIoU"] == pytest.approx((4 / 6 + 0 + 0.9) / 3)
    assert (
        m["P@0.5"] == pytest.approx(2 / 3) and m["P@0.7"] == pytest.approx(1 / 3) and m["P@0.9"] == pytest.approx(1 / 3)
    )
    assert segmentation_metrics([0], [0])["mIoU"] == 0.0  # empty union counts 0 (LAVT)
    with pytest.raises(ValueError, match="equal-length"):
        segmentation_metrics([1, 2], [3])


def test_classification_metrics_hand_computed():
    label = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(pred, label)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+1+1) = .5; class 1: 4/(4+1+0) = .8; class 2: 2/(2+0+1) = 2/3
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # equal supports
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 3).float()
    assert classification_metrics(logits, torch.tensor(label)) == m
    assert f1_score([1, 1, 1, 0], [1, 1, 0, 0], "weighted") == pytest.approx((2 / 3 * 2 + 0.8 * 2) / 4)
    with pytest.raises(ValueError, match="average must be"):
        f1_score([1], [1], "micro")


def test_classification_metrics_match_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    label, pred = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    m = classification_metrics(pred, label)
    assert m["f1_macro"] == pytest.approx(sklearn.f1_score(label, pred, average="macro", zero_division=0))
    assert m["f1_weighted"] == pytest.approx(sklearn.f1_score(label, pred, average="weighted", zero_division=0))


def test_sentiment_metrics_hand_computed():
    label = np.array([-2.0, -0.4, 0.0, 0.6, 2.5, 3.0])
    pred = np.array([-1.6, 0.2, -0.2, 1.4, 3.4, 2.5])
    m = sentiment_metrics(pred, label)
    assert m["mae"] == pytest.approx(np.mean([0.4, 0.6, 0.2, 0.8, 0.9, 0.5]))
    assert m["corr"] == pytest.approx(np.corrcoef(pred, label)[0, 1])
    # has-0: non-negative vs negative. labels >= 0: F F T T T T; preds >= 0: F T F T T T -> 4 / 6 right
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    # non-0: drop label 0 -> labels > 0: F F T T T; preds > 0: F T T T T -> 4 / 5
    assert m["acc2_non0"] == pytest.approx(4 / 5)
    # weighted F1, non-0: class F (support 2): TP 1 FP 0 FN 1 -> 2/3; class T (support 3): TP 3 FP 1 FN 0 -> 6/7
    assert m["f1_non0"] == pytest.approx((2 * 2 / 3 + 3 * 6 / 7) / 5)
    # has-0: class F (support 2): TP 1, FP 1 (-0.2 vs 0.0), FN 1 -> 1/2; class T (support 4): TP 3, FP 1, FN 1 -> 3/4
    assert m["f1_has0"] == pytest.approx((2 * 0.5 + 4 * 0.75) / 6)
    # Acc-7: clip to [-3, 3], round half to even: preds -2 0 -0 1 3 2 vs labels -2 -0 0 1 2 3 -> 4 / 6
    assert m["acc7"] == pytest.approx(4 / 6)
    # Acc-5: clip to [-2, 2]: preds -2 0 -0 1 2 2 vs labels -2 -0 0 1 2 2 -> 6 / 6
    assert m["acc5"] == pytest.approx(1.0)
    assert math.isnan(sentiment_metrics([1.0, 1.0], [0.5, -0.5])["corr"])  # constant predictions


def test_sentiment_f1_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    label = np.round(rng.uniform(-3, 3, 300), 1)
    label[:20] = 0
    pred = label + rng.normal(0, 1, 300)
    m = sentiment_metrics(pred, label)
    non0 = label != 0
    assert m["f1_non0"] == pytest.approx(sklearn.f1_score(label[non0] > 0, pred[non0] > 0, average="weighted"))
    assert m["f1_has0"] == pytest.approx(sklearn.f1_score(label >= 0, pred >= 0, average="weighted"))
