"""Tile configurations of the Triton attention kernels: defaults, and an autotuner keyed without sequence lengths."""

from __future__ import annotations

import pytest
import torch

from mit_kernels import triton_configs
from mit_kernels.triton_configs import INTERPRETER, TileConfig, candidates, choose


@pytest.mark.parametrize("block_d", [64, 128])
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_candidates_fit_the_kernels(block_d, capability):
    for pass_name, decode in (("fwd", False), ("fwd", True), ("bwd_dq", False), ("bwd_dkdv", False)):
        options = candidates(pass_name, block_d, capability, decode)
        assert 3 <= len(options) <= 6 and len(set(options)) == len(options)
        for c in options:  # tl.dot needs >= 16 rows and columns; powers of two
            assert c.block_m >= 16 and c.block_n >= 16 and c.block_m & (c.block_m - 1) == 0
            assert c.block_n & (c.block_n - 1) == 0 and c.num_warps in (4, 8) and 1 <= c.num_stages <= 4
        if decode:
            assert all(c.block_m == 16 for c in options)  # a decode step has a handful of query rows
    assert len(candidates("fwd", 128, (9, 0))) == len(candidates("fwd", 128, (8, 0))) + 1  # one Hopper-only tile


def test_autotuner_tunes_once_per_key_and_never_per_length(monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("MIT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_configs, "_TUNED", {})
    monkeypatch.setattr(triton_configs, "_capability", lambda tensor: (9, 0))
    fastest = TileConfig(128, 64, 8, 3)
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
