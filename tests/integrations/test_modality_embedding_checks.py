"""A bad modality_embedding given to forward or generate is a ValueError naming ``modality_embedding``, what was
received and what was expected, before any computation."""

from __future__ import annotations

import integration_families as fam
import pytest
import torch

import mit


@pytest.fixture(scope="module")
def model():
    return mit.apply_mit(fam.model("llama", num_hidden_layers=2), mit.MiTConfig(modality_dim=fam.MODALITY_DIM))


BAD = {  # name -> (embedding for a batch of 3, message pattern)
    "not a tensor": ([[0.0] * fam.MODALITY_DIM] * 3, r"modality_embedding must be a torch\.Tensor .*got list"),
    "1-D": (torch.zeros(fam.MODALITY_DIM), r"modality_embedding must have shape .* = \(3, 16\), got \(16,\)"),
    "batch mismatch": (torch.zeros(2, fam.MODALITY_DIM), r"= \(3, 16\), got \(2, 16\)"),
    "wrong width": (torch.zeros(3, 8), r"= \(3, 16\), got \(3, 8\)"),
    "integer": (torch.zeros(3, fam.MODALITY_DIM, dtype=torch.long), "floating-point tensor, got dtype torch.int64"),
    "other device": (torch.zeros(3, fam.MODALITY_DIM, device="meta"), "modality_embedding is on device meta, expected"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_forward_and_generate_refuse_a_bad_embedding(model, case):
    embedding, message = BAD[case]
    ids, mask = fam.padded_batch()
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask, modality_embedding=embedding)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, modality_embedding=embedding, max_new_tokens=2, do_sample=False)


def test_generate_takes_one_row_per_prompt_and_refuses_a_pre_expanded_one(model):
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    beams = model.generate(
        ids, attention_mask=mask, modality_embedding=emb, max_new_tokens=2, num_beams=2, do_sample=False
    )
    assert beams.shape == (3, fam.SEQ_LEN + 2)
    with pytest.raises(ValueError, match=r"got \(6, 16\) .*beam search and num_return_sequences repeat it"):
        model.generate(
            ids, attention_mask=mask, modality_embedding=emb.repeat_interleave(2, 0), max_new_tokens=2, num_beams=2
        )


def test_forward_by_keyword_and_positionally_agree_and_both_refuse_packed_batches(model):
    """A forward called all by keyword (as generate does) skips binding the signature: it must compute exactly what
    the positional call computes (padding-aware positions included) and refuse what that one refuses."""
    ids, mask = fam.padded_batch()
    emb = fam.embedding()
    with torch.no_grad():
        positional = model(ids, mask, modality_embedding=emb).logits
        by_keyword = model(input_ids=ids, attention_mask=mask, modality_embedding=emb).logits
    assert torch.equal(positional, by_keyword)
    lengths = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
    for call in (
        lambda: model(ids, mask, modality_embedding=emb, cu_seq_lens_q=lengths),
        lambda: model(input_ids=ids, attention_mask=mask, modality_embedding=emb, cu_seq_lens_q=lengths),
    ):
        with pytest.raises(ValueError, match="packed"):
            call()
    restart = torch.arange(ids.shape[1]).remainder(3).expand(ids.shape[0], -1)
    for call in (
        lambda: model(ids, None, restart, modality_embedding=emb),
        lambda: model(input_ids=ids, position_ids=restart, modality_embedding=emb),
    ):
        with pytest.raises(ValueError, match="position_ids restart inside a row"):
            call()
