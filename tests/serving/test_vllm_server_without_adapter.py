"""The plugin installed, the plain base served (no MIT_VLLM_ADAPTER): requests with an embedding are refused with the
reason, the others are served by vLLM's own Llama. Runs where vLLM is installed (make test-serve), with the real
SmolLM2-135M; a module of its own so that make test-serve starts this server on one pytest-xdist worker while the other
starts the adapter's (test_vllm_server.py)."""

import base64
import io
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in their own environment "
                    "(make test-serve)")  # fmt: skip

from vllm_server_process import NEW_TOKENS, completion, launch, post, stop, wait_ready

MODALITY_DIM = 16  # the adapter of conftest.py


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
