"""Speed and peak memory of one MiT attention layer and of the FFN infusion gate, against plain attention.

Workloads
  training: forward, backward and forward+backward of one causal attention layer (all eight inputs need grad for
            MiT; q, k, v for plain attention), L = Lq = Lk.
  decode:   the generate() hot path: one query over a KV cache of Lk keys, forward only, no grad.
  static:   the same over a static KV cache of Lk slots of which the first --static-used hold keys (the key mask
            transformers passes at a static-cache decoding step): plain attention attends over every slot with the
            mask; MiT's C++ decode kernel reads only the slots in use.
Shapes: SmolLM2-135M (Hq 9, Hkv 3, D 64) and LLaMA-7B (H 32, D 128).

Methods
  sdpa:     plain attention without infusion (torch.nn.functional.scaled_dot_product_attention, GQA) — the floor.
  unfused:  MiT as a user would write it: eager PyTorch ops for the gate and the infusion, then SDPA.
  cpu:      our C++ backend (CPU only, when the extension is built).
  triton:   our Triton kernels (CUDA only).
  reference: mit_kernels.reference (explicit softmax; only up to --reference-max-len).

Median times from torch.utils.benchmark (triton.testing.do_bench on CUDA); peak memory from benchmarks/memory.py.
Writes benchmarks/results/attention_<device>.csv and .png and prints a table with ratios to sdpa.

    python benchmarks/bench_attention.py            # default sweep (~10 min on 2 CPU cores)
    python benchmarks/bench_attention.py --full     # LLaMA-7B training to L=4096, batches 1 and 4 (long)
    python benchmarks/bench_attention.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from memory import peak_memory_bytes

import mit_kernels
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv
from mit_kernels.reference import mit_attention_reference, mit_ffn_gate_reference

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"smollm2": (9, 3, 64), "llama7b": (32, 32, 128)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu{torch.get_num_threads()}t"


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    import torch.utils.benchmark as tb

    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """torch's ``is_causal`` is top-left aligned; the bottom-right causal mask MiT uses is the same only when
    Lq == Lk. For decoding (Lq = 1 over a cache) every key is visible: no mask at all."""
    if causal and q.shape[2] not in (1, k.shape[2]):
        raise ValueError(f"this benchmark runs Lq == Lk (training) or Lq == 1 (decode), got Lq={q.shape[2]}")
    return causal and q.shape[2] == k.shape[2]


def sdpa(q, k, v, causal: bool, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention (GQA); ``kv_mask`` (B, Lk) bool as the (B, 1, 1, Lk) mask transformers gives sdpa."""
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=sdpa_causal(q, k, causal), enable_gqa=True)


def unfused_mit(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=True, kv_mask=None):
    """MiT written with eager PyTorch ops: gate, infused K/V materialised, then SDPA with GQA."""
    cos = F.cosine_similarity(v.float(), v_add.float()[:, :, None, :], dim=-1, eps=1e-8)
    gate = torch.sigmoid(head_logit.float()[None, :, None] + cos)[..., None].to(q.dtype)
    k_inf = k + gate * (k * k_mul[:, :, None, :] + k_add[:, :, None, :])
    v_inf = v + gate * (v * v_mul[:, :, None, :] + v_add[:, :, None, :])
    return sdpa(q, k_inf, v_inf, causal, kv_mask)


def attention_methods(device: torch.device, length: int, reference_max_len: int) -> dict[str, Callable]:
    """Each method as ``fn(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, causal=..., kv_mask=None)``."""
    methods: dict[str, Callable] = {
        "sdpa": lambda q, k, v, *rest, causal, kv_mask=None: sdpa(q, k, v, causal, kv_mask),
        "unfused": lambda *xs, causal, kv_mask=None: unfused_mit(*xs, causal=causal, kv_mask=kv_mask),
    }
    if device.type == "cpu" and "cpu" in mit_kernels.BACKENDS and mit_kernels.resolve_backend("auto", device) == "cpu":
        methods["cpu"] = lambda *xs, causal, kv_mask=None: mit_kernels.mit_attention(
            *xs, causal=causal, kv_mask=kv_mask, backend="cpu"
        )
    if device.type == "cuda":
        methods["triton"] = lambda *xs, causal, kv_mask=None: mit_kernels.mit_attention(
            *xs, causal=causal, kv_mask=kv_mask, backend="triton"
        )
    if length <= reference_max_len:
        methods["reference"] = lambda *xs, causal, kv_mask=None: mit_attention_reference(
            *xs, causal=causal, kv_mask=kv_mask
        )
    return methods


