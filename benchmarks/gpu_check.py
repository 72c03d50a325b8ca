"""One prepared GPU check of the Triton kernels: parity, speed and memory, in one call of a few minutes.

Run from the source tree on one H100/H200 (nothing to build or install; the GPU image's own torch / Triton /
transformers are used):

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT      # writes CSV + PNG there, a summary table at the end
    python benchmarks/gpu_check.py --dry-run --out /tmp/x      # the same code on tiny shapes, CPU, Triton interpreter

0. Compile check (``python -m mit_kernels compile-check`` for the device's architecture, see
   :mod:`mit_kernels.compile_check`): every kernel's default tile compiled for this GPU, registers / spill / shared
   memory / tensor-core instructions beside a plain flash-attention kernel; its violations are listed in the
   summary. ``--dry-run`` compiles two cases for sm_90 in a subprocess (the dry run's kernels are the interpreter's).
1. Parity: the fused forward and all eight gradients (q, k, v, k_mul, k_add, v_mul, v_add, lambda) against the fp64
   reference, with flash-attention's rule (error <= 2x the same math run by the reference in the same precision, plus a
   floor of a few units of roundoff at the magnitude of the computation; token sums use the magnitude of their terms):
   bf16 / fp16 / fp32, D 64 and 128, GQA groups 1 / 4 / 8, causal with left padding and non-causal with random key
   masks, odd lengths, decode (Lq 1 over a long cache), L 8192, and a view whose offsets pass 2^31 elements.
2. Speed (``triton.testing.do_bench``, median): fused MiT; the exact SDPA fallback backend (``backend="sdpa"``, what
   ``auto`` runs where Triton cannot: the fused kernel must beat it to earn its place as the default); plain attention
   without infusion (SDPA, flash backend); the unfused way (eager infusion + SDPA); the official-code formulation
   (eager infusion + explicit softmax, as the reference). Forward, forward+backward and decode; bf16, D 128, 32 query
   heads, GQA 8, L 1k-16k. TFLOP/s count the causal half (flash-attention's convention: 2 B Hq L^2 D forward, x 2.5
   for the backward); ratios to plain.
3. Peak memory (``torch.cuda.max_memory_allocated`` above the inputs) of the same forward+backward, and of one training
   step of a few LLaMA-2-7B-shaped decoder layers (random weights, bf16): MiT vs prefix concatenation of 576 image
   tokens (LLaVA style, a trained projector).

Targets (as ratios from one run): fused forward+backward >= 0.9x plain flash attention's throughput, >= 4x the official
formulation's; decode <= 1.2x plain's time; memory linear in L.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import pathlib
import sys
import time

if "--dry-run" in sys.argv:  # the Triton kernels must be defined under the interpreter: set before mit_kernels loads
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from attention_cases import (  # noqa: E402  (the tests' input builders and tolerance rule)
    assert_within_low_precision_rule,
    make_attention_inputs,
    make_kv_mask,
    max_abs_err,
    reduction_magnitudes,
    run_attention,
)
from bench_attention import unfused_mit  # noqa: E402
from memory import peak_memory_bytes  # noqa: E402

import mit_kernels  # noqa: E402
from mit.utils.results import pyplot, write_csv  # noqa: E402
from mit_kernels.reference import mit_attention_reference  # noqa: E402

NAMES = ("out", "dq", "dk", "dv", "dk_mul", "dk_add", "dv_mul", "dv_add", "dlambda")


# --------------------------------------------------------------------------------------------------------------------
# 1. Parity
# --------------------------------------------------------------------------------------------------------------------


def parity_cases(dry: bool) -> list[dict]:
    """A covering set (every dtype, head dim, GQA group, mask kind, decode and a long sequence at least once) rather
    than the full cross product: each new combination compiles four kernels, and the check must fit in minutes."""
    low, mid, full = (
        (torch.float32, torch.float16, torch.float32) if dry else (torch.bfloat16, torch.float16, torch.float32)
    )
    d_small, d_large = (16, 32) if dry else (64, 128)
    groups = (1, 2, 2) if dry else (1, 4, 8)
    odd = 13 if dry else 257

    def case(name, dtype, d, group, lq, lk, causal=True, mask="left_pad", b=2, hkv=2):
        return dict(name=name, b=b, hkv=hkv, group=group, lq=lq, lk=lk, d=d, dtype=dtype, causal=causal, mask=mask)

    cases = [case("causal+left_pad", low, d, g, odd, odd) for d in (d_small, d_large) for g in groups]
    cases += [
        case("causal+left_pad", mid, d_large, groups[1], odd, odd),
        case("causal+left_pad", full, d_small, groups[0], odd, odd),
        case("noncausal+random_mask", low, d_large, groups[1], odd - 6, odd + 10, causal=False, mask="random"),
        case("decode", low, d_large, groups[2], 1, 37 if dry else 4099),
        # one query row: the split decode (GQA group as tile rows), over many splits, padding and mixed lengths
        case("decode", mid, d_small, groups[0], 1, 200 if dry else 20000, mask="random"),
        case("decode", full, d_large, groups[1], 1, 61 if dry else 777),
        case("decode", low, d_small, 16, 1, 45 if dry else 3001, b=3, hkv=1),
        case("decode", low, d_large, groups[1], 1, 90 if dry else 65537, b=1),
        case("long", low, d_large, groups[1], 33 if dry else 8192, 33 if dry else 8192, mask="none", b=1, hkv=1),
    ]
    return cases


def check_case(case: dict, device: torch.device) -> list[dict]:
    """Output and eight gradients of one case against the fp64 reference; one row per tensor."""
    dtype, hq = case["dtype"], case["hkv"] * case["group"]
    inputs = make_attention_inputs(case["b"], hq, case["hkv"], case["lq"], case["lk"], case["d"], dtype, device=device)
    kv_mask = make_kv_mask(case["b"], case["lk"], case["mask"], device=device)
    kwargs = {"causal": case["causal"], "kv_mask": kv_mask}
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(case["b"], hq, case["lq"], case["d"], generator=gen, dtype=torch.float64).to(device)
    got = run_attention(inputs, grad_out.to(dtype), "triton", **kwargs)
    low = run_attention(inputs, grad_out.to(dtype), "reference", **kwargs)
    inputs64 = [x.double() for x in inputs]
    ref64 = run_attention(inputs64, grad_out, "reference", **kwargs)
    magnitudes = [1.0, 1.0, 1.0, 1.0, *reduction_magnitudes(inputs64, grad_out, **kwargs)[3:]]
    rows = []
    for i, name in enumerate(NAMES):
        g, lo, r = (got[0], low[0], ref64[0]) if i == 0 else (got[1][i - 1], low[1][i - 1], ref64[1][i - 1])
        compute = dtype if name == "dlambda" else None
        try:
            assert_within_low_precision_rule(name, g, lo, r, magnitudes[i], compute_dtype=compute)
            ok, why = True, ""
        except AssertionError as exc:
            ok, why = False, str(exc)
        rows.append({
            "case": case["name"], "dtype": str(dtype).removeprefix("torch."), "B": case["b"], "Hq": hq,
            "Hkv": case["hkv"], "Lq": case["lq"], "Lk": case["lk"], "D": case["d"], "causal": case["causal"],
            "mask": case["mask"], "tensor": name, "error": max_abs_err(g, r), "reference_error": max_abs_err(lo, r),
            "passed": ok, "detail": why,
        })  # fmt: skip
    return rows


def guarded(check: functools.partial) -> list[dict]:
    """``check()``'s rows, or one failed row naming the case and the exception when it raises."""
    try:
        return check()
    except Exception as exc:  # a compile or launch failure on the GPU: record it, check the other cases
        case = check.args[0] if isinstance(check.args[0], dict) else {"name": "offsets>2^31"}
        return [{"case": case.get("name"), "dtype": str(case.get("dtype", "")).removeprefix("torch."),
                 "B": case.get("b"), "Hq": case.get("hkv", 0) * case.get("group", 0), "Hkv": case.get("hkv"),
                 "Lq": case.get("lq"), "Lk": case.get("lk"), "D": case.get("d"), "causal": case.get("causal"),
                 "mask": case.get("mask"), "tensor": "all", "error": float("nan"), "reference_error": float("nan"),
                 "passed": False, "detail": f"{type(exc).__name__}: {exc}"[:2000]}]  # fmt: skip


