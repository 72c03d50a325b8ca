"""The real-model demonstration (mit demo digits): data, question sampling and the quick run itself.

The quick run trains MiT on a frozen SmolLM2-135M for 60 steps (~30 s on 2 cores) and reaches 0.85-0.91 test accuracy
over seeds 0-6 (README, "MiT on a real model"). The test runs it on the model's first 12 pretrained layers (~15 s;
0.906 at seed 0) and asks for more than 75%, which text alone cannot reach."""

from __future__ import annotations

import csv
import functools
import pathlib

import pytest
import torch

from mit import models
from mit.demo import digits as demo_digits
from mit.models import SMOLLM2_INSTALL

LAYERS = 12  # of SmolLM2's 30: MiT infuses layers 4, 6, 8, 10 and 11


def test_questions_are_balanced_and_split_by_image():
    train, test = demo_digits.load_digits_split()
    assert len(train.labels) + len(test.labels) == 1797
    assert not set(train.index.tolist()) & set(test.index.tolist())  # no test image is seen in training
    assert sorted(train.index.tolist() + test.index.tolist()) == list(range(1797))
    index, ks, answers = demo_digits.test_questions(test.labels)
    assert answers.float().mean().item() == 0.5
    assert ((ks == test.labels[index]) == answers.bool()).all()


def test_paired_questions_ask_every_image_once_true_and_once_false():
    labels = torch.tensor([0, 3, 9, 9, 5])
    ks, answers = demo_digits.paired_questions(labels, torch.Generator().manual_seed(0))
    assert ks.shape == answers.shape == (10,)
    assert torch.equal(ks[:5], labels) and torch.equal(answers, torch.tensor([1] * 5 + [0] * 5))
    assert (ks[5:] != labels).all() and ((0 <= ks) & (ks <= 9)).all()


def test_pixel_encoder_standardises_with_training_statistics():
    train, _ = demo_digits.load_digits_split()
    encoder = demo_digits.PixelEncoder(8, *demo_digits.pixel_statistics(train.images))
    z = (train.images - encoder.pixel_mean) / encoder.pixel_std
    varying = train.images.numpy().std(0, ddof=1) >= 0.1  # border pixels (almost always 0) keep the 0.1 floor
    assert z.mean(0).abs().max().item() < 1e-5
    torch.testing.assert_close(z.std(0)[varying], torch.ones(int(varying.sum())))
    assert encoder(train.images[:5]).shape == (5, 8)
    with pytest.raises(ValueError, match="pixel_mean"):
        demo_digits.PixelEncoder(8, encoder.pixel_mean[:10], encoder.pixel_std)


def _chance_bound(test_labels: torch.Tensor) -> float:
    """The best accuracy of any answer that depends on the question digit k alone (what text-only can see)."""
    _, ks, answers = demo_digits.test_questions(test_labels)
    best = sum(max((answers[ks == k] == 1).sum().item(), (answers[ks == k] == 0).sum().item()) for k in range(10))
    return best / len(answers)


def test_quick_run_learns_through_the_infusion(tmp_path, monkeypatch):
    """The command line's quick run on SmolLM2's first LAYERS pretrained layers (MiT's default layers scaled to that
    depth): what is checked, learning through the infusion where text alone cannot, does not need the whole depth."""
    monkeypatch.setattr(models, "load_smollm2", functools.partial(models.load_smollm2, num_layers=LAYERS))
    try:
        demo_digits.main(["--quick", "--out", str(tmp_path)])
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    with open(tmp_path / "digits_demo_quick_runs.csv") as f:
        runs = {row["method"]: row for row in csv.DictReader(f)}
    assert set(runs) == {"text_only", "mit"}
    mit, text_only = runs["mit"], runs["text_only"]
    assert float(mit["last_loss"]) < 0.75 * float(mit["first_loss"])  # the training loss falls
    assert float(mit["test_accuracy"]) > 0.75
    # Without the image the answer can depend on k only: text-only cannot beat the best k-only rule (~0.5).
    _, test = demo_digits.load_digits_split()
    assert float(text_only["test_accuracy"]) <= _chance_bound(test.labels) + 1e-6
    assert int(mit["trainable_params"]) > int(text_only["trainable_params"]) > 0
    with open(tmp_path / "digits_demo_quick_curves.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["method"] == "mit"]
    assert steps[0] == 0 and steps[-1] == 60
    assert (tmp_path / "digits_demo_quick.png").stat().st_size > 10_000


def test_default_output_is_outside_the_committed_results(tmp_path, monkeypatch):
    """A run from a source checkout's root must not overwrite benchmarks/results/ unless asked (--out)."""
    monkeypatch.chdir(tmp_path)
    out = demo_digits.build_parser().parse_args([]).out.resolve()
    assert out == (tmp_path / "mit-results" / "digits").resolve()
    assert "benchmarks" not in out.parts
    assert demo_digits.build_parser().parse_args(["--out", "benchmarks/results"]).out == pathlib.Path(
        "benchmarks/results"
    )
