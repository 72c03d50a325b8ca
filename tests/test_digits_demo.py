"""The real-model demonstration's quick mode: MiT makes a frozen SmolLM2 answer questions about real digit images."""

from __future__ import annotations

import csv

import pytest

from mit import demo_digits


@pytest.fixture(scope="module")
def smollm2():
    from mit.models import SMOLLM2_INSTALL, load_smollm2

    try:
        return load_smollm2()
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")


def test_questions_are_balanced_and_split_by_image():
    train, test = demo_digits.load_digits_split()
    assert len(train.labels) + len(test.labels) == 1797
    assert not set(train.index.tolist()) & set(test.index.tolist())  # no test image is seen in training
    assert sorted(train.index.tolist() + test.index.tolist()) == list(range(1797))
    index, ks, answers = demo_digits.test_questions(test.labels)
    assert answers.float().mean().item() == 0.5
    assert ((ks == test.labels[index]) == answers.bool()).all()


def test_quick_demo_mit_learns_and_text_only_cannot(smollm2, tmp_path):
    model, tokenizer = smollm2
    cfg = demo_digits.quick_config()
    rows = demo_digits.run_demo(cfg, tmp_path, base=model, tokenizer=tokenizer)
    by_method = {r["method"]: r for r in rows}
    mit_run, text_run = by_method["mit"], by_method["text_only"]
    assert mit_run["last_loss"] < 0.8 * mit_run["first_loss"], mit_run
    assert mit_run["test_accuracy"] > 0.75, mit_run
    assert 0.35 <= text_run["test_accuracy"] <= 0.65, text_run  # the question alone says nothing about the image
    with (tmp_path / "digits_demo.csv").open() as f:
        written = list(csv.DictReader(f))
    assert {r["method"] for r in written} == {"mit", "text_only"}
    assert (tmp_path / "digits_demo.png").stat().st_size > 10_000
