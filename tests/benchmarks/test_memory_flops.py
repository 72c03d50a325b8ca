"""The benchmark scripts' --quick runs, checked on their CSVs: memory and FLOPs against prefix concatenation and neural
tuning, and the
attention speed/memory benchmark (only its exact memory numbers are asserted; times are never asserted in tests).

The scripts live in benchmarks/ (not in the package); they run as processes of their own against the installed
package, forked from one interpreter that imported torch, transformers and mit (the ``script_runs`` fixture,
tests/forked_runs.py)."""

from __future__ import annotations

import csv
import os
import pathlib

import pytest
import torch
from forked_runs import ForkServer

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(runs: ForkServer, script: str, out: pathlib.Path) -> list[dict]:
    """``script --quick --out out``: ``out`` a CSV path, or a directory (that need not exist) the script writes
    ``<script name>.csv`` into; its rows."""
    result = runs.run(["--quick", "--out", str(out)], timeout=300, script=BENCHMARKS / script)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if out.suffix != ".csv":
        out = out / pathlib.Path(script).with_suffix(".csv").name
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    with out.open() as f:
        return list(csv.DictReader(f))


def run_quick_once(
    runs: ForkServer, tmp_path_factory, script: str, name: str, into_new_directory: bool = False
) -> list[dict]:
    """:func:`run_quick` once per test session, whichever pytest-xdist worker asks first (the others wait for it and
    read its CSV): a module fixture is otherwise built again by every worker that gets one of its tests. Without
    ``fcntl`` (Windows) each worker runs it. ``into_new_directory``: ``--out`` names a directory that does not exist
    yet (every benchmark's --out is a directory, created as needed), not the CSV."""
    where = (lambda folder: folder / "results") if into_new_directory else (lambda folder: folder / f"{name}.csv")
    try:
        import fcntl
    except ImportError:
        return run_quick(runs, script, where(tmp_path_factory.mktemp(name)))
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by its workers
    folder = root / f"shared-{name}"
    out = where(folder) if not into_new_directory else where(folder) / pathlib.Path(script).with_suffix(".csv").name
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "complete").is_file():
            with out.open() as f:
                return list(csv.DictReader(f))
        folder.mkdir(exist_ok=True)
        rows = run_quick(runs, script, where(folder))
        (folder / "complete").write_text("")
        return rows


@pytest.fixture(scope="module")
def memory_rows(script_runs, tmp_path_factory) -> list[dict]:
    return run_quick_once(script_runs, tmp_path_factory, "memory_vs_seqlen.py", "memory")


@pytest.fixture(scope="module")
def flops_rows(script_runs, tmp_path_factory) -> list[dict]:
    """flops.py --quick (seconds: FLOPs are counted on the meta device), its --out a directory that does not exist:
    the script creates it and writes flops.csv and its plot there (run_quick asserts both)."""
    return run_quick_once(script_runs, tmp_path_factory, "flops.py", "flops", into_new_directory=True)


def test_memory_csv_columns_and_methods(memory_rows):
    assert set(memory_rows[0]) >= {"part", "method", "text_len", "tokens", "peak_mb", "seconds", "weights", "device"}
    layer = {(r["method"], int(r["text_len"])) for r in memory_rows if r["part"] == "layer"}
    model = {(r["method"], int(r["text_len"])) for r in memory_rows if r["part"] == "model"}
    layer_methods = ("mit_fused", "mit_reference", "plain", "prefix_eager", "prefix_sdpa", "neural")
    assert layer == {(m, n) for m in layer_methods for n in (64, 128)}
    assert model == {(m, n) for m in ("mit", "prefix", "neural", "text_only") for n in (32, 64)}
    for r in memory_rows:
        assert float(r["peak_mb"]) > 0 and float(r["seconds"]) > 0
        prefix = r["method"].startswith("prefix") or r["method"] == "neural"  # neural tuning's image tokens
        assert int(r["tokens"]) == int(r["text_len"]) + (576 if prefix else 0)
        if r["part"] == "model":
            assert r["weights"].startswith("random")  # --quick never loads the real model, and says so