def check_offsets(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Forward and dq / dk / dv through q, k, v views whose head 2 starts at element 2^31 of one buffer (offsets that
    need 64 bits), against the references run on compact copies, with the same rule as the other cases."""
    h, length, d = 3, 64, 64
    buffer = torch.empty(2 * 2**30 + 3 * length * d + 64, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    views = []
    for i in range(3):
        view = buffer.as_strided((1, h, length, d), (0, 2**30, d, 1), storage_offset=i * length * d)
        view.copy_(torch.randn(1, h, length, d, generator=gen).to(dtype))
        views.append(view.requires_grad_())
    vectors = [(0.3 * torch.randn(1, h, d, generator=gen)).to(dtype).to(device) for _ in range(4)]
    lam = torch.ones(h, device=device)
    grad_out = torch.randn(1, h, length, d, generator=gen, dtype=torch.float64).to(device)
    out = mit_kernels.mit_attention(*views, *vectors, lam, backend="triton")
    got = [out, *torch.autograd.grad(out, views, grad_outputs=grad_out.to(dtype))]
    refs = []
    for ref_dtype in (dtype, torch.float64):
        compact = [x.detach().to(ref_dtype).clone().requires_grad_() for x in views]
        expected = mit_attention_reference(*compact, *[x.to(ref_dtype) for x in vectors], lam.to(ref_dtype))
        refs.append([expected, *torch.autograd.grad(expected, compact, grad_outputs=grad_out.to(ref_dtype))])
    rows = []
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, *refs):
        try:
            assert_within_low_precision_rule(name, g, lo, r)
            ok, why = True, ""
        except AssertionError as exc:
            ok, why = False, str(exc)
        rows.append({"case": "offsets>2^31", "dtype": str(dtype).removeprefix("torch."), "B": 1, "Hq": h, "Hkv": h,
                     "Lq": length, "Lk": length, "D": d, "causal": True, "mask": "none", "tensor": name,
                     "error": max_abs_err(g, r), "reference_error": max_abs_err(lo, r), "passed": ok,
                     "detail": why})  # fmt: skip
    del buffer, views
    return rows


# --------------------------------------------------------------------------------------------------------------------
# 2. Speed and 3. memory of one attention layer
# --------------------------------------------------------------------------------------------------------------------


def median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    # CPU: only the dry run (the Triton interpreter, tiny shapes), which checks the code, not the time: one run
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def plain_attention(q, k, v, *rest, causal=True):
    """Attention without infusion through torch's SDPA (flash backend on CUDA). torch's is_causal is top-left aligned,
    which equals MiT's bottom-right mask for Lq == Lk; a decode step (Lq = 1) attends to every cached key. K / V come
    un-repeated (GQA) when the flash backend takes ``enable_gqa``, else repeated beforehand (:func:`plain_inputs`)."""
    is_causal = causal and q.shape[2] == k.shape[2]
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)


def flash_takes_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return True
    q, kv = torch.zeros(1, 4, 16, 64, device=device, dtype=dtype), torch.zeros(1, 1, 16, 64, device=device, dtype=dtype)
    try:
        plain_attention(q, kv, kv)
    except RuntimeError:
        return False
    return True


def plain_inputs(inputs: list[torch.Tensor], gqa: bool) -> list[torch.Tensor]:
    """q, k, v for the plain baseline: K / V repeated to the query heads when the flash backend needs it."""
    q, k, v = inputs[:3]
    if gqa:
        return [q, k, v]
    group = q.shape[1] // k.shape[1]
    return [q] + [x.detach().repeat_interleave(group, dim=1).requires_grad_(x.requires_grad) for x in (k, v)]


METHODS = {
    "fused": lambda *xs, causal=True: mit_kernels.mit_attention(*xs, causal=causal, backend="triton"),
    "sdpa_backend": lambda *xs, causal=True: mit_kernels.mit_attention(*xs, causal=causal, backend="sdpa"),
    "plain_flash": plain_attention,
    "unfused": lambda *xs, causal=True: unfused_mit(*xs, causal=causal),
    "official": lambda *xs, causal=True: mit_attention_reference(*xs, causal=causal),
}


def speed_inputs(b, hq, hkv, lq, lk, d, dtype, device, grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device).requires_grad_(grad)

    vectors = [rand(b, hkv, d, scale=0.1) for _ in range(4)]
    lam = torch.ones(hkv, device=device, requires_grad=grad)
    return [rand(b, hq, lq, d), rand(b, hkv, lk, d), rand(b, hkv, lk, d), *vectors, lam]


def causal_flops(b, hq, lq, lk, d, backward: bool) -> float:
    """flash-attention's count with the causal half: 2 B Hq Lq Lk D forward (4 / 2); backward 2.5 x the forward."""
    forward = 4 * b * hq * lq * lk * d / (2 if lq == lk else 1)
    return forward * (3.5 if backward else 1.0)


def bench_layer(lengths, shape, dtype, device, official_max, progress, csv_path=None) -> list[dict]:
    """Rows of times and peak memory per method and length; rewritten to ``csv_path`` after each row."""
    b, hq, hkv, d = shape
    gqa = flash_takes_gqa(device, dtype)
    rows = []
    for length in lengths:
        for method, fn in METHODS.items():
            if method == "official" and length > official_max:
                continue
            inputs = speed_inputs(b, hq, hkv, length, length, d, dtype, device, grad=True)
            if method == "plain_flash":
                inputs = plain_inputs(inputs, gqa)
            leaves = inputs[:3] if method == "plain_flash" else inputs
            grad = torch.randn(b, hq, length, d, device=device, dtype=dtype)

            def fwd(fn=fn, inputs=inputs):
                with torch.no_grad():
                    return fn(*inputs)

            def fwd_bwd(fn=fn, inputs=inputs, leaves=leaves, grad=grad):
                torch.autograd.grad(fn(*inputs), leaves, grad_outputs=grad)

            row = {"method": method, "L": length, "fwd_ms": median_ms(fwd, device),
                   "fwd_bwd_ms": median_ms(fwd_bwd, device)}  # fmt: skip
            row["fwd_tflops"] = causal_flops(b, hq, length, length, d, False) / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = causal_flops(b, hq, length, length, d, True) / row["fwd_bwd_ms"] / 1e9
            row["peak_mib"] = peak_memory_bytes(fwd_bwd, device) / 2**20
            decode = speed_inputs(b, hq, hkv, 1, length, d, dtype, device, grad=False)
            if method == "plain_flash":
                decode = plain_inputs(decode, gqa)
            row["decode_ms"] = float("nan")  # the official formulation is not a decoder
            if method != "official":
                row["decode_ms"] = median_ms(lambda fn=fn, decode=decode: fn(*decode), device)
            rows.append(row)
            if csv_path is not None:
                write_csv(rows, csv_path)
            progress.update(1)
            del inputs, leaves, grad
    return rows


# --------------------------------------------------------------------------------------------------------------------
# 2b. Decode steps: the split decode (and its tiles) vs the per-query-head decode vs plain flash decoding
# --------------------------------------------------------------------------------------------------------------------


def graph_ms(fn, device: torch.device) -> float:
    """Median device time of ``fn`` replayed from a CUDA graph (no host launch cost: the kernels' own time); on CPU (the
    dry run) one host-timed run."""
    if device.type != "cuda":
        return median_ms(fn, device)
    import triton.testing

    fn()  # compile and allocate outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def decode_variants(dry: bool) -> dict[str, dict]:
    """Name -> what to patch in :mod:`mit_kernels.triton_attention` for it: the split decode at its default tile, at
    other tiles (D 128), and the per-query-head decode it replaced (the split decode switched off)."""
    from mit_kernels.triton_configs import TileConfig

    variants = {"split": {}, "per_head": {"DECODE_SPLIT_MAX_GROUP": 0}}
    if not dry:
        for block_n, warps, stages in ((16, 4, 2), (32, 4, 2), (64, 4, 2), (32, 8, 2)):
            tile = TileConfig(16, block_n, warps, stages)
            variants[f"split_{block_n}x{warps}w{stages}s"] = {"decode_tile": lambda d, g, i=False, t=tile: t}
    return variants


def bench_decode(shapes, lengths, dtype, device, progress, csv_path) -> list[dict]:
    """Per decode step (Lq = 1): host-timed (``do_bench``: what an eager generate loop pays) and graph-replayed (the
    kernels alone) medians of each variant and of plain flash decoding (SDPA's flash backend, no infusion); the
    split decode's output against the per-head decode's (max abs difference, both in ``dtype``)."""
    from mit_kernels import triton_attention

    rows = []
    dry = device.type != "cuda"
    for (b, hq, hkv, d), length in itertools.product(shapes, lengths):
        inputs = speed_inputs(b, hq, hkv, 1, length, d, dtype, device, grad=False)
        outputs = {}
        for variant, patch in decode_variants(dry).items():
            saved = {name: getattr(triton_attention, name) for name in patch}
            try:
                for name, value in patch.items():
                    setattr(triton_attention, name, value)

                def step(inputs=inputs):
                    return mit_kernels.mit_attention(*inputs, backend="triton")

                outputs[variant] = step()
                row = {"variant": variant, "B": b, "Hq": hq, "Hkv": hkv, "D": d, "L": length,
                       "host_ms": median_ms(step, device), "graph_ms": graph_ms(step, device), "error": ""}  # fmt: skip
            except Exception as exc:  # a tile that does not compile or launch here: a row saying so
                row = {"variant": variant, "B": b, "Hq": hq, "Hkv": hkv, "D": d, "L": length,
                       "host_ms": float("nan"), "graph_ms": float("nan"),
                       "error": f"{type(exc).__name__}: {exc}"[:300]}  # fmt: skip
            finally:
                for name, value in saved.items():
                    setattr(triton_attention, name, value)
            rows.append(row)
        plain = plain_inputs(inputs, flash_takes_gqa(device, dtype))

        def plain_step(plain=plain):
            return plain_attention(*plain)

        rows.append({"variant": "plain_flash", "B": b, "Hq": hq, "Hkv": hkv, "D": d, "L": length,
                     "host_ms": median_ms(plain_step, device), "graph_ms": graph_ms(plain_step, device),
                     "error": ""})  # fmt: skip
        for row in rows[-len(outputs) - 1 :]:
            row["kv_bytes"] = 2 * b * hkv * length * d * dtype.itemsize
            row["vs_plain_graph"] = row["graph_ms"] / rows[-1]["graph_ms"]
            row["max_diff_vs_per_head"] = (
                (outputs[row["variant"]].float() - outputs["per_head"].float()).abs().max().item()
                if row["variant"] in outputs and "per_head" in outputs else float("nan")
            )  # fmt: skip
        write_csv(rows, csv_path)
        progress.update(1)
        del inputs, plain, outputs
    return rows


def profile_host(device: torch.device, out: pathlib.Path, name: str) -> None:
    """torch.profiler of a fused forward + backward (L 1024) and a decode step (L 4096), bf16, D 128, 32 / 4 heads:
    the operators' host (CPU) time next to their device time, to tell launch and Python cost from kernel time."""
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.float32 if device.type != "cuda" else torch.bfloat16
    b, hq, hkv, d = (1, 4, 2, 16) if device.type != "cuda" else (1, 32, 4, 128)
    lines = []
    for label, length, lq, backward in (("fwd+bwd L=1024", 1024, None, True), ("decode L=4096", 4096, 1, False)):
        length = 32 if device.type != "cuda" else length
        inputs = speed_inputs(b, hq, hkv, lq or length, length, d, dtype, device, grad=backward)

        def run(inputs=inputs, backward=backward):
            out = mit_kernels.mit_attention(*inputs, backend="triton")
            if backward:
                torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out))

        calls = 10 if device.type == "cuda" else 1  # (the dry run checks the code, not the time)
        for _ in range(3 if device.type == "cuda" else 1):
            run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        lines += [f"== {label}, {calls} calls", prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)]
    (out / f"gpu_check_{name}_profile.txt").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# 3b. One training step of LLaMA-2-7B-shaped layers: MiT vs prefix concatenation
