"""Tile configurations of the Triton attention kernels: defaults, and an autotuner keyed without sequence lengths."""

from __future__ import annotations

import pytest
import torch

from mit_kernels import triton_configs
from mit_kernels.triton_configs import (
    INTERPRETER,
    TileConfig,
    all_candidates,
    candidates,
    choose,
    fits,
    has_tiles,
    shared_bytes,
    shared_limit,
)


@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5)])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_candidates_fit_the_kernels_and_the_target(block_d, capability, dtype_bytes):
    if block_d == 256 and dtype_bytes == 4 and shared_limit(capability) < 100 * 1024:
        assert not has_tiles(block_d, dtype_bytes, capability)  # auto runs "sdpa" there
        with pytest.raises(ValueError, match=r"no .* tile fits"):
            candidates("bwd_dkdv", block_d, capability, False, dtype_bytes)
        return
    assert has_tiles(block_d, dtype_bytes, capability)
    for pass_name, decode in (("fwd", False), ("fwd", True), ("bwd_dq", False), ("bwd_dkdv", False)):
        options = candidates(pass_name, block_d, capability, decode, dtype_bytes)
        assert 1 <= len(options) <= 6 and len(set(options)) == len(options)
        for c in options:  # tl.dot needs >= 16 rows and columns; powers of two; the rule's bound within the limit
            assert c.block_m >= 16 and c.block_n >= 16 and c.block_m & (c.block_m - 1) == 0
            assert c.block_n & (c.block_n - 1) == 0 and c.num_warps in (4, 8) and 1 <= c.num_stages <= 4
            assert shared_bytes(pass_name, c, block_d, dtype_bytes, capability) <= shared_limit(capability)
        dropped = [c for c in all_candidates(pass_name, block_d, capability, decode) if c not in options]
        assert all(not fits(pass_name, c, block_d, dtype_bytes, capability) for c in dropped)


def test_decode_tiles_use_warpgroup_mma_rows_on_hopper_and_blackwell():
    """wgmma / tcgen05 take 64-row tiles: with 16 rows Hopper would fall back to mma.sync."""
    for capability, rows in (((9, 0), 64), ((10, 0), 64), ((8, 0), 16), ((8, 9), 16)):
        assert candidates("fwd", 128, capability, decode=True)[0].block_m == rows


def test_shared_limits_per_family():
    """sm_86 / sm_89 / sm_120 have 99 KiB per block, not the A100's 163: they get their own candidate filtering."""
    assert shared_limit((8, 6)) == shared_limit((8, 9)) == shared_limit((12, 0)) == 99 * 1024
    assert shared_limit((8, 0)) == 163 * 1024 and shared_limit((9, 0)) == 227 * 1024
    assert shared_limit((8, 8)) == 99 * 1024  # unknown minor: the smallest of its major
    big_fp32 = TileConfig(64, 64, 8, 2)
    assert fits("bwd_dq", big_fp32, 128, 2, (8, 0)) and not fits("bwd_dq", big_fp32, 128, 2, (8, 6))


def test_unknown_pass_is_refused():
    with pytest.raises(ValueError, match="pass_name"):
        candidates("bwd", 64, (9, 0))


def test_autotuner_tunes_once_per_key_and_never_per_length(monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("MIT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_configs, "_TUNED", {})
    monkeypatch.setattr(triton_configs, "_capability", lambda tensor: (9, 0))
    fastest = candidates("fwd", 128, (9, 0))[2]
    launched = []

    def bench(fn):  # every candidate "takes" 1 ms but the fastest, 0.5 ms
        fn()
        return 0.5 if launched[-1] == fastest else 1.0

    monkeypatch.setattr(triton_configs, "_benchmark", bench)
    launch = launched.append

    x = torch.empty(0)
    key = (torch.bfloat16, 4, True, True, False)
    for _ in ("L = 1024", "L = 16384"):  # the lengths are not part of the key
        assert choose("fwd", 128, x, key, launch) == fastest
    assert launched == candidates("fwd", 128, (9, 0))  # tuned once: each candidate launched once
    other_key = (torch.float16, 4, True, True, False)
    assert choose("fwd", 128, x, other_key, launch) in candidates("fwd", 128, (9, 0))
    assert len(triton_configs.tuned_configs()) == 2


def test_autotuning_is_off_under_pytest_and_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_configs, "_capability", lambda tensor: (8, 0))

    def never(config):
        raise AssertionError("no launch: nothing is tuned")

    x = torch.empty(0)
    assert choose("bwd_dkdv", 64, x, (), never) == candidates("bwd_dkdv", 64, (8, 0))[0]  # PYTEST_CURRENT_TEST is set
    assert choose("fwd", 64, x, (), never, interpreter=True) == INTERPRETER
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("MIT_TRITON_AUTOTUNE", "0")
    assert choose("fwd", 64, x, (), never) == candidates("fwd", 64, (8, 0))[0]


def _tuning(monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("MIT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_configs, "_TUNED", {})
    monkeypatch.setattr(triton_configs, "_capability", lambda tensor: (9, 0))


def test_autotuner_skips_failing_candidates_and_never_caches_a_failure(monkeypatch):
    _tuning(monkeypatch)
    options = candidates("bwd_dq", 64, (9, 0))
    broken = set(options[:2])

    def launch(config):
        if config in broken:
            raise RuntimeError("PTX assembly failed")  # any compile / launch error of one candidate

    monkeypatch.setattr(triton_configs, "_benchmark", lambda fn: (fn(), 1.0)[1])
    assert choose("bwd_dq", 64, torch.empty(0), (torch.bfloat16,), launch) == options[2]

    monkeypatch.setattr(triton_configs, "_TUNED", {})
    broken.update(options)
    with pytest.raises(RuntimeError, match="PTX"):
        choose("bwd_dq", 64, torch.empty(0), (torch.bfloat16,), launch)
    assert triton_configs.tuned_configs() == {}  # nothing cached: a later call tries again


def test_autotuner_out_of_memory_runs_the_default_untimed(monkeypatch):
    _tuning(monkeypatch)

    def bench(fn):
        raise torch.OutOfMemoryError("do_bench's cache-flush buffer")

    monkeypatch.setattr(triton_configs, "_benchmark", bench)
    default = candidates("fwd", 64, (9, 0))[0]
    assert choose("fwd", 64, torch.empty(0), (torch.bfloat16,), lambda c: None) == default
    assert triton_configs.tuned_configs() == {}