def test_memory_mit_below_prefix_concatenation(memory_rows):
    peak = {(r["part"], r["method"], int(r["text_len"])): float(r["peak_mb"]) for r in memory_rows}
    for n in (64, 128):
        assert peak["layer", "mit_fused", n] < peak["layer", "prefix_sdpa", n] < peak["layer", "prefix_eager", n]
    for n in (32, 64):
        assert peak["model", "mit", n] < peak["model", "prefix", n]
    # Eager prefix concatenation stores (L + 576)^2 scores: far above the L^2 of MiT's own eager reference.
    assert peak["layer", "prefix_eager", 64] > 4 * peak["layer", "mit_reference", 64]


def test_memory_neural_pays_the_image_tokens_and_its_neurons(memory_rows):
    """Neural tuning runs the same L + 576 tokens as prefix concatenation (SDPA) and adds its task neurons: above prefix
    by at least its extra trainable parameters' gradients, far above MiT at the same L."""
    rows = {(r["part"], r["method"], int(r["text_len"])): r for r in memory_rows}
    for part, prefix, lengths in (("layer", "prefix_sdpa", (64, 128)), ("model", "prefix", (32, 64))):
        for n in lengths:
            neural, pre = rows[part, "neural", n], rows[part, prefix, n]
            mine = rows[part, "mit_fused" if part == "layer" else "mit", n]
            extra_grads = float(neural["param_grad_mb"]) - float(pre["param_grad_mb"])
            assert float(neural["peak_mb"]) - float(pre["peak_mb"]) >= extra_grads > 0
            assert float(neural["peak_mb"]) > 2 * float(mine["peak_mb"])
            ratio = float(neural["peak_mb"]) / float(mine["peak_mb"])
            assert float(neural["peak_vs_mit"]) == pytest.approx(ratio, rel=1e-5)  # the CSV keeps 6 digits
    # The neurons' parameters, counted independently: per adapted layer W_z (576 -> 128, no bias), the RMSNorm
    # weight (128) and W_b (128 -> 9 * 64 + 3 * 64, with bias); the model adds the image projection (1024 -> 576).
    per_layer = 576 * 128 + 128 + 128 * 768 + 768
    assert float(rows["layer", "neural", 64]["param_grad_mb"]) == pytest.approx(per_layer * 4 / 2**20)
    assert float(rows["model", "neural", 64]["param_grad_mb"]) == pytest.approx(
        (2 * per_layer + 1024 * 576 + 576) * 4 / 2**20  # --quick: 4 layers, neurons in the upper half (2, 3)
    )


def test_memory_fused_mit_tracks_plain_attention(memory_rows):
    """Apart from the gradient of its infusion map (a constant), fused MiT needs what plain attention needs."""
    rows = {(r["method"], int(r["text_len"])): r for r in memory_rows if r["part"] == "layer"}
    if "reference" in rows["mit_fused", 64]["attention"]:
        pytest.skip("no fused MiT backend on this device (C++ extension not built)")
    for n in (64, 128):
        mit, plain = rows["mit_fused", n], rows["plain", n]
        assert float(mit["param_grad_mb"]) > 0
        assert float(mit["peak_mb"]) - float(mit["param_grad_mb"]) <= 1.1 * float(plain["peak_mb"])


def test_flops_csv_columns_and_methods(flops_rows):
    assert set(flops_rows[0]) >= {"method", "text_len", "tower_fwd", "llm_fwd", "fwd", "fwd_bwd", "convention"}
    assert {(r["method"], int(r["text_len"])) for r in flops_rows} == {
        (m, n) for m in ("mit", "prefix", "neural", "text_only") for n in (16, 64)
    }
    for r in flops_rows:
        assert float(r["fwd"]) > 0 and float(r["fwd_bwd"]) >= float(r["fwd"])
        image = r["method"] in ("prefix", "neural")
        assert int(r["llm_tokens"]) == int(r["text_len"]) + (576 if image else 0)


