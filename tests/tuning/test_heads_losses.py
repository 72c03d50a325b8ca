"""Task heads (shapes, gradients) and losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from tuning_fixtures import one_thread

from mit.tuning.heads import ClassificationHead, RegressionHead, SegmentationDecoder
from mit.tuning.losses import classification_loss, dice_loss, rmse_loss, segmentation_loss

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_segmentation_decoder_shapes_and_gradients():
    torch.manual_seed(0)
    decoder = SegmentationDecoder(text_dim=24, feature_dim=32, num_levels=3, hidden=16)
    levels = [torch.randn(2, 32, 4, 4) for _ in range(3)]
    text = torch.randn(2, 24, requires_grad=True)
    logits = decoder(text, levels, (32, 32))
    assert logits.shape == (2, 32, 32)
    logits.sum().backward()
    assert text.grad.abs().sum() > 0
    assert all(p.grad is not None for p in decoder.parameters())
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in decoder.modules()) == 3
    with pytest.raises(ValueError, match="expects 3 feature maps, got 2"):
        decoder(text, levels[:2], (32, 32))


def test_classification_and_regression_heads():
    head = ClassificationHead(image_dim=16, text_dim=24, num_classes=5, hidden=8)
    assert head(torch.randn(3, 16), torch.randn(3, 24)).shape == (3, 5)
    assert RegressionHead(24)(torch.randn(3, 24)).shape == (3,)
    assert len([m for m in RegressionHead(24).modules() if isinstance(m, torch.nn.Linear)]) == 1  # one FC layer
    assert RegressionHead(24, hidden=8)(torch.randn(3, 24)).shape == (3,)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ClassificationHead(16, 24, 1)


def test_dice_loss_hand_computed():
    # p = sigmoid(0) = 0.5 everywhere on 4 pixels, target has 2 ones: 1 - (2 * 1 + s) / (2 + 2 + s)
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5)
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(1 - 3 / 5)
    perfect = torch.tensor([[[50.0, 50.0], [-50.0, -50.0]]])
    assert dice_loss(perfect, target, smooth=0.0).item() == pytest.approx(0.0, abs=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    assert segmentation_loss(logits, target, bce_weight=0.5, smooth=0.0).item() == pytest.approx(0.5 + 0.5 * bce)
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(logits, target[:, :1])


def test_cross_entropy_and_rmse():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    assert classification_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    assert rmse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), eps=0.0).item() == pytest.approx(
        math.sqrt(2.5)
    )
    pred = torch.zeros(3, requires_grad=True)
    rmse_loss(pred, torch.zeros(3)).backward()  # finite gradient at zero error
    assert torch.isfinite(pred.grad).all()
