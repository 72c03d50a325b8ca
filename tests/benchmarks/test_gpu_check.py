"""benchmarks/gpu_check.py --dry-run: the GPU check's own code on tiny shapes under the Triton interpreter, so that the
script cannot rot between GPU runs. Parity must hold; times are not asserted (the interpreter is not a GPU)."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def read(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_gpu_check_dry_run(tmp_path, script_runs):
    args = ["--dry-run", "--out", str(tmp_path)]
    if os.environ.get("TRITON_INTERPRET") == "1":  # (no GPU) a process forked from the tests' warm interpreter
        result = script_runs.run(args, timeout=600, script=SCRIPT)
    else:  # on a GPU the dry run still runs under the interpreter: a fresh process with it switched on
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parity = read(tmp_path / "gpu_check_dry-run-cpu_parity.csv")
    tensors = {r["tensor"] for r in parity}
    assert {"out", "dq", "dk", "dv", "dk_mul", "dk_add", "dv_mul", "dv_add", "dlambda"} <= tensors
    assert {r["case"] for r in parity} >= {"causal+left_pad", "noncausal+random_mask", "decode", "long", "offsets>2^31"}
    assert all(r["passed"] == "True" for r in parity), [r for r in parity if r["passed"] != "True"]
    speed = read(tmp_path / "gpu_check_dry-run-cpu_speed.csv")
    assert {r["method"] for r in speed} == {"fused", "sdpa_backend", "plain_flash", "unfused", "official"}
    assert all(float(r["fwd_ms"]) > 0 and float(r["peak_mib"]) >= 0 for r in speed)
    steps = read(tmp_path / "gpu_check_dry-run-cpu_steps.csv")
    assert {r["method"] for r in steps} == {"mit", "prefix"}
    assert (tmp_path / "gpu_check_dry-run-cpu.png").stat().st_size > 10_000
    summary = (tmp_path / "gpu_check_dry-run-cpu_summary.txt").read_text()
    assert "parity: 139/139 tensors within the rule" in summary and "targets:" in summary
    decode = read(tmp_path / "gpu_check_dry-run-cpu_decode.csv")  # the decode section: split vs per-head vs plain
    assert {r["variant"] for r in decode} == {"split", "per_head", "plain_flash"}
    assert all(r["error"] == "" and float(r["graph_ms"]) > 0 for r in decode)
    # the split decode and the per-head decode compute the same function (fp32 here)
    assert all(float(r["max_diff_vs_per_head"]) < 1e-5 for r in decode if r["variant"] == "split")
    assert "decode (graph-replayed time / plain flash decoding" in summary
    profile = (tmp_path / "gpu_check_dry-run-cpu_profile.txt").read_text()
    assert "mit_kernels::attention_triton_fwd" in profile and "decode L=" in profile
    compiled = read(tmp_path / "gpu_check_dry-run-cpu_compile.csv")  # step 0: the compile check's smoke run
    assert len(compiled) == 2 and all(r["compiled"] == "True" and r["arch"] == "90" for r in compiled)
    assert "compile check (sm_90, exit 0):" in summary
