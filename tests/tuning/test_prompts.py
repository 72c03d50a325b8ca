"""Prompt templates, padding, and the task embedding (the last real token's hidden state) under both paddings."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaModel
from tuning_fixtures import one_thread, write_tiny_llama

import mit
from mit.tuning.prompts import (
    TEMPLATES,
    format_prompt,
    last_token_index,
    last_token_state,
    position_ids,
    tokenize_prompts,
)

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_templates():
    assert TEMPLATES["refseg"] == "Segment the {description} according to the text. #Segmentation:"  # the paper's
    assert (
        format_prompt("refseg", description="red square. ")
        == "Segment the red square according to the text. #Segmentation:"
    )
    assert format_prompt("Say {text}!", text="hi") == "Say hi!"
    with pytest.raises(ValueError, match="needs the field 'description'"):
        format_prompt("refseg", text="x")


def test_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_last_token_index():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert last_token_index(left).tolist() == [3, 3]  # position -1
    assert last_token_index(right).tolist() == (right.sum(1) - 1).tolist()
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = write_tiny_llama(tmp_path_factory.mktemp("llama"))
    return LlamaModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def _task_embeddings(model, tokenizer, prompts, side, emb, padded=True):
    ids, mask = tokenize_prompts(tokenizer, prompts, padding_side=side)
    real = mask.bool()
    if padded and side == "left":
        assert (mask[:, -1] == 1).all() and (~real[:, 0]).any()
    elif padded:
        assert (mask[:, 0] == 1).all() and (~real[:, -1]).any()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), modality_embedding=emb)
    return last_token_state(hidden.last_hidden_state, mask)


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.mit_named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def test_task_embedding_same_under_left_and_right_padding(tiny):
    model, tokenizer = tiny
    model = mit.apply_mit(model, mit.MiTConfig(modality_dim=8))
    _randomise(model)
    prompts = [format_prompt("refseg", description=d) for d in ("red square", "the big red square left of it")]
    emb = torch.randn(2, 8)
    left = _task_embeddings(model, tokenizer, prompts, "left", emb)
    right = _task_embeddings(model, tokenizer, prompts, "right", emb)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    alone = _task_embeddings(model, tokenizer, prompts[:1], "left", emb[:1], padded=False)
    torch.testing.assert_close(left[:1], alone, atol=1e-5, rtol=1e-4)


def test_truncation_keeps_the_task_marker(tiny):
    _, tokenizer = tiny
    ids, _ = tokenize_prompts(tokenizer, [format_prompt("refseg", description="red " * 40)], max_length=6)
    assert ids.shape == (1, 6)
    assert tokenizer.decode(ids[0, -3:]).replace(" ", "") == "#segmentation:"


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    try:
        directory = mit.models.smollm2_path()
    except ImportError as error:
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=mit.models.SMOLLM2_GGUF)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def test_smollm2_tokenizer_task_embedding_left_vs_right():
    """SmolLM2's real tokenizer (its special and pad tokens) with a tiny random Llama of its vocabulary size."""
    tokenizer = _smollm2_tokenizer()
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = mit.apply_mit(LlamaModel(config).eval(), mit.MiTConfig(modality_dim=8))
    _randomise(model, seed=2)
    prompts = [format_prompt("msa", text="it was great"), format_prompt("snli_ve", text="two dogs play in the snow")]
    emb = torch.randn(2, 8)
    left = _task_embeddings(model, tokenizer, prompts, "left", emb)
    right = _task_embeddings(model, tokenizer, prompts, "right", emb)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_task_embedding_left_vs_right():
    """The same on the real SmolLM2-135M (~20-40 s to load, hence slow) with random non-zero infusion."""
    try:
        causal, tokenizer = mit.models.load_smollm2()
    except ImportError as error:
        pytest.skip(str(error))
    model = mit.apply_mit(causal.model, mit.MiTConfig(modality_dim=16))
    _randomise(model, seed=1)
    prompts = [format_prompt("msa", text="it was great"), format_prompt("refseg", description="the man on the left")]
    emb = torch.randn(2, 16)
    left = _task_embeddings(model, tokenizer, prompts, "left", emb)
    right = _task_embeddings(model, tokenizer, prompts, "right", emb)
    assert left.shape == (2, causal.config.hidden_size)
    torch.testing.assert_close(left, right, atol=2e-4, rtol=1e-3)
    assert not torch.allclose(left[0], left[1])
