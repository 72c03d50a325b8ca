"""MiT under ``torch.autocast`` (CPU, bf16) on every family: the projections and the rotary embedding leave q, k, v
and the FFN gate's inputs in different dtypes there; MiT runs its attention and FFN gate in the autocast dtype, as the
model's own attention does, and stays as close to its fp32 result as the frozen model under autocast stays to its
own (flash-attention's rule: a small multiple of the same model's low-precision error, with a floor)."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_families import FAMILIES, MODALITY_DIM, embedding, model, padded_batch, randomise

import mit


def _logits(net, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask, **kwargs).logits.float()


def _max_error(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> float:
    return (a - b).abs()[real].max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_autocast_bf16_runs_and_stays_within_the_frozen_models_error(family):
    base = model(family)
    tuned = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    randomise(tuned)
    ids, mask = padded_batch()
    real = mask.bool()
    emb = embedding()
    base_fp32, tuned_fp32 = _logits(base, ids, mask), _logits(tuned, ids, mask, modality_embedding=emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_bf16 = _logits(base, ids, mask)
        tuned_bf16 = _logits(tuned, ids, mask, modality_embedding=emb)
    assert torch.isfinite(tuned_bf16[real]).all()
    assert _max_error(tuned_fp32, base_fp32, real) > 0.05  # the infusion changes the model visibly
    base_error = _max_error(base_bf16, base_fp32, real)
    assert _max_error(tuned_bf16, tuned_fp32, real) <= 3 * base_error + 1e-2


def test_autocast_zero_initialised_mit_is_the_frozen_model():
    """Identity at initialisation holds under autocast too (zero infusion: K' = K, V' = V, 1 + f = 1)."""
    base = model("llama")
    tuned = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_bf16 = _logits(base, ids, mask)
        tuned_bf16 = _logits(tuned, ids, mask, modality_embedding=embedding())
    base_error = _max_error(base_bf16, _logits(base, ids, mask), real)
    assert _max_error(tuned_bf16, base_bf16, real) <= 3 * base_error + 1e-2
