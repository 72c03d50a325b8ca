"""The OpenAI chat API's multimodal content for an MiT server: an ``image_embeds`` content part becomes the request's
MiT embedding.

vLLM's multimodal models take ``{"type": "image_embeds", "image_embeds": <base64>}`` content parts; an MiT model has
no multimodal processor (it adds no token to the prompt), so :class:`MiTContent`, an ASGI middleware added with
vLLM's own flag (``vllm serve ... --middleware mit.serving.openai_content.MiTContent``), rewrites a chat request
before vLLM reads it: the part is taken out of the message and its vector goes to ``vllm_xargs.mit_embedding``, where
the plugin validates it (:mod:`mit.serving.request_embedding`) like any other.

The part's value is what vLLM accepts for ``image_embeds``: base64 of a NumPy ``.npy`` file (read with
``allow_pickle=False``) or of a ``torch.save`` file (read with ``torch.load(weights_only=True)``: a crafted file runs
no code), holding a ``(modality_dim,)`` or ``(1, modality_dim)`` tensor; a JSON list of numbers is accepted too. One
embedding per request (MiT conditions a sample on one vector). A part that cannot be read is an HTTP 400 naming it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import torch

from .request_embedding import EMBEDDING_KEY

CHAT_PATHS = ("/v1/chat/completions",)
PART = "image_embeds"


def read_part(value: object) -> list[float]:
    """The embedding of one ``image_embeds`` part as a list of floats; ValueError naming the part otherwise."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"messages[].content[].{PART} must be base64 of a .npy / torch.save file or a list of numbers, got "
            f"{type(value).__name__}"
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"messages[].content[].{PART} is not valid base64") from None
    try:
        if data.startswith(b"\x93NUMPY"):
            tensor = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        else:
            tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as error:  # an unreadable or refused file (weights_only refuses anything but tensors)
        raise ValueError(
            f"messages[].content[].{PART} could not be read as a .npy or torch.save tensor: {error}"
        ) from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"messages[].content[].{PART} must hold a floating-point tensor, got {type(tensor).__name__}")
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ValueError(
            f"messages[].content[].{PART} must hold one embedding, shape (modality_dim,) or (1, modality_dim), got "
            f"{tuple(tensor.shape)}"
        )
    return tensor.to(torch.float64).tolist()


def rewrite_chat_request(body: dict) -> bool:
    """Move the ``image_embeds`` part of ``body``'s messages to ``vllm_xargs.mit_embedding`` in place; whether
    anything changed. ValueError naming the field for a part that cannot be read, or more than one embedding."""
    found: list[list[float]] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        kept = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == PART:
                found.append(read_part(part.get(PART)))
            else:
                kept.append(part)
        if len(kept) != len(content):
            message["content"] = kept
    if not found:
        return False
    extra = body.get("vllm_xargs")
    if extra is None:
        extra = body["vllm_xargs"] = {}
    if not isinstance(extra, dict):
        raise ValueError(f"vllm_xargs must be an object, got {type(extra).__name__}")
    if len(found) > 1 or EMBEDDING_KEY in extra:
        raise ValueError(
            f"a request carries one MiT embedding: got {len(found) + (EMBEDDING_KEY in extra)} (image_embeds parts and "
            f"vllm_xargs.{EMBEDDING_KEY} together)"
        )
    extra[EMBEDDING_KEY] = found[0]
    return True


class MiTContent:
    """ASGI middleware: chat requests' ``image_embeds`` parts -> ``vllm_xargs.mit_embedding`` (HTTP 400 with the
    reason when a part cannot be read); every other request passes through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in CHAT_PATHS:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # (the client went away)
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            changed = isinstance(parsed, dict) and rewrite_chat_request(parsed)
        except json.JSONDecodeError:
            changed = False  # vLLM answers malformed JSON itself
        except ValueError as error:
            await _bad_request(send, str(error))
            return
        if changed:
            body = json.dumps(parsed).encode()
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        if changed:
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay, send)


async def _bad_request(send, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": PART, "code": 400}})
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload.encode()})
