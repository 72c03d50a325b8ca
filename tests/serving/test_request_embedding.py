"""A request's embedding as a server receives it (mit.serving.request_embedding; no vLLM needed)."""

import math

import pytest
import torch

from mit.serving.request_embedding import embedding_salt, has_embedding, parse_embedding


def test_absent_embedding_is_the_frozen_base():
    assert parse_embedding(None, 4) is None
    assert parse_embedding({"other": 1}, 4) is None
    assert parse_embedding({"other": 1}, None) is None
    assert not has_embedding({"other": 1}) and has_embedding({"mit_embedding": []})


def test_embedding_round_trips_float32_exactly():
    values = torch.randn(7, dtype=torch.float32)
    parsed = parse_embedding({"mit_embedding": values.tolist()}, 7)  # what JSON carries: Python floats
    assert parsed.dtype == torch.float32 and torch.equal(parsed, values)
    assert torch.equal(parse_embedding({"mit_embedding": [1, 2, 3]}, 3), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("value", "dim", "message"),
    [
        ([0.0] * 3, None, r"vllm_xargs\.mit_embedding: this server serves no MiT adapter.*MIT_VLLM_ADAPTER"),
        ("0.1,0.2", 2, r"vllm_xargs\.mit_embedding must be a list of 2 numbers, got str"),
        ([0.0] * 3, 4, r"must hold 4 numbers \(the adapter's modality_dim\), got 3"),
        ([0.0, "1"], 2, r"vllm_xargs\.mit_embedding\[1\] must be a number, got str '1'"),
        ([True, 0.0], 2, r"vllm_xargs\.mit_embedding\[0\] must be a number, got bool"),
        ([0.0, math.nan], 2, r"vllm_xargs\.mit_embedding\[1\] must be finite, got nan"),
        ([-math.inf, 0.0], 2, r"vllm_xargs\.mit_embedding\[0\] must be finite, got -inf"),
        ([1e39, 0.0], 2, r"overflows float32"),
    ],
)
def test_bad_embeddings_name_the_field(value, dim, message):
    with pytest.raises(ValueError, match=message):
        parse_embedding({"mit_embedding": value}, dim)


def test_salt_separates_embeddings_bit_for_bit():
    a = torch.randn(5)
    b = a.clone()
    b[2] = torch.nextafter(b[2], torch.tensor(math.inf))
    assert embedding_salt(a) == embedding_salt(a.clone())
    assert embedding_salt(a) != embedding_salt(b)