def make_inputs(batch, hq, hkv, lq, lk, d, dtype, device, requires_grad):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        x = (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
        return x.requires_grad_(requires_grad)

    q, k, v = rand(batch, hq, lq, d), rand(batch, hkv, lk, d), rand(batch, hkv, lk, d)
    vectors = [rand(batch, hkv, d, scale=0.1) for _ in range(4)]
    head_logit = torch.ones(hkv, device=device, requires_grad=requires_grad)
    return [q, k, v, *vectors, head_logit]


def bench_training(name, fn, inputs, device, min_run_time) -> list[dict]:
    """Forward, backward (from a saved forward) and forward+backward times, and fwd+bwd peak memory."""
    # Plain attention trains nothing of its own: give it grads for q, k, v only (its inputs that carry grad).
    leaves = inputs if name != "sdpa" else inputs[:3]

    def forward():
        return fn(*inputs, causal=True)

    def forward_backward():
        out = forward()
        torch.autograd.grad(out, leaves, grad_outputs=grad)

    grad = torch.randn_like(forward())
    saved = {"out": forward()}  # one forward graph, reused by every backward timing

    def backward():
        torch.autograd.grad(saved["out"], leaves, grad_outputs=grad, retain_graph=True)

    rows = []
    for stage, f in (("fwd", forward), ("bwd", backward), ("fwd+bwd", forward_backward)):
        rows.append({"stage": stage, "seconds": median_seconds(f, device, min_run_time)})
    saved.clear()
    peak = peak_memory_bytes(forward_backward, device)
    for row in rows:
        row["peak_mb"] = peak / 2**20 if row["stage"] == "fwd+bwd" else ""
    return rows


def bench_decode(fn, inputs, device, min_run_time, kv_mask: torch.Tensor | None = None) -> dict:
    def forward():
        with torch.no_grad():
            return fn(*inputs, causal=True, kv_mask=kv_mask)

    return {"stage": "decode", "seconds": median_seconds(forward, device, min_run_time), "peak_mb": ""}


def static_cache_mask(batch: int, slots: int, used: int, device: torch.device) -> torch.Tensor:
    """(B, slots) bool: the first ``used`` slots of a static KV cache hold keys (True), the rest are masked."""
    mask = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    mask[:, :used] = True
    return mask


def bench_ffn(device, dtype, batch, length, d_ff, min_run_time) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(batch, length, d_ff, generator=gen).to(dtype).to(device).requires_grad_() for _ in "gu")
    ffn_mul = (0.1 * torch.randn(batch, d_ff, generator=gen)).to(dtype).to(device).requires_grad_()
    rows = []
    for method, fn in (
        ("eager", mit_ffn_gate_reference),
        ("fused", lambda *xs: mit_kernels.mit_ffn_gate(*xs, backend="auto")),
    ):
        grad = torch.randn(batch, length, d_ff, dtype=dtype, device=device)

        def fwd_bwd(fn=fn, grad=grad):
            torch.autograd.grad(fn(gate, up, ffn_mul), (gate, up, ffn_mul), grad_outputs=grad)

        seconds = median_seconds(fwd_bwd, device, min_run_time)
        peak = peak_memory_bytes(fwd_bwd, device) / 2**20
        rows.append(
            {"workload": "ffn_gate", "shape": f"F{d_ff}", "batch": batch, "lq": length, "lk": "", "method": method}
            | {"stage": "fwd+bwd", "seconds": seconds, "peak_mb": peak}
        )
    return rows


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    jobs = []
    for shape in args.shapes:
        for length in args.train_lengths:
            if shape == "llama7b" and length > args.llama7b_max_len:
                continue
            jobs.append(("training", shape, length, length))
        for lk in args.decode_lengths:
            jobs.append(("decode", shape, 1, lk))
        for lk in args.decode_lengths:
            if lk > args.static_used:
                jobs.append(("static", shape, 1, lk))
    rows: list[dict] = []
    for workload, shape, lq, lk in tqdm(jobs, desc="attention", unit="config"):
        hq, hkv, d = SHAPES[shape]
        for batch in args.batches:
            training = workload == "training"
            inputs = make_inputs(batch, hq, hkv, lq, lk, d, dtype, device, requires_grad=training)
            for method, fn in attention_methods(device, lk, args.reference_max_len).items():
                base = {"workload": workload, "shape": shape, "batch": batch, "lq": lq, "lk": lk, "method": method}
                if training:
                    rows += [base | r for r in bench_training(method, fn, inputs, device, args.min_run_time)]
                elif workload == "static":
                    mask = static_cache_mask(batch, lk, args.static_used, device)
                    rows.append(
                        base | {"used": args.static_used} | bench_decode(fn, inputs, device, args.min_run_time, mask)
                    )
                else:
                    rows.append(base | bench_decode(fn, inputs, device, args.min_run_time))
    for length in args.train_lengths[:2]:
        rows += bench_ffn(device, dtype, 1, length, 1536, args.min_run_time)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """time_vs_sdpa / peak_vs_sdpa: each attention row against sdpa on the same workload, shape, sizes and stage
    (FFN rows against the eager gate)."""
    floor = {}
    for r in rows:
        if r["method"] in ("sdpa", "eager"):
            floor[(r["workload"], r["shape"], r["batch"], r["lq"], r["lk"], r["stage"])] = r
    for r in rows:
        f = floor.get((r["workload"], r["shape"], r["batch"], r["lq"], r["lk"], r["stage"]))
        r["time_vs_floor"] = r["seconds"] / f["seconds"] if f else ""
        has_mem = f and r["peak_mb"] != "" and f["peak_mb"] not in ("", 0)
        r["peak_vs_floor"] = r["peak_mb"] / f["peak_mb"] if has_mem else ""