def test_flops_mit_below_prefix_and_fused_ops_counted(flops_rows):
    by = {(r["method"], int(r["text_len"])): r for r in flops_rows}
    for n in (16, 64):
        mit, prefix = by["mit", n], by["prefix", n]
        assert float(mit["tower_fwd"]) == float(prefix["tower_fwd"]) > 3e11  # CLIP ViT-L/14-336: ~0.38 TFLOPs
        assert float(by["text_only", n]["tower_fwd"]) == 0
        assert float(mit["fwd"]) < float(prefix["fwd"]) and float(mit["fwd_bwd"]) < float(prefix["fwd_bwd"])
        # The fused MiT ops are counted through their registered formulas (6 layers of LLaMA-2-7B), not as zero:
        # attention 4 B H L L D forward / 10 backward, FFN gate 6 B L d_ff forward / 15 backward.
        attention = 4 * 32 * n * n * 128
        assert float(mit["mit_op_fwd"]) == 6 * (attention + 6 * n * 11008)
        assert float(mit["mit_op_bwd"]) == 6 * (attention * 10 // 4 + 15 * n * 11008)
        assert float(prefix["mit_op_fwd"]) == 0


def test_memory_tracker_ignores_views_of_existing_tensors():
    """benchmarks' CPU peak memory counts new allocations only: views of weights or inputs are not allocations."""
    from mit.utils.profiling import peak_memory_bytes

    cpu = torch.device("cpu")
    weight, x = torch.randn(512, 512), torch.randn(8, 512)
    assert peak_memory_bytes(lambda: (weight.t(), weight.view(-1), x.add_(1)), cpu) == 0
    assert peak_memory_bytes(lambda: torch.nn.functional.linear(x, weight), cpu) == 8 * 512 * 4
    assert peak_memory_bytes(lambda: torch.randn(256, 512).t().contiguous(), cpu) == 2 * 256 * 512 * 4


@pytest.fixture(scope="module")
def attention_rows(script_runs, tmp_path_factory) -> list[dict]:
    return run_quick_once(script_runs, tmp_path_factory, "bench_attention.py", "attention")


def test_attention_benchmark_rows(attention_rows):
    methods = {(r["workload"], r["stage"], r["method"]) for r in attention_rows}
    assert methods >= {("training", "fwd+bwd", m) for m in ("sdpa", "unfused", "cpu", "reference")}
    assert methods >= {("decode", "decode", m) for m in ("sdpa", "unfused", "cpu")}
    assert methods >= {("static", "decode", m) for m in ("sdpa", "unfused", "cpu")}
    for r in attention_rows:
        assert (r["used"] != "") == (r["workload"] == "static")  # keys in use of the static cache
        if r["workload"] == "static":
            assert int(r["used"]) < int(r["lk"])
    assert methods >= {("ffn_gate", "fwd+bwd", m) for m in ("eager", "fused")}
    for r in attention_rows:
        assert float(r["seconds"]) > 0
        if r["method"] in ("sdpa", "eager"):  # the floor each ratio is taken against
            assert float(r["time_vs_floor"]) == 1.0


def test_attention_benchmark_fused_memory_tracks_plain_attention(attention_rows):
    peak = {
        (r["workload"], int(r["lq"]), r["method"]): float(r["peak_mb"])
        for r in attention_rows
        if r["stage"] == "fwd+bwd"
    }
    for lq in (64, 128):
        plain = peak["training", lq, "sdpa"]
        assert peak["training", lq, "cpu"] <= 1.05 * plain  # the fused C++ path keeps no K'/V' or score matrix
        assert peak["training", lq, "unfused"] > 1.5 * plain  # the unfused way materialises K' and V' (and more)
        assert peak["training", lq, "reference"] > peak["training", lq, "unfused"]  # plus the full score matrix
        assert peak["ffn_gate", lq, "fused"] < 0.7 * peak["ffn_gate", lq, "eager"]


def test_generation_benchmark_quick(script_runs, tmp_path):
    """benchmarks/generation_smollm2.py --quick: every generate case (batch sizes, a long prompt with the static
    cache) and the training step, both methods each, ratios with their spread written (the script itself refuses to
    report unless every MiT module ran fused); times are not asserted."""
    rows = run_quick(script_runs, "generation_smollm2.py", tmp_path / "generation.csv")
    assert [(r["workload"], r["case"], r["method"]) for r in rows] == [
        ("generate", "B1 short dynamic", "base"), ("generate", "B1 short dynamic", "mit"),
        ("generate", "B2 short dynamic", "base"), ("generate", "B2 short dynamic", "mit"),
        ("generate", "B2 48 tok static", "base"), ("generate", "B2 48 tok static", "mit"),
        ("train_step", "B2 short dynamic", "text_only"), ("train_step", "B2 short dynamic", "mit"),
    ]  # fmt: skip
    for r in rows:
        assert float(r["median_s"]) > 0
        low, q1, median, q3, high = (float(r[k]) for k in ("ratio_min", "ratio_q1", "ratio_to_reference",
                                                             "ratio_q3", "ratio_max"))  # fmt: skip
        assert 0 < low <= q1 <= median <= q3 <= high
        assert low <= float(r["ratio_ci_low"]) <= median <= float(r["ratio_ci_high"]) <= high
        if r["method"] != "mit":
            assert low == high == float(r["ratio_ci_low"]) == float(r["ratio_ci_high"]) == 1.0
    assert [int(r["prompt_tokens"]) for r in rows[4:6]] == [48, 48] and rows[4]["cache"] == "static"
    assert [int(r["batch"]) for r in rows[:6:2]] == [1, 2, 2]
    # the training step's reference trains as many parameters as MiT (its maps: 3 infused layers of the 4-layer model,
    # each 768 -> 4 x 3 x 64 and 768 -> 1536 with biases, plus 3 gate logits) in the same layers: the MLPs' up and
    # down projections
    text_only, mit = (int(r["trainable_params"]) for r in rows[6:])
    assert mit == 3 * (768 * 768 + 768 + 768 * 1536 + 1536 + 3) and text_only == 3 * 2 * 576 * 1536


def test_fused_op_latency_quick_times_every_call_in_generate_and_alone(script_runs, tmp_path):
    """benchmarks/fused_op_latency.py --quick (random 4-layer model, 4 new tokens): inside generate, every call of
    MiT's fused ops is timed once per infused layer and forward (prefill + 3 steps), with MiT's default layers (3 of 4)
    and with every layer; the frozen model's SDPA and SiLU once per layer and forward; then each op alone. Times are
    not asserted."""
    rows = run_quick(script_runs, "fused_op_latency.py", tmp_path / "latency.csv")
    by = {(r["op"], r["setting"]): r for r in rows}
    forwards = 4
    for op in ("MiT fused attention", "MiT fused FFN gate"):
        assert int(by[op, "in generate, default layers (3 of 4)"]["calls"]) == 3 * forwards
        assert int(by[op, "in generate, every layer (4 of 4)"]["calls"]) == 4 * forwards
    for op in ("SDPA", "SiLU"):
        assert int(by[op, "in generate, every layer (4 of 4)"]["calls"]) == 4 * forwards
    for op in ("MiT fused attention", "MiT fused FFN gate", "SDPA", "SiLU"):
        assert int(by[op, "alone, back to back"]["calls"]) == 50
    for r in rows:
        assert 0 < float(r["q1_us"]) <= float(r["median_us"]) <= float(r["q3_us"])


def test_flops_neural_is_prefix_plus_its_neurons(flops_rows):
    """Neural tuning on LLaMA-2-7B (neurons in layers 16 ... 31, r = 128, targets qv) over the same 576 + L tokens as
    prefix concatenation: its forward is prefix's plus, per adapted layer and token, W_z (4096 -> 128) and W_b
    (128 -> 4096 + 4096), 2 FLOPs per multiply-add; its backward adds twice that (weight and input gradients, since
    the image projection below layer 0 trains). Ordering: MiT < prefix < neural."""
    by = {(r["method"], int(r["text_len"])): r for r in flops_rows}
    for n in (16, 64):
        neural, prefix, mit = by["neural", n], by["prefix", n], by["mit", n]
        neurons = 16 * 2 * (576 + n) * 128 * (4096 + 8192)
        assert float(neural["tower_fwd"]) == float(prefix["tower_fwd"])
        assert float(neural["llm_fwd"]) - float(prefix["llm_fwd"]) == neurons
        assert float(neural["bwd"]) - float(prefix["bwd"]) == 2 * neurons
        assert float(mit["fwd_bwd"]) < float(prefix["fwd_bwd"]) < float(neural["fwd_bwd"])
        assert float(neural["mit_op_fwd"]) == 0
        # trainable: 16 x (W_z + RMSNorm weight + W_b with bias) + the image projection Linear(1024, 4096)
        assert int(neural["trainable_params"]) == 16 * (4096 * 128 + 128 + 128 * 8192 + 8192) + 1024 * 4096 + 4096


def test_decode_profile_quick_names_the_fused_ops_once_per_infused_layer_and_step(script_runs, tmp_path):
    """benchmarks/profile_decode_step.py --quick: one generate of each model under torch.profiler and cProfile; the
    aten table's difference shows MiT's two fused ops, each called exactly once per infused layer and decoding step
    (the random 4-layer model infuses its last layer only: MiTConfig's default layers scaled to 4), and the Python
    table lists the package's functions."""
    result = script_runs.run(
        ["--quick", "--out", str(tmp_path)], timeout=300, script=BENCHMARKS / "profile_decode_step.py"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (table,) = tmp_path.glob("profile_decode_step_*.md")
    with table.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    header = table.read_text().splitlines()[0]
    infused = int(header.split(" infused layers")[0].rsplit(" ", 1)[-1])
    assert infused >= 1
    aten = {r["name"]: r for r in rows if r["table"] == "aten"}
    for op in ("mit_kernels::attention_cpu_fwd", "mit_kernels::ffn_gate_cpu_fwd"):
        assert int(aten[op]["calls_base"]) == 0
        assert float(aten[op]["extra_calls_per_step"]) == infused, op
    python = [r["name"] for r in rows if r["table"] == "python"]
    assert any("mit_attention_forward" in name for name in python)


def test_decode_step_layers_quick_splits_the_step_by_layer_group(script_runs, tmp_path):
    """benchmarks/decode_step_layers.py --quick (random 4-layer model, batch 1 and 2, 10 rounds): per batch size the
    whole step with its ratio's quartiles, then layer, attention and MLP for MiT's 3 infused layers and the 1 other
    (the script itself refuses to report unless every MiT module ran fused); times are not asserted."""
    rows = run_quick(script_runs, "decode_step_layers.py", tmp_path / "layers.csv")
    expected = [("step", "all", 4)] + [(part, group, n) for part in ("layer", "attention", "mlp")
                                       for group, n in (("infused", 3), ("other", 1))]  # fmt: skip
    assert [(int(r["batch"]), r["part"], r["group"], int(r["layers"])) for r in rows] == [
        (size, *row) for size in (1, 2) for row in expected
    ]
    for r in rows:
        base, mit, extra = float(r["base_us"]), float(r["mit_us"]), float(r["extra_us"])
        assert base > 0 and mit > 0 and extra == pytest.approx(mit - base, abs=1e-5 * mit + 1e-3)  # (%.6g)
        assert int(r["rounds"]) == 10
        if r["part"] == "step":
            assert 0 < float(r["ratio_q1"]) <= float(r["ratio"]) <= float(r["ratio_q3"])
            assert 0 < float(r["ratio_ci_low"]) <= float(r["ratio"]) <= float(r["ratio_ci_high"])
        else:
            assert float(r["ratio"]) == pytest.approx(mit / base, rel=1e-4)
