"""The chat API's ``image_embeds`` content parts -> the request's MiT embedding (mit.serving.openai_content; no vLLM
needed): the ASGI middleware's rewrite, its refusals, and that a crafted torch.save payload runs no code."""

import asyncio
import base64
import io
import json
import pathlib

import numpy as np
import pytest
import torch

from mit.serving.openai_content import MiTContent, read_part, rewrite_chat_request


def b64_torch(obj) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def b64_npy(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def chat(part_value, **extra):
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"}, {"type": "image_embeds", "image_embeds": part_value}]}],
        **extra}  # fmt: skip


@pytest.mark.parametrize("encode", ["torch", "torch_row", "npy", "list"])
def test_part_becomes_the_embedding_exactly(encode):
    embedding = torch.randn(8)
    value = {"torch": lambda: b64_torch(embedding), "torch_row": lambda: b64_torch(embedding[None]),
             "npy": lambda: b64_npy(embedding.numpy()), "list": lambda: embedding.tolist()}[encode]()  # fmt: skip
    body = chat(value, vllm_xargs={"other": 1})
    assert rewrite_chat_request(body)
    got = body["vllm_xargs"]["mit_embedding"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), embedding)  # float32 values survive exactly
    assert body["vllm_xargs"]["other"] == 1
    assert body["messages"][0]["content"] == [{"type": "text", "text": "What is in the picture?"}]


def test_request_without_parts_is_untouched():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    before = json.dumps(body)
    assert not rewrite_chat_request(body)
    assert json.dumps(body) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (chat("not base64!"), "is not valid base64"),
        (chat(base64.b64encode(b"junk").decode()), "could not be read as a .npy or torch.save tensor"),
        (chat(b64_torch(torch.zeros(2, 3))), r"must hold one embedding.*got \(2, 3\)"),
        (chat(b64_torch(torch.zeros(3, dtype=torch.int64))), "must hold a floating-point tensor"),
        (chat(3.0), "must be base64 of a .npy / torch.save file or a list of numbers, got float"),
        (chat([0.0], vllm_xargs={"mit_embedding": [0.0]}), "a request carries one MiT embedding: got 2"),
    ],
)
def test_unreadable_parts_are_refused_naming_the_field(body, message):
    with pytest.raises(ValueError, match=message):
        rewrite_chat_request(body)


class Payload:
    """A pickle that would write a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "pwned"))


def test_crafted_torch_file_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    value = b64_torch({"x": Payload(str(marker))})
    with pytest.raises(ValueError, match="could not be read"):
        read_part(value)
    assert not marker.exists()


def run_middleware(body: bytes, path="/v1/chat/completions"):
    seen, sent = {}, []

    async def app(scope, receive, send):
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message["body"])
            more = message.get("more_body", False)
        seen["body"], seen["headers"] = b"".join(parts), dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]  # the body in two chunks, as a client may send it

    async def receive():
        data = chunks.pop(0)
        return {"type": "http.request", "body": data, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(MiTContent(app)(scope, receive, send))
    return seen, sent


def test_middleware_rewrites_chat_requests_for_vllm():
    embedding = torch.randn(4)
    seen, sent = run_middleware(json.dumps(chat(b64_torch(embedding))).encode())
    forwarded = json.loads(seen["body"])
    assert forwarded["vllm_xargs"]["mit_embedding"] == embedding.to(torch.float64).tolist()
    assert int(seen["headers"][b"content-length"]) == len(seen["body"])
    assert sent[0]["status"] == 200


def test_middleware_answers_400_and_passes_other_requests_through():
    seen, sent = run_middleware(json.dumps(chat("not base64!")).encode())
    assert "body" not in seen  # vLLM never sees it
    assert sent[0]["status"] == 400 and b"is not valid base64" in sent[1]["body"]
    body = json.dumps({"prompt": "x", "vllm_xargs": {"a": 1}}).encode()
    seen, sent = run_middleware(body, path="/v1/completions")
    assert seen["body"] == body and sent[0]["status"] == 200