# --------------------------------------------------------------------------------------------------------------------


def training_step_memory(lengths, dims, layers, dtype, device, prefix_tokens) -> list[dict]:
    from transformers import LlamaConfig, LlamaModel

    import mit

    hidden, heads, inter = dims
    shape = {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads}
    config = LlamaConfig(vocab_size=256, num_hidden_layers=layers, num_key_value_heads=heads,
                         max_position_embeddings=9216, **shape)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaModel(config).to(device=device, dtype=dtype)
    base.set_attn_implementation("sdpa")
    base.requires_grad_(False)
    model = mit.apply_mit(base, mit.MiTConfig(modality_dim=768, layers=list(range(layers))))
    with torch.no_grad():
        for _, p in model.mit_named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    projector = torch.nn.Linear(1024, hidden, device=device, dtype=dtype)
    rows = []
    for length in lengths:
        ids = torch.randint(0, 256, (1, length), device=device)
        embedding = torch.randn(1, 768, device=device, dtype=dtype)
        patches = torch.randn(1, prefix_tokens, 1024, device=device, dtype=dtype)
        mit_params = [p for _, p in model.mit_named_parameters()]

        def mit_step(ids=ids, embedding=embedding, mit_params=mit_params):
            out = model(input_ids=ids, modality_embedding=embedding).last_hidden_state
            torch.autograd.grad(out.float().square().mean(), mit_params)

        def prefix_step(ids=ids, patches=patches):
            embeds = torch.cat([projector(patches), model.embed_tokens(ids)], dim=1)
            out = model(inputs_embeds=embeds).last_hidden_state[:, prefix_tokens:]
            torch.autograd.grad(out.float().square().mean(), list(projector.parameters()))

        for method, step in (("mit", mit_step), ("prefix", prefix_step)):
            step()  # first call: autotuning (its timing buffers) and compilation stay out of the peak
            rows.append({"method": method, "L": length, "layers": layers, "prefix_tokens": prefix_tokens,
                         "peak_mib": peak_memory_bytes(step, device) / 2**20,
                         "step_ms": median_ms(step, device)})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def plot(speed: list[dict], steps: list[dict], path: pathlib.Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method in METHODS:
        sub = [r for r in speed if r["method"] == method]
        if sub:
            ls = [r["L"] for r in sub]
            axes[0].plot(ls, [r["fwd_bwd_tflops"] for r in sub], "o-", label=method)
            axes[1].plot(ls, [r["peak_mib"] for r in sub], "o-", label=method)
    axes[0].set(xscale="log", xlabel="L", ylabel="TFLOP/s (causal count)", title="attention fwd+bwd throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="L", ylabel="peak MiB", title="attention fwd+bwd peak memory")
    for method in ("mit", "prefix"):
        sub = [r for r in steps if r["method"] == method]
        axes[2].plot([r["L"] for r in sub], [r["peak_mib"] for r in sub], "o-", label=method)
    axes[2].set(xscale="log", xlabel="text tokens L", ylabel="peak MiB", title="training step: MiT vs prefix (576)")
    step_lengths = sorted({r["L"] for r in steps})
    axes[2].set_xticks(step_lengths, [str(length) for length in step_lengths])
    axes[2].minorticks_off()
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(decode: list[dict], path: pathlib.Path, title: str) -> None:
    """Per decode shape: graph-replayed time per step over plain flash decoding's, against the cache length."""
    plt = pyplot()
    if plt is None or not decode:
        return
    shapes = list(dict.fromkeys((r["B"], r["Hq"], r["Hkv"], r["D"]) for r in decode))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in decode if (r["B"], r["Hq"], r["Hkv"], r["D"]) == shape]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sub = [r for r in rows if r["variant"] == variant]
            style = "o-" if variant in ("split", "per_head", "plain_flash") else ":"
            ax.plot([r["L"] for r in sub], [r["vs_plain_graph"] for r in sub], style, label=variant)
        ax.set(xscale="log", yscale="log", xlabel="cached keys L", ylabel="time / plain flash decoding",
               title=f"B{shape[0]} Hq{shape[1]}/Hkv{shape[2]} D{shape[3]}")  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle(f"decode step, kernels only (CUDA graph replay); {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(parity, speed, steps, header) -> list[str]:
    lines = [header]
    failed = [r for r in parity if not r["passed"]]
    lines.append(f"parity: {len(parity) - len(failed)}/{len(parity)} tensors within the rule")
    lines += [f"  FAIL {r['case']} {r['dtype']} D{r['D']} Hq{r['Hq']}/Hkv{r['Hkv']} {r['tensor']}: {r['detail']}"
              for r in failed[:8]]  # fmt: skip
    by = {(r["method"], r["L"]): r for r in speed}
    lines.append(f"{'L':>6} {'fused TF/s':>10} {'plain TF/s':>10} {'vs plain':>8} {'vs official':>11} "
                 f"{'vs sdpa':>8} {'decode/plain':>12} {'decode/sdpa':>11} {'fused MiB':>9}")  # fmt: skip
    for length in sorted({r["L"] for r in speed}):
        f, p, o = by.get(("fused", length)), by.get(("plain_flash", length)), by.get(("official", length))
        s = by.get(("sdpa_backend", length))
        vs_official = f"{o['fwd_bwd_ms'] / f['fwd_bwd_ms']:.2f}x" if o else "-"
        vs_sdpa = f"{s['fwd_bwd_ms'] / f['fwd_bwd_ms']:.2f}x" if s else "-"
        decode_sdpa = f"{f['decode_ms'] / s['decode_ms']:.2f}x" if s else "-"
        lines.append(f"{length:>6} {f['fwd_bwd_tflops']:>10.1f} {p['fwd_bwd_tflops']:>10.1f} "
                     f"{f['fwd_bwd_tflops'] / p['fwd_bwd_tflops']:>7.2f}x {vs_official:>11} {vs_sdpa:>8} "
                     f"{f['decode_ms'] / p['decode_ms']:>11.2f}x {decode_sdpa:>11} {f['peak_mib']:>9.0f}")  # fmt: skip
    for length in sorted({r["L"] for r in steps}):
        m = next(r for r in steps if r["L"] == length and r["method"] == "mit")
        p = next(r for r in steps if r["L"] == length and r["method"] == "prefix")
        lines.append(f"train step L={length}: MiT {m['peak_mib']:.0f} MiB {m['step_ms']:.1f} ms; prefix "
                     f"{p['peak_mib']:.0f} MiB {p['step_ms']:.1f} ms")  # fmt: skip
    lines.append(
        "targets: fused fwd+bwd >= 0.9x plain and >= 4x official throughput; decode <= 1.2x plain; "
        "fused faster than the sdpa backend (vs sdpa > 1x, decode/sdpa < 1x)"
    )
    return lines


def decode_summary(decode: list[dict]) -> list[str]:
    """One line per decode shape and length: each variant's graph-replayed time over plain flash decoding's, and the
    split decode's host-timed step."""
    if not decode:
        return []
    lines = ["decode (graph-replayed time / plain flash decoding; split host ms = an eager step):"]
    keys = dict.fromkeys((r["B"], r["Hq"], r["Hkv"], r["D"], r["L"]) for r in decode)
    for key in keys:
        rows = {r["variant"]: r for r in decode if (r["B"], r["Hq"], r["Hkv"], r["D"], r["L"]) == key}
        ratios = " ".join(f"{v}={r['vs_plain_graph']:.2f}x" for v, r in rows.items() if v != "plain_flash")
        plain = rows["plain_flash"]
        lines.append(f"  B{key[0]} Hq{key[1]}/Hkv{key[2]} D{key[3]} L{key[4]}: plain {plain['graph_ms'] * 1e3:.1f} us; "
                     f"{ratios}; split host {rows['split']['host_ms'] * 1e3:.0f} us")  # fmt: skip
    return lines


def compile_section(dry: bool, device: torch.device, out: pathlib.Path, name: str) -> list[str]:
    """Step 0: the compile check for this GPU's architecture (a two-case smoke run for sm_90 in a dry run, in a
    subprocess: the dry run's own kernels are the interpreter's). Writes its CSV; returns the summary lines."""
    import subprocess

    csv_path = out / f"gpu_check_{name}_compile.csv"
    if dry:
        arch, extra = 90, ["--limit", "2"]
    else:
        major, minor = torch.cuda.get_device_capability(device)
        arch, extra = major * 10 + minor, []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "mit_kernels", "compile-check", "--arch", str(arch), "--no-progress",
               "--csv", str(csv_path), *extra]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("Triton ", "- ", "No violations"))]
    return [f"compile check (sm_{arch}, exit {result.returncode}):", *[f"  {line}" for line in lines]] + (
        [f"  {result.stderr.strip().splitlines()[-1]}"] if result.returncode and result.stderr.strip() else []
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["compile", "parity", "decode", "speed", "steps", "profile"],
                        help="sections to skip")  # fmt: skip
    parser.add_argument("--parity-only", nargs="*", default=None, metavar="NAME",
                        help="run the parity cases whose name holds one of these (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    from tqdm import tqdm

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    import triton

    name = "dry-run-cpu" if dry else torch.cuda.get_device_name(device).replace(" ", "_")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{name}; torch {torch.__version__}; triton {triton.__version__}; {stamp}"
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    compile_lines = [] if "compile" in args.skip else compile_section(dry, device, args.out, name)
    parity: list[dict] = []
    os.environ["MIT_TRITON_AUTOTUNE"] = "0"  # parity checks the default tiles; every case would otherwise tune
    if "parity" not in args.skip:
        # one case that fails to compile or run is a failed row, not the end of the check; the CSV is rewritten after
        # every case, so a run stopped at its time limit keeps what it checked
        parity_csv = args.out / f"gpu_check_{name}_parity.csv"
        checks = [functools.partial(check_case, case, device) for case in parity_cases(dry)]
        # a 4 GiB buffer (on CPU: address space, only the touched rows are backed by memory)
        checks.append(functools.partial(check_offsets, device, torch.float16 if dry else torch.bfloat16))
        if args.parity_only is not None:  # a rerun of some cases (a lease too short for all of them)
            names = [c.args[0]["name"] if isinstance(c.args[0], dict) else "offsets>2^31" for c in checks]
            checks = [c for c, n in zip(checks, names) if any(part in n for part in args.parity_only)]
        for check in tqdm(checks, desc="parity"):
            parity += guarded(check)
            write_csv(parity, parity_csv)

    speed: list[dict] = []
    steps: list[dict] = []
    decode: list[dict] = []
    os.environ["MIT_TRITON_AUTOTUNE"] = "1"  # speed: the tiles a user gets
    if "speed" not in args.skip:
        lengths = [16, 32] if dry else [1024, 2048, 4096, 8192, 16384]
        shape = (1, 4, 2, 16) if dry else (1, 32, 4, 128)  # B, Hq, Hkv, D: GQA 8 on the GPU
        dtype = torch.float32 if dry else torch.bfloat16
        with tqdm(total=len(lengths) * len(METHODS), desc="speed") as progress:
            speed = bench_layer(lengths, shape, dtype, device, 32 if dry else 8192, progress,
                                args.out / f"gpu_check_{name}_speed.csv")  # fmt: skip
        for r in speed:
            r.update(device=name, dtype=str(dtype).removeprefix("torch."), B=shape[0], Hq=shape[1], Hkv=shape[2],
                     D=shape[3])  # fmt: skip
        write_csv(speed, args.out / f"gpu_check_{name}_speed.csv")
    if "decode" not in args.skip:
        shapes = [(1, 4, 2, 16), (2, 4, 1, 32)] if dry else [(1, 32, 8, 128), (8, 32, 8, 128), (1, 32, 4, 128),
                                                              (8, 32, 8, 64)]  # fmt: skip
        lengths = [40, 200] if dry else [1024, 4096, 16384, 65536]
        with tqdm(total=len(shapes) * len(lengths), desc="decode") as progress:
            decode = bench_decode(shapes, lengths, torch.float32 if dry else torch.bfloat16, device, progress,
                                  args.out / f"gpu_check_{name}_decode.csv")  # fmt: skip
    if "profile" not in args.skip:
        profile_host(device, args.out, name)
    if "steps" not in args.skip:
        lengths = [8, 16] if dry else [256, 1024, 4096]
        dims = (64, 4, 96) if dry else (4096, 32, 11008)  # LLaMA-2-7B: hidden 4096, 32 heads, d_ff 11008
        steps = training_step_memory(lengths, dims, 2, torch.float32 if dry else torch.bfloat16, device,
                                     8 if dry else 576)  # fmt: skip
        write_csv(steps, args.out / f"gpu_check_{name}_steps.csv")
    if speed and steps:
        plot(speed, steps, args.out / f"gpu_check_{name}.png", header)
    plot_decode(decode, args.out / f"gpu_check_{name}_decode.png", header)
    lines = summary(parity, speed, steps, header) if speed and steps else [header]
    lines += decode_summary(decode) + compile_lines
    from mit_kernels.triton_configs import tuned_configs

    for key, config in sorted(tuned_configs().items(), key=str):  # which tiles the autotuner chose (empty: dry run)
        lines.append(f"tuned {key}: {config}")
    lines.append(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    (args.out / f"gpu_check_{name}_summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(r["passed"] for r in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
