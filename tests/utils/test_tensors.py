"""check_tensors_match: the one name-and-shape check of adapters, neural adapters and trainer checkpoints."""

from __future__ import annotations

import pytest
import torch

from mit.utils.tensors import check_tensors_match


def test_names_and_shapes_are_checked_before_anything_else():
    shapes = {"a": (2, 3), "b": (4,)}
    check_tensors_match({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, shapes, "f.safetensors")
    with pytest.raises(
        ValueError, match=r"^f\.safetensors does not match the model: missing \['b'\], unexpected \['c'\]!$"
    ):
        check_tensors_match({"a": torch.zeros(2, 3), "c": torch.zeros(4)}, shapes, "f.safetensors", hint="!")
    with pytest.raises(ValueError, match=r"^f\.safetensors: tensor a has shape \(3, 2\), the model expects \(2, 3\)$"):
        check_tensors_match({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, shapes, "f.safetensors")
