"""FLOPs of MiT against prefix concatenation on LLaMA-2-7B + CLIP ViT-L/14-336, counted on the meta device.

Models (built on the meta device: no weights, no memory, nothing computed):
  LLM    LLaMA-2-7B shapes: hidden 4096, 32 layers, 32 heads (MHA), d_ff 11008, vocab 32000, sdpa attention.
  tower  CLIP ViT-L/14-336: 336x336 image, 14x14 patches -> 576 patch tokens + CLS, 24 layers, width 1024, 16 heads,
         MLP 4096, projection to 768. Built with transformers' ``CLIPVisionModelWithProjection`` (the architecture of
         openai/clip-vit-large-patch14-336, the tower LLaVA-1.5 loads; open_clip's ViT-L-14-336 is the same network).
         open_clip is not used: its dependency torchvision is published on PyPI only as a CUDA build, which does not
         import with the CPU build of torch this project runs with on machines without a GPU.
Methods (batch 1, text of L tokens, next-token loss on the text):
  mit        the tower's image embedding (768) infused by ``mit.apply_mit`` into layers 12, 16, 20, 24, 28, 31 (the
             paper's), base frozen, the infusion maps trained; the LLM attends over the L text tokens only.
  prefix     the tower's 576 patch tokens (penultimate layer, LLaVA's choice) through a trainable
             ``nn.Linear(1024, 4096)`` projector, prepended to the text: the LLM attends over 576 + L tokens. Logits
             are computed at the text positions only (LLaVA computes them at every position: 576 x 2 x 4096 x 32000
             = 0.15 TFLOPs more in the forward; we give prefix concatenation the cheaper variant).
  neural     neural tuning (``mit.apply_neural_tuning``, the reference run's settings: task neurons in layers 16 ... 31,
             r = 128, targets qv, rho0 = 0.4, alpha = 0.2) with its image tokens: the tower's 576 patch tokens (as for
             prefix) through its trainable image projection ``nt_image_projection`` (Linear(1024, 4096)), placed
             before the text: the LLM attends over 576 + L tokens, as for prefix, and adds per adapted layer and token
             ``W_z`` (4096 -> 128) and ``W_b`` (128 -> 4096 + 4096); logits at the text positions only (as prefix).
             The top-k threshold (kthvalue), the RMSNorm over the neurons and the ReLU are elementwise: not counted.
  text_only  the LLM on the text alone, no image, training the RMSNorm weights of MiT's layers (a tiny tunable set
             at the same depth, so its backward covers the same layers as MiT's; as in memory_vs_seqlen.py).

Counting method (so the numbers can be reconciled with others):
- ``torch.utils.flop_counter.FlopCounterMode``: matrix products (mm, addmm, bmm, convolution, attention) only, a
  multiply-add = 2 FLOPs. Elementwise work (norms, activations, softmax, rotary, the loss) is not counted, except
  MiT's fused FFN gate, whose registered formula counts its elementwise work (6 B L d_ff forward, 15 backward; < 0.1%).
- Attention is counted dense: the causal half is NOT subtracted (torch's convention for sdpa; our fused MiT attention
  ops follow it: 4 B H Lq Lk D forward, 10 B H Lq Lk D backward). On the meta device the LLM's sdpa decomposes into
  bmm (same 4 B H Lq Lk D forward; 8 backward, since the math path keeps its probabilities instead of recomputing).
- MiT's layers run our fused ops (``mit_kernels::attention_triton_fwd`` / ``ffn_gate_triton_fwd``, what backend="auto"
  runs on a GPU; on the meta device they run their registered fake kernels) and are counted through their registered
  FLOP formulas: the ``mit_op_*`` columns are those counts, which are therefore not zero.
- fwd = forward of tower + LLM (+ projector / infusion maps). fwd_bwd adds one backward pass that computes the
  gradients of the trainable parameters only: the tower and the base LLM are frozen, so the tower has no backward at
  all, frozen linear layers compute only their input gradient, and the backward stops at the lowest layer whose
  output leads to a trainable parameter (layer 12 for MiT; the input for prefix concatenation and neural tuning, whose
  projectors sit below layer 0). Optimizer updates are not counted.

The paper (Table 1) gives 0.47 TFLOPs for MiT with LLaMA2-7B and 10.24 / 6.65 for LISA / PixelLM (LLaMA2-13B, with
SAM or their own decoders) as "overall computation requirement", without stating length, pass or convention; the
printed summary shows what 0.47 corresponds to under our count (forward, and in multiply-adds). LISA and PixelLM are
not the same work (13B LLM, segmentation decoders): the like-for-like baseline here is prefix concatenation on 7B.

Writes benchmarks/results/flops.csv and flops.png and prints a table.

    python benchmarks/flops.py            # L = 16 ... 512, seconds
    python benchmarks/flops.py --quick    # L = 16, 64
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import pathlib
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, LlamaConfig, LlamaForCausalLM

import mit
import mit_kernels
import mit_kernels.dispatch
from mit.utils.results import add_out_argument, output_csv, pyplot, write_csv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("mit", "prefix", "neural", "text_only")
NEURAL = {"rank": 128, "sparsity": 0.4, "alpha": 0.2, "start_layer": 16, "targets": "qv"}  # the reference run
PAPER_TFLOPS = {"MiT (paper, LLaMA2-7B)": 0.47, "LISA (LLaMA2-13B)": 10.24, "PixelLM (LLaMA2-13B)": 6.65}
TOWER = "CLIP ViT-L/14-336 (transformers CLIPVisionModelWithProjection, meta)"
CONVENTION = "FlopCounterMode; multiply-add=2; matmuls only; dense causal; frozen tower fwd only"

LLAMA2_7B = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "hidden_act": "silu",
}  # fmt: skip
CLIP_VIT_L14_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
}  # fmt: skip


@contextlib.contextmanager
def meta_device_patches():
    """What counting on the meta device needs, undone on exit.

    - transformers' ``find_packed_sequence_indices`` calls ``.item()`` (impossible on meta); with no padding mask and
      consecutive positions it returns None ("not packed"), which is what it returns here.
    - neural tuning's forward builds an all-ones padding mask for the image + text sequence (no padding here);
      transformers' ``fast_all`` (``.sum() == numel``, compared with ``if``) cannot decide it on meta: it is True.
    - MiT's backend="auto" picks Triton on CUDA and C++ on CPU, and rejects the meta device; route it to the fused
      Triton custom ops, whose fake kernels run on meta and whose FLOP formulas the counter uses (what a GPU runs).
    """
    import transformers.masking_utils as masking_utils

    saved = (masking_utils.find_packed_sequence_indices, mit_kernels.backends.resolve, masking_utils.fast_all)
    resolve, fast_all = saved[1], saved[2]
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    masking_utils.fast_all = lambda t: True if t.device.type == "meta" else fast_all(t)
    mit_kernels.backends.resolve = lambda b, d, head_dim=None: "triton" if d.type == "meta" else resolve(b, d, head_dim)
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices, mit_kernels.backends.resolve, masking_utils.fast_all = saved


def build(method: str, llm_shapes: dict, tower_shapes: dict):
    """(llm, tower, projector or None, trainable parameters) on the meta device, base and tower frozen."""
    with torch.device("meta"):
        config = LlamaConfig(**llm_shapes)
        config._attn_implementation = "sdpa"
        llm = LlamaForCausalLM(config)
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**tower_shapes))
        projector = torch.nn.Linear(tower_shapes["hidden_size"], llm_shapes["hidden_size"])
    tower.requires_grad_(False)
    llm.requires_grad_(False)
    if method == "mit":
        mit.apply_mit(llm, mit.MiTConfig(modality_dim=tower_shapes["projection_dim"]))  # paper's layers for 32
        return llm, tower, None, [p for _, p in llm.mit_named_parameters()]
    if method == "prefix":
        return llm, tower, projector, list(projector.parameters())
    if method == "neural":
        config = mit.NeuralTuningConfig(**NEURAL, image_dim=tower_shapes["hidden_size"])
        mit.apply_neural_tuning(llm, config)  # freezes the base
        return llm, tower, None, [p for _, p in llm.neural_named_parameters()]
    layers = [llm.model.layers[i] for i in mit.default_layers(llm_shapes["num_hidden_layers"])]
    norms = [n.weight for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for p in norms:
        p.requires_grad_(True)
    return llm, None, None, norms


def _mit_op_flops(counter: FlopCounterMode) -> int:
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mit_kernels" in str(op))


def count(method: str, length: int, batch: int, llm_shapes: dict, tower_shapes: dict) -> dict:
    """FLOPs of the tower forward, the LLM forward and the backward for one method and text length."""
    llm, tower, projector, trainable = build(method, llm_shapes, tower_shapes)
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    side = tower_shapes["image_size"]
    pixels = torch.zeros(batch, 3, side, side, device="meta")
    patches = (side // tower_shapes["patch_size"]) ** 2
    with FlopCounterMode(display=False) as tower_counter:
        if method == "mit":
            image = tower(pixel_values=pixels).image_embeds  # (B, 768): the global embedding MiT infuses
        elif method in ("prefix", "neural"):
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            image = hidden[-2][:, 1:]  # (B, 576, 1024): LLaVA's patch features (penultimate layer, no CLS)
    with FlopCounterMode(display=False) as forward_counter:
        if method == "mit":
            logits = llm(input_ids=ids, modality_embedding=image).logits
        elif method == "prefix":
            embeds = torch.cat([projector(image), llm.model.embed_tokens(ids)], dim=1)
            logits = llm(inputs_embeds=embeds, logits_to_keep=length).logits
        elif method == "neural":  # the image tokens go through nt_image_projection, before the text
            logits = llm(input_ids=ids, image_features=image, logits_to_keep=length).logits
        else:
            logits = llm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    backward = 0
    mit_bwd = 0
    if trainable:
        with FlopCounterMode(display=False) as backward_counter:
            torch.autograd.grad(loss, trainable)
        backward, mit_bwd = backward_counter.get_total_flops(), _mit_op_flops(backward_counter)
    tower_fwd = tower_counter.get_total_flops()
    llm_fwd = forward_counter.get_total_flops()
    return {
        "method": method,
        "text_len": length,
        "image_tokens": patches if method in ("prefix", "neural") else 0,
        "llm_tokens": length + (patches if method in ("prefix", "neural") else 0),
        "tower_fwd": tower_fwd,
        "llm_fwd": llm_fwd,
        "fwd": tower_fwd + llm_fwd,
        "bwd": backward,
        "fwd_bwd": tower_fwd + llm_fwd + backward,
        "mit_op_fwd": _mit_op_flops(forward_counter),
        "mit_op_bwd": mit_bwd,
        "trainable_params": sum(p.numel() for p in trainable),
    }


def run(args) -> list[dict]:
    jobs = [(m, n) for n in args.lengths for m in METHODS]
    rows = []
    with meta_device_patches():
        for method, length in tqdm(jobs, desc="flops (meta)", unit="config"):
            rows.append(count(method, length, args.batch, LLAMA2_7B, CLIP_VIT_L14_336))
    for r in rows:
        r |= {
            "batch": args.batch,
            "llm": "LLaMA-2-7B shapes",
            "image_tower": TOWER if r["method"] != "text_only" else "",
        }
        r["convention"] = CONVENTION
    prefix = {r["text_len"]: r for r in rows if r["method"] == "prefix"}
    for r in rows:
        p = prefix.get(r["text_len"])
        r["fwd_vs_prefix"] = r["fwd"] / p["fwd"] if p else ""
        r["fwd_bwd_vs_prefix"] = r["fwd_bwd"] / p["fwd_bwd"] if p else ""
    return rows


FIELDS = [
    "method", "text_len", "image_tokens", "llm_tokens", "batch", "tower_fwd", "llm_fwd", "fwd", "bwd", "fwd_bwd",
    "mit_op_fwd", "mit_op_bwd", "trainable_params", "fwd_vs_prefix", "fwd_bwd_vs_prefix", "llm", "image_tower",
    "convention",
]  # fmt: skip


def length_matching(rows: list[dict], key: str, target: float, scale: float = 1.0) -> str:
    """The text length at which MiT's ``key`` (times ``scale``) reaches ``target`` FLOPs, interpolated linearly."""
    pts = sorted((r["text_len"], r[key] * scale) for r in rows if r["method"] == "mit")
    if not pts:
        return "n/a"
    if target < pts[0][1]:
        return f"< {pts[0][0]} (already {pts[0][1] / 1e12:.2f} T at L={pts[0][0]})"
    for (l0, f0), (l1, f1) in itertools.pairwise(pts):
        if f0 <= target <= f1:
            return f"~{l0 + (target - f0) / (f1 - f0) * (l1 - l0):.0f}"
    return f"> {pts[-1][0]}"