FIELDS = ["workload", "shape", "batch", "lq", "lk", "used", "method", "stage", "seconds", "peak_mb"]
FIELDS += ["time_vs_floor", "peak_vs_floor"]


def print_table(rows: list[dict]) -> None:
    header = f"{'workload':9} {'shape':8} {'B':>2} {'Lq':>5} {'Lk':>5} {'stage':8} {'method':10} "
    header += f"{'ms':>10} {'x floor':>8} {'peak MB':>9} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['time_vs_floor']:.2f}" if r["time_vs_floor"] != "" else ""
        peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] != "" else ""
        peak_ratio = f"{r['peak_vs_floor']:.2f}" if r["peak_vs_floor"] != "" else ""
        print(
            f"{r['workload']:9} {r['shape']:8} {r['batch']:>2} {r['lq']!s:>5} {r['lk']!s:>5} {r['stage']:8} "
            f"{r['method']:10} {r['seconds'] * 1e3:10.2f} {ratio:>8} {peak:>9} {peak_ratio:>8}"
        )


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    panels = [("training", "fwd+bwd"), ("decode", "decode"), ("static", "decode")]
    panels = [p for p in panels if any(r["workload"] == p[0] for r in rows)]
    shapes = sorted({r["shape"] for r in rows if r["workload"] != "ffn_gate"})
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(5.5 * len(panels), 4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, (workload, stage) in enumerate(panels):
            ax = axes[i][j]
            sel = [r for r in rows if r["workload"] == workload and r["shape"] == shape and r["stage"] == stage]
            sel = [r for r in sel if r["batch"] == min(x["batch"] for x in sel)] if sel else sel
            for method in sorted({r["method"] for r in sel}):
                pts = sorted((r["lk"], r["seconds"] * 1e3) for r in sel if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            batch = sel[0]["batch"] if sel else ""
            xlabel = "sequence length (keys)" if workload != "static" else "static cache slots (keys in use: "
            xlabel += f"{sel[0]['used']})" if workload == "static" and sel else ""
            ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median ms")
            ax.set_title(f"{shape}, B={batch}: {workload} {stage}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--shapes", nargs="+", default=["smollm2", "llama7b"], choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1])
    p.add_argument("--train-lengths", nargs="+", type=int, default=[256, 1024, 2048, 4096])
    p.add_argument("--decode-lengths", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--static-used", type=int, default=256, help="keys in use in the static-cache decode workload")
    p.add_argument("--reference-max-len", type=int, default=1024)
    p.add_argument("--llama7b-max-len", type=int, default=1024, help="longest LLaMA-7B training length")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sweep for a smoke test (seconds)")
    p.add_argument("--full", action="store_true", help="LLaMA-7B training up to 4096 too, and batch 1 and 4")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.full:
        args.llama7b_max_len, args.batches = max(args.train_lengths), [1, 4]
    if args.quick:
        args.shapes, args.batches = ["smollm2"], [1]
        args.train_lengths, args.decode_lengths, args.static_used = [64, 128], [256], 64
        args.min_run_time, args.reference_max_len = 0.05, 128
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled Triton kernels on CUDA")
    rows = run(args)
    add_ratios(rows)
    out = output_csv(args.out, RESULTS, f"attention_{device_name(device)}.csv")
    write_csv(rows, out, FIELDS)
    plot(rows, out.with_suffix(".png"))
    print_table(rows)
    print(f"\nwrote {out} and {out.with_suffix('.png')} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return rows


if __name__ == "__main__":
    main()
