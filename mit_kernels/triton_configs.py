"""Tile configurations of the Triton attention kernels: a fixed default per GPU generation, and a small autotuner.

A configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages). Which one is fastest depends on the GPU (shared memory,
tensor-core shape), the head dim and the dtype, and on whether the call is a decode step (a handful of query rows) or
a prefill / training pass; it does not depend on the sequence length beyond that. So:

- the autotuner's key is ``(pass, compute capability, dtype, BLOCK_D, GQA group, causal, rescale, padding mask,
  decode?)``: a new sequence length never re-tunes (nor recompiles: lengths are runtime arguments of the kernels);
- on the first call with a new key each candidate is timed (``triton.testing.do_bench``) on the real arguments (every
  pass rewrites its outputs, so repeating it is harmless) and the fastest is kept for the process; candidates that do
  not fit (out of shared memory or registers) are skipped;
- autotuning is off under pytest, in the interpreter, and with ``MIT_TRITON_AUTOTUNE=0``: the fixed default runs.
  Results are bitwise reproducible for a given configuration; with autotuning two processes may pick different tiles,
  and so differ in the last bits (``MIT_TRITON_AUTOTUNE=0`` pins them).

The candidate lists are small on purpose (tuning costs a few seconds per key). They were written for Ampere (sm80,
A100: 164 KiB shared memory) and Hopper (sm90, H100/H200: 228 KiB), and have not yet been measured on either: the
first GPU run of ``benchmarks/gpu_check.py`` records which ones win.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def launch_args(self) -> dict:
        """Keyword arguments of a kernel launch (the interpreter takes no warps / stages)."""
        if self == INTERPRETER:
            return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}  # fmt: skip


INTERPRETER = TileConfig(16, 16)  # numpy runs each program; small tiles keep the padded work small
DECODE_ROWS = 16  # a query count up to this is a decode step (tl.dot needs 16 rows at least)


def _forward_candidates(block_d: int, hopper: bool, decode: bool) -> list[TileConfig]:
    if decode:
        return [TileConfig(16, 64, 4, 2), TileConfig(16, 128, 4, 2), TileConfig(16, 128, 8, 3)]
    if block_d <= 64:
        out = [TileConfig(64, 64, 4, 2), TileConfig(128, 64, 4, 3), TileConfig(128, 128, 8, 3)]
        out.append(TileConfig(64, 128, 4, 3))
    else:
        out = [TileConfig(64, 32, 4, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 32, 4, 3)]
        out.append(TileConfig(64, 64, 4, 2))
    if hopper:
        out.append(TileConfig(128, 128, 8, 2) if block_d <= 64 else TileConfig(128, 64, 8, 4))
    return out


def _backward_candidates(block_d: int, hopper: bool) -> list[TileConfig]:
    if block_d <= 64:
        out = [TileConfig(32, 64, 4, 1), TileConfig(64, 64, 4, 2), TileConfig(64, 128, 8, 2), TileConfig(32, 128, 4, 2)]
    else:
        out = [TileConfig(32, 32, 4, 1), TileConfig(32, 64, 4, 1), TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2)]
    if hopper:
        out.append(TileConfig(128, 64, 8, 2) if block_d <= 64 else TileConfig(64, 64, 8, 3))
    return out


def candidates(pass_name: str, block_d: int, capability: tuple[int, int], decode: bool = False) -> list[TileConfig]:
    """The autotuner's configurations for ``pass_name`` ("fwd", "bwd_dq", "bwd_dkdv"); the first is the default."""
    hopper = capability[0] >= 9
    if pass_name == "fwd":
        return _forward_candidates(block_d, hopper, decode)
    return _backward_candidates(block_d, hopper)


def autotune_enabled() -> bool:
    if os.environ.get("MIT_TRITON_AUTOTUNE", "1").strip() == "0":
        return False
    return "PYTEST_CURRENT_TEST" not in os.environ


_TUNED: dict[tuple, TileConfig] = {}


def choose(
    pass_name: str,
    block_d: int,
    tensor: torch.Tensor,
    key: tuple,
    launch: Callable[[TileConfig], None],
    *,
    decode: bool = False,
    interpreter: bool = False,
) -> TileConfig:
    """The configuration to launch ``pass_name`` with; tunes on the first call of a key when autotuning is on.

    ``launch(config)`` runs the pass with ``config`` (used only while tuning); ``key`` holds what else the best
    configuration depends on (dtype, group, flags)."""
    if interpreter:
        return INTERPRETER
    capability = _capability(tensor)
    options = candidates(pass_name, block_d, capability, decode)
    if not autotune_enabled():
        return options[0]
    full_key = (pass_name, capability, block_d, decode, *key)
    if full_key not in _TUNED:
        _TUNED[full_key] = _tune(options, launch)
    return _TUNED[full_key]


def _capability(tensor: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(tensor.device)


def _benchmark(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _tune(options: list[TileConfig], launch: Callable[[TileConfig], None]) -> TileConfig:
    best, best_ms = options[0], float("inf")
    for config in options:
        try:
            ms = _benchmark(lambda config=config: launch(config))
        except Exception as exc:  # out of shared memory / registers on this GPU: not a candidate here
            if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
                raise
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def tuned_configs() -> dict[tuple, TileConfig]:
    """What the autotuner chose in this process (benchmarks/gpu_check.py reports it)."""
    return dict(_TUNED)