def print_table(rows: list[dict]) -> None:
    t = 1e12
    header = f"{'L':>5} {'method':10} {'tokens':>6} {'tower fwd':>10} {'LLM fwd':>9} {'fwd':>8} {'fwd+bwd':>8} "
    header += f"{'MiT ops f/b (GFLOPs)':>21} {'fwd/prefix':>10} {'fwd+bwd/prefix':>14}"
    print(f"\nTFLOPs ({CONVENTION})")
    print(header)
    print("-" * len(header))
    for r in rows:
        ops = f"{r['mit_op_fwd'] / 1e9:.2f}/{r['mit_op_bwd'] / 1e9:.2f}" if r["method"] == "mit" else ""
        print(
            f"{r['text_len']:>5} {r['method']:10} {r['llm_tokens']:>6} {r['tower_fwd'] / t:10.3f} "
            f"{r['llm_fwd'] / t:9.3f} {r['fwd'] / t:8.3f} {r['fwd_bwd'] / t:8.3f} {ops:>21} "
            f"{r['fwd_vs_prefix']:10.3f} {r['fwd_bwd_vs_prefix']:14.3f}"
        )
    target = PAPER_TFLOPS["MiT (paper, LLaMA2-7B)"] * t
    tower = next((r["tower_fwd"] for r in rows if r["method"] == "mit"), 0)
    lines = [
        "Reconciling the paper's 0.47 TFLOPs for MiT (LLaMA2-7B + CLIP ViT-L/14-336): the text length L at which",
        "our count reaches it",
        f"  MiT forward, multiply-add = 2 FLOPs:       L {length_matching(rows, 'fwd', target)}",
        f"  MiT forward, in multiply-adds (FLOPs / 2): L {length_matching(rows, 'fwd', target, 0.5)}",
        f"  MiT forward + backward, FLOPs:            L {length_matching(rows, 'fwd_bwd', target)}",
        f"  the CLIP ViT-L/14-336 tower alone (forward): {tower / t:.3f} TFLOPs = {tower / 2 / t:.3f} T multiply-adds",
        "  LISA 10.24 and PixelLM 6.65 (paper's Table 1): 13B LLMs with segmentation decoders, not the same work.",
    ]
    print("\n" + "\n".join(lines))


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward + backward (training)")):
        for method in METHODS:
            pts = sorted((r["text_len"], r[key] / 1e12) for r in rows if r["method"] == method)
            style = {"mit": "-", "prefix": "--", "neural": "-."}.get(method, ":")
            marker = "x" if method == "neural" else "o"  # neural lies 0.4% above prefix: keep both visible
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=method)
        for (name, value), color in zip(PAPER_TFLOPS.items(), ("tab:blue", "tab:red", "tab:purple")):
            ax.axhline(value, color=color, alpha=0.4, lw=1)
            ax.text(min(r["text_len"] for r in rows), value * 1.05, name, fontsize=7, color=color)
        lengths = sorted({r["text_len"] for r in rows})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set(xlabel="text length L (tokens)", ylabel="TFLOPs")
        ax.set_title(f"LLaMA-2-7B + CLIP ViT-L/14-336: {title}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("FlopCounterMode on meta; multiply-add = 2 FLOPs; dense causal; frozen tower forward only", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="two lengths (seconds)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = [16, 64]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    out = output_csv(args.out, RESULTS, "flops.csv")
    write_csv(rows, out, FIELDS)
    plot(rows, out.with_suffix(".png"))
    print_table(rows)
    seconds = time.perf_counter() - start
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {seconds:.0f} s (torch {torch.__version__})")
    return rows


if __name__ == "__main__":
    main()
