"""A small real dataset for trying ``mit train`` offline: scikit-learn's handwritten digits in UPMC-Food101's layout.

``mit data toy --out DIR`` writes::

    DIR/texts/train_titles.csv, DIR/texts/test_titles.csv   rows: image_name,text,label   (label: "zero" ... "nine")
    DIR/images/{train,test}/<label>/digit_<i>.png            the 8x8 scan, 4x upscaled (nearest) to 32x32 RGB
    DIR/clip_tiny.json                                       a small CLIP vision config (32x32 input) for --encoder

so that ``mit train --task cls --dataset food101 --data DIR --encoder DIR/clip_tiny.json --model smollm2 ...`` runs
end to end (data, encoder, MiT on the real SmolLM2, training, evaluation, checkpoints) in about a minute on a laptop
CPU. It is a smoke run, not a result: no CLIP weights exist offline, so the tower is randomly initialised, and two
epochs of it stay near chance (10%) accuracy. The text of every sample is the same sentence, so the label can only come
from the image. Train and test are disjoint scans (scikit-learn's 1,797, split by index).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT = "a scanned handwritten digit"
UPSCALE = 4  # 8x8 -> 32x32
# a small CLIP vision tower for 32x32 images (transformers CLIPVisionConfig fields; --encoder DIR/clip_tiny.json)
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8, "projection_dim": 64, "hidden_act": "quick_gelu"}  # fmt: skip


def write_toy_dataset(out: str | os.PathLike, train: int = 400, test: int = 200) -> dict[str, int]:
    """Write the dataset (module docstring) to ``out``; returns ``{"train": n, "test": n}``. ValueError when ``train``
    / ``test`` are not positive or ask for more than the 1,797 scans, or ``out`` holds files already (nothing is
    overwritten); ImportError naming the extra when scikit-learn or Pillow is missing."""
    try:
        from PIL import Image
        from sklearn.datasets import load_digits
    except ImportError as error:
        extra = 'pip install "mit[demo,tuning]"'
        raise ImportError(f"mit data toy needs scikit-learn and Pillow: {extra} ({error})") from None
    import numpy as np

    digits = load_digits()
    total = len(digits.images)
    for name, count in (("train", train), ("test", test)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}: expected a positive number of samples, got {count!r}")
    if train + test > total:
        raise ValueError(f"train + test: at most {total} scans exist, got {train} + {test}")
    root = pathlib.Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"out: {str(root)!r} exists and is not an empty directory (nothing is overwritten)")
    splits = {"train": range(0, train), "test": range(train, train + test)}
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        rows = []
        for i in indices:
            label = DIGIT_WORDS[int(digits.target[i])]
            grey = np.kron(digits.images[i] * (255 / 16), np.ones((UPSCALE, UPSCALE))).round().astype(np.uint8)
            folder = root / "images" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            name = f"digit_{i:04d}.png"
            Image.fromarray(grey).convert("RGB").save(folder / name)
            rows.append((name, TEXT, label))
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    (root / "clip_tiny.json").write_text(json.dumps(TINY_CLIP, indent=2) + "\n")
    return {split: len(indices) for split, indices in splits.items()}


def toy_train_command(out: str | os.PathLike, run_dir: str = "runs/toy") -> str:
    """The ``mit train`` command for the dataset written to ``out`` (about a minute on a laptop CPU)."""
    data = pathlib.Path(out)
    return (f"mit train --task cls --dataset food101 --data {data} --encoder {data / 'clip_tiny.json'} "
            f"--model smollm2 --epochs 2 --batch-size 16 --lr 1e-3 --out {run_dir}")  # fmt: skip


__all__ = ["DIGIT_WORDS", "TEXT", "TINY_CLIP", "toy_train_command", "write_toy_dataset"]
