"""The Triton kernels compile for real GPUs (sm_90 subset here; the full matrix: benchmarks/compile_check.py), lean
beside a plain flash-attention kernel, on the newest Triton installed and on the lowest pyproject allows; no GPU
needed. Also the launch properties that only show once compiled: one binary per length, one-dimensional grids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mit_kernels import compile_check, dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")


def _compile_subset(tmp_path, extra_path: str | None = None, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}  # compile for real, not from a cache
    env.pop("TRITON_INTERPRET", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "mit_kernels", "compile-check", "--no-progress", "--jobs", "2", *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _assert_clean(result: subprocess.CompletedProcess, expected_version: str | None = None) -> None:
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "No violations." in result.stdout and " 0 failed" in result.stdout
    if expected_version:
        assert result.stdout.startswith(f"Triton {expected_version}"), result.stdout[:200]


def test_every_default_kernel_compiles_lean_on_the_installed_triton(tmp_path):
    """The subset (every kernel's default tile, bf16 at head dims 64 and 128, fp32 at 64, sm_90); the yardstick is
    compiled for exactly the rows the lean targets apply to.

    Compiled as a run interrupted after two rows, then resumed (the full matrix takes ~1.5 h on 2 cores: rows are
    appended as they compile, and --resume keeps those compiled from the same sources and Triton; anything else is
    compiled again): the first row is made stale (compiled from other kernels), the second is kept."""
    path = tmp_path / "rows.csv"
    first = _compile_subset(tmp_path, None, "--csv", str(path), "--limit", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    rows = compile_check.read_csv(str(path))
    assert len(rows) == 2 and all(r["compiled"] is True and isinstance(r["registers"], int) for r in rows)
    compile_check.write_csv([{**rows[0], "source": "other sources"}, rows[1]], str(path))
    resumed = _compile_subset(tmp_path, None, "--csv", str(path), "--resume")
    _assert_clean(resumed)
    assert "reusing 1 of 2 rows" in resumed.stderr
    backup = compile_check.read_csv(str(path) + ".bak")  # the rows that were not reused are set aside
    assert [r["source"] for r in backup] == ["other sources", rows[1]["source"]]
    done = compile_check.read_csv(str(path))
    assert [r["case"] for r in done[:2]] == [r["case"] for r in rows]
    assert done[1]["seconds"] == rows[1]["seconds"]  # kept as it was
    assert done[0]["source"] == compile_check.source_hash()  # compiled again
    assert len(done) == len(compile_check.subset_cases()) and {r["head_dim"] for r in done} == {0, 64, 128}
    assert len({r["case"] for r in done}) == len(done)
    lean = [r for r in done if compile_check.lean_target(r)]
    assert len(lean) == 8  # fwd (prefill, decode), bwd_dq, bwd_dkdv at bf16 x head dims 64, 128
    assert all(isinstance(r["yard_registers"], int) and r["yard_mma"] > 0 for r in lean)
    assert all(r["yard_registers"] == "" for r in done if not compile_check.lean_target(r))


def test_every_default_kernel_compiles_lean_on_the_lowest_supported_triton(tmp_path):
    """`make test` installs the lowest Triton pyproject allows into a folder of its own (MIT_TRITON_LOWEST). Head dim
    64 only: what an older Triton can fail at (its API, its lowering of an op, a spill) does not depend on the head
    dim's constexpr tile sizes; the installed Triton compiles both head dims."""
    folder = os.environ.get("MIT_TRITON_LOWEST")
    if not folder:
        pytest.skip("MIT_TRITON_LOWEST is not set (make test sets it to the lowest supported Triton)")
    version = next(name for name in os.listdir(folder) if name.startswith("triton-") and name.endswith(".dist-info"))
    result = _compile_subset(tmp_path, folder, "--head-dims", "64")
    _assert_clean(result, version.removeprefix("triton-").removesuffix(".dist-info"))
    assert f"{len(compile_check.subset_cases(head_dims=(64,)))} compiles" in result.stdout


def test_subset_head_dims_are_checked():
    assert {c.head_dim for c in compile_check.subset_cases(head_dims=(64,))} == {0, 64}
    default = compile_check.subset_cases()
    assert {(c.dtype, c.head_dim) for c in default if c.head_dim} == {
        (torch.bfloat16, 64),
        (torch.bfloat16, 128),
        (torch.float32, 64),
    }
    assert {c.pass_name for c in default if c.dtype == torch.float32} == {c.pass_name for c in default}
    for bad in ((), (48,)):
        with pytest.raises(ValueError, match="head_dims"):
            compile_check.subset_cases(head_dims=bad)


SPECIALISATION = """
import sys, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from mit_kernels import triton_attention as ta
from mit_kernels.triton_configs import TileConfig

keys = set()
for lq, lk in LENGTHS:
    q = torch.empty(2, 8, lq, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, lk, 64, device="meta", dtype=torch.bfloat16)
    vec = [torch.empty(2, 2, 64, device="meta", dtype=torch.bfloat16) for _ in range(4)]
    plan = ta.ForwardPlan(q, k, k, *vec, torch.empty(2, device="meta"), None, True, 0.125, True)
    launch = plan.attention(TileConfig(64, 64, 4, 2))
    binder = create_function_from_signature(
        launch.kernel.signature, launch.kernel.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    keys.add(tuple(str(s) for s in binder(*launch.args, **launch.kwargs)[1]))
print(len(keys))
"""


@pytest.mark.parametrize(
    "lengths", [[(1, 700), (1, 1), (1, 16), (1, 4096)], [(17, 17), (32, 32), (1000, 1000), (48, 1001)]]
)
def test_lengths_never_select_a_new_binary(lengths):
    """Lq = 1 and lengths divisible by 16 would be specialised (a new compile each) without do_not_specialize; the
    specialisation is what a real launch's binder computes (outside the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = SPECIALISATION.replace("LENGTHS", repr(lengths))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1"


@pytest.mark.parametrize("decode", [True, False])
def test_grids_are_one_dimensional_beyond_65535_programs(decode):
    """CUDA caps grid axes 1 and 2 at 65,535: a decode batch of 2048 sequences x 32 heads needs 65,536 programs."""
    from mit_kernels import triton_attention as ta
    from mit_kernels.triton_configs import TileConfig

    lq = 1 if decode else 128
    q = torch.empty(2048, 32, lq, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2048, 8, 128, 128, device="meta", dtype=torch.bfloat16)
    vec = [torch.empty(2048, 8, 128, device="meta", dtype=torch.bfloat16) for _ in range(4)]
    args = (q, k, k, *vec, torch.empty(8, device="meta"), None, True, 0.088, True)
    forward = ta.ForwardPlan(*args)
    backward = ta.BackwardPlan(q, *args[:-3], q, torch.empty(q.shape[:3], device="meta"), True, 0.088, True)
    config = TileConfig(64, 64, 4, 2)
    launches = [forward.attention(config), backward.dq_launch(config), backward.dkdv_launch(config),
                backward.delta_launch(), backward.infusion_launch(), backward.pre]  # fmt: skip
    for launch in launches:
        assert len(launch.grid) == 1 and launch.grid[0] < 2**31, (launch.name, launch.grid)
    assert forward.attention(config).grid[0] >= 2048 * 32


def _row(**overrides) -> dict:
    row = {"pass": "fwd", "variant": "fast", "arch": 90, "dtype": "bfloat16", "head_dim": 64, "causal": True,
           "kv_mask": True, "group": 4, "decode": False, "block_m": 64, "block_n": 64, "num_warps": 4,
           "num_stages": 2, "default": True, "kept": True, "compiled": True, "error": "", "shared": 40000,
           "shared_limit": 232448, "shared_bound": 60000, "fits": True, "registers": 150, "stack": 0, "mma": 8,
           "yard_registers": 150, "yard_stack": 0, "yard_shared": 40000, "yard_mma": 8}  # fmt: skip
    return {**row, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"compiled": False, "error": "CompilationError: x"}, "does not compile"),
        ({"stack": 16}, "stack"),
        ({"mma": 0}, "no HGMMA"),
        ({"shared": 50001, "yard_shared": 40000}, "1.25x"),
        ({"shared": 70000}, "bound"),
        ({"shared": 240000, "shared_bound": 250000, "fits": False}, "kept by the rule"),
    ],
)
def test_each_target_is_checked(overrides, message):
    assert compile_check.violations([_row()]) == []
    found = compile_check.violations([_row(**overrides)])
    assert found and message in " ".join(found)


def test_fp32_rows_need_only_fit():
    """The lean targets are for fp16 / bf16 (fp32 tiles are 2x the bytes); fp32 must still compile and fit."""
    assert compile_check.violations([_row(dtype="float32", stack=400, mma=0)]) == []
    assert compile_check.violations([_row(dtype="float32", shared=240000, shared_bound=250000, fits=False)])
