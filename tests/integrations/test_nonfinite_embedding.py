"""A NaN modality embedding reaches the logits through apply_mit with the C++ kernels (it used to give finite logits:
the kernels turned NaN into 0), and it stays in its own sample."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_families import MODALITY_DIM, embedding, model, padded_batch, randomise

import mit
from mit_kernels.dispatch import cpu_backend_available


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_embedding_gives_nonfinite_logits_in_its_sample_only(value):
    if not cpu_backend_available():
        pytest.fail("the C++ CPU kernels are not available (no C++ compiler?)")
    infused = mit.apply_mit(copy.deepcopy(model("llama")), mit.MiTConfig(modality_dim=MODALITY_DIM, backend="cpu"))
    randomise(infused)
    ids, mask = padded_batch()
    emb = embedding()
    emb[1, 3] = value
    with torch.no_grad():
        logits = infused(ids, attention_mask=mask, modality_embedding=emb).logits
        clean = infused(ids, attention_mask=mask, modality_embedding=embedding()).logits
    real = mask.bool()
    assert not torch.isfinite(logits[1][real[1]]).any(), "every real position of the sample must be non-finite"
    assert torch.isnan(logits[1][real[1]]).any()
    # The other samples are untouched, bit for bit.
    assert torch.equal(logits[0], clean[0]) and torch.equal(logits[2], clean[2])
