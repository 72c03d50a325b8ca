"""The OpenAI-compatible server (``vllm serve``) with an MiT adapter: concurrent HTTP requests with and without
embeddings answer as transformers' ``generate`` does, bad embeddings get HTTP 400 with the reason, and the server keeps
serving; an adapter of another model stops the server. Runs where vLLM is installed (make test-serve), with the real
SmolLM2-135M. (The plain base's server, without an adapter: test_vllm_server_without_adapter.py, which make test-serve
runs on another pytest-xdist worker at the same time.)"""

import base64
import concurrent.futures
import io
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in their own environment "
                    "(make test-serve)")  # fmt: skip

from vllm_server_process import NEW_TOKENS, STARTUP_S, completion, launch, post, stop, wait_ready

MODALITY_DIM = 16  # the adapter of conftest.py


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """``(url, model name)`` of a server of the base with the adapter."""
    base, adapter, _, _ = served
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    process, url = launch(base, adapter, log)
    try:
        wait_ready(process, url, log)
        yield url, str(base)
    finally:
        stop(process)


def test_concurrent_http_requests_equal_transformers_generate(server, served, reference):
    url, model = server
    _, _, _, tokenizer = served
    prompts = ["The capital of France is", "Once upon a time", "List three colours:", "def fib(n):",
               "The weather today is very", "In 1492,", "A cat and a dog", "Water boils at"]  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    embeddings = [None if i % 3 == 2 else torch.randn(MODALITY_DIM, generator=generator) * 3 for i in range(8)]
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda a: completion(url, model, *a), zip(prompt_ids, embeddings)))
    for (status, body), ids, embedding in zip(answers, prompt_ids, embeddings):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == reference(ids, embedding, NEW_TOKENS)


def test_chat_completion_carries_the_embedding(server, served, reference):
    url, model = server
    _, _, _, tokenizer = served
    messages = [{"role": "user", "content": "What is in the picture?"}]
    embedding = torch.randn(MODALITY_DIM, generator=torch.Generator().manual_seed(4)) * 3
    body = {"model": model, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0,
            "return_token_ids": True, "vllm_xargs": {"mit_embedding": embedding.tolist()}}  # fmt: skip
    status, answer = post(url, "/v1/chat/completions", body)
    assert status == 200, answer
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert answer["choices"][0]["token_ids"] == reference(list(ids), embedding, NEW_TOKENS)


def test_chat_image_embeds_part_is_the_embedding(server, served, reference):
    """The OpenAI chat API's multimodal content: an ``image_embeds`` part (base64 of a torch.save tensor, vLLM's
    format) conditions the answer exactly as the same vector in vllm_xargs; an unreadable part is HTTP 400."""
    url, model = server
    _, _, _, tokenizer = served
    embedding = torch.randn(MODALITY_DIM, generator=torch.Generator().manual_seed(5)) * 3
    buffer = io.BytesIO()
    torch.save(embedding, buffer)
    part = {"type": "image_embeds", "image_embeds": base64.b64encode(buffer.getvalue()).decode()}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, part]}]
    body = {"model": model, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": True}
    status, answer = post(url, "/v1/chat/completions", body)
    assert status == 200, answer
    text_only = [{"role": "user", "content": "What is in the picture?"}]
    ids = tokenizer.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert answer["choices"][0]["token_ids"] == reference(list(ids), embedding, NEW_TOKENS)
    part["image_embeds"] = "not base64!"
    status, answer = post(url, "/v1/chat/completions", body)
    assert status == 400 and "is not valid base64" in json.dumps(answer)


@pytest.mark.parametrize(
    ("embedding", "reason"),
    [
        ([0.5] * 3, "must hold 16 numbers (the adapter's modality_dim), got 3"),
        ("0.5", "must be a list of 16 numbers, got str"),
        ([0.5] * 15 + [1e39], "overflows float32"),
    ],
)
def test_bad_embedding_is_http_400_and_the_server_keeps_serving(server, served, reference, embedding, reason):
    url, model = server
    _, _, _, tokenizer = served
    ids = tokenizer("Hello").input_ids
    status, body = completion(url, model, ids, embedding)
    assert status == 400, body
    assert reason in json.dumps(body)
    status, body = completion(url, model, ids, None)
    assert status == 200 and body["choices"][0]["token_ids"] == reference(ids, None, NEW_TOKENS)


def test_nan_embedding_is_http_400(server, served):
    """JSON has no NaN; Python's json writes the bare token NaN, which the server must refuse, not run."""
    url, model = server
    _, _, _, tokenizer = served
    status, body = completion(url, model, tokenizer("Hello").input_ids, [float("nan")] * MODALITY_DIM)
    assert status == 400, body


def test_adapter_of_another_base_stops_the_server_saying_why(served, tmp_path):
    """An adapter saved from another model (here: a 2-layer Llama of another width) is refused when the server builds
    the model: the process exits, and its log names the adapter's file and the mismatch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import mit

    base, _, _, _ = served
    other = mit.apply_mit(LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)),
                          mit.MiTConfig(modality_dim=MODALITY_DIM))  # fmt: skip
    mit.save_adapter(other, tmp_path / "adapter")
    process, _ = launch(base, tmp_path / "adapter", tmp_path / "vllm.log")
    try:
        assert process.wait(timeout=STARTUP_S) != 0
    finally:
        stop(process)
    log = (tmp_path / "vllm.log").read_text()
    assert "mit_config.json: the adapter at" in log
    assert "was saved from a model of another shape" in log and "hidden_size: adapter 64 vs model 576" in log
