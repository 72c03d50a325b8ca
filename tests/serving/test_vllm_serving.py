"""vLLM serving an MiT adapter on the real SmolLM2-135M (offline engine, vLLM's CPU build).

These tests run in their own environment (``make test-serve``: vLLM's CPU build pins its own torch); where vLLM is
not installed they are skipped, saying so. Greedy completions are compared token for token with the transformers
MiT model's ``generate`` for the same prompts and embeddings, in fp32.
"""

import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here: the serving tests run in their own environment (make test-serve)"
)

from vllm.exceptions import VLLMValidationError  # noqa: E402

from mit.serving import ADAPTER_ENV  # noqa: E402
from mit.serving.vllm_internals import check_vllm_internals  # noqa: E402

MODALITY_DIM = 16  # the adapter of conftest.py
NEW_TOKENS = 10
PROMPTS = [
    "The capital of France is", "Once upon a time", "List three colours:", "def fib(n):",
    "The weather today is very", "In 1492,", "A cat and a dog", "Water boils at",
    "Translate to French: good morning", "The quick brown fox",
]  # fmt: skip


@pytest.fixture(scope="module")
def llm(served):
    """The offline engine serving base + adapter. At most 64 tokens per step: long prompts are prefilled in chunks
    (the 121-token prompt below in two), and steps mix one request's prefill chunk with others' decoding tokens."""
    base, adapter, _, _ = served
    os.environ[ADAPTER_ENV] = str(adapter)
    engine = vllm.LLM(model=str(base), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                      max_num_seqs=16, enable_prefix_caching=True, gpu_memory_utilization=0.2, block_size=32,
                      kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=64)  # fmt: skip
    yield engine
    del engine


def params(embedding):
    extra = None if embedding is None else {"mit_embedding": embedding.tolist()}
    return vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, extra_args=extra)


def served_tokens(llm, prompt_ids, embeddings):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], [params(e) for e in embeddings],
                        use_tqdm=False)  # fmt: skip
    return [list(o.outputs[0].token_ids) for o in outs]


def test_vllm_internals_the_plugin_relies_on_are_present():
    assert check_vllm_internals() == []


def test_batch_of_requests_equals_transformers_generate(served, llm, reference):
    _, _, _, tokenizer = served
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    generator = torch.Generator().manual_seed(1)
    embeddings = [None if i % 4 == 3 else torch.randn(MODALITY_DIM, generator=generator) * 3 for i in range(10)]
    got = served_tokens(llm, prompt_ids, embeddings)
    want = [reference(p, e, NEW_TOKENS) for p, e in zip(prompt_ids, embeddings)]
    assert got == want
    # the adapter changes the answers (so that equality above is evidence of the infusion, not of the base)
    base = [reference(p, None, NEW_TOKENS) for p, e in zip(prompt_ids, embeddings) if e is not None]
    infused = [w for w, e in zip(want, embeddings) if e is not None]
    assert sum(b != w for b, w in zip(base, infused)) >= len(infused) // 2


def test_concurrent_requests_never_mix_embeddings(served, llm, reference):
    """The same prompt with two embeddings, interleaved 8 times in one batch, and again with a long shared prompt
    (prefix-cache blocks: the second call must not reuse blocks cached for the other embedding)."""
    _, _, _, tokenizer = served
    generator = torch.Generator().manual_seed(2)
    first, second = (torch.randn(MODALITY_DIM, generator=generator) * 3 for _ in range(2))
    for prompt in ("Describe the picture:", "Tell me a long story about a lighthouse keeper. " * 12):
        ids = tokenizer(prompt).input_ids
        want = {0: reference(ids, first, NEW_TOKENS), 1: reference(ids, second, NEW_TOKENS)}
        assert want[0] != want[1]  # outputs that differ only through the embedding
        got = served_tokens(llm, [ids] * 16, [first, second] * 8)
        assert got == [want[i % 2] for i in range(16)]
        # one request alone after the other embedding's blocks were cached
        assert served_tokens(llm, [ids], [second]) == [want[1]]
        assert served_tokens(llm, [ids], [None]) == [reference(ids, None, NEW_TOKENS)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mit_embedding": [0.0] * 3}, r"must hold 16 numbers"),
        ({"mit_embedding": [float("nan")] * MODALITY_DIM}, r"mit_embedding\[0\] must be finite, got nan"),
        ({"mit_embedding": "x"}, r"must be a list of 16 numbers"),
    ],
)
def test_bad_embedding_is_refused_and_the_engine_keeps_serving(served, llm, reference, extra, message):
    _, _, _, tokenizer = served
    ids = tokenizer(PROMPTS[0]).input_ids
    with pytest.raises(VLLMValidationError, match=message):  # the OpenAI-compatible server answers it with HTTP 400
        llm.generate([{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    assert served_tokens(llm, [ids], [None]) == [reference(ids, None, NEW_TOKENS)]


def test_embedding_without_served_adapter_is_refused(served, llm, monkeypatch):
    _, _, _, tokenizer = served
    monkeypatch.delenv(ADAPTER_ENV)  # the front end now serves no adapter
    ids = tokenizer(PROMPTS[0]).input_ids
    with pytest.raises(VLLMValidationError, match="this server serves no MiT adapter"):
        llm.generate([{"prompt_token_ids": ids}], params(torch.zeros(MODALITY_DIM)), use_tqdm=False)
