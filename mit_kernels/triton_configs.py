"""Tile configurations of the Triton attention kernels: candidates per GPU family, the rule that drops a candidate
that cannot fit, and a small autotuner.

A configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages). Which one is fastest depends on the GPU (shared memory,
tensor-core shape), the head dim and the dtype, and on whether the call is a decode step (a handful of query rows) or
a prefill / training pass; it does not depend on the sequence length beyond that. So:

- candidates come per GPU family: Ampere A100 / A30 (sm_80, sm_87: 163 KiB of shared memory per block), the
  consumer and workstation parts (sm_86, sm_89, sm_120: 99 KiB), Hopper (sm_90: 227 KiB) and Blackwell (sm_100:
  227 KiB). Hopper and Blackwell run decode with 64-row tiles, the smallest a warpgroup MMA (wgmma / tcgen05) takes;
  the others with 16 rows (mma.sync). Defaults (the first candidate) were chosen from compile statistics on sm_80 and
  sm_90 (``python -m mit_kernels compile-check``): the tiles on which neither MiT's kernels nor a plain flash kernel
  spill (e.g. the D 128 backward with 8 warps); not yet timed on a GPU;
- :func:`fits` drops, before anything is launched, a candidate whose shared memory (:func:`shared_bytes`, an upper
  bound of what Triton allocates for the pass) exceeds the family's limit; ``python -m mit_kernels compile-check``
  compiles every candidate for real targets and verifies that every kept candidate fits and that the bound holds;
- the autotuner's key is ``(pass, compute capability, dtype, BLOCK_D, GQA group, causal, rescale, padding mask,
  decode?)``: a new sequence length never re-tunes (nor recompiles: lengths are not specialised). On the first call
  with a new key each kept candidate is timed (``triton.testing.do_bench``) on the real arguments (every pass rewrites
  its outputs, so repeating it is harmless) and the fastest is kept for the process. A candidate that fails to
  compile or launch is skipped; if none runs, the error is raised and nothing is cached; if timing cannot run (out of
  memory for ``do_bench``'s cache-flush buffer), the default runs untimed, and tuning is tried again on a later call;
- autotuning is off under pytest, in the interpreter, and with ``MIT_TRITON_AUTOTUNE=0``: the default (the first
  candidate) runs. Results are bitwise reproducible for a given configuration; with autotuning two processes may pick
  different tiles, and so differ in the last bits (``MIT_TRITON_AUTOTUNE=0`` pins them).

The exact variants (the NaN / Inf path, :mod:`mit_kernels.triton_attention`) run with a small fixed tile
(:func:`exact_config`): they do work only for rows that came out non-finite.
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

    def launch_args(self, interpreted: bool = False) -> dict:
        """Keyword arguments of a kernel launch (the interpreter takes no warps / stages)."""
        tiles = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        return tiles if interpreted else {**tiles, "num_warps": self.num_warps, "num_stages": self.num_stages}


INTERPRETER = TileConfig(32, 32)  # numpy runs each program; small tiles keep the padded work small
DECODE_ROWS = 16  # a query count up to this is a decode step: the forward infuses K/V tiles as it loads them
DECODE_SPLIT_MAX_GROUP = 16  # one query row and a GQA group up to this: the split decode (query heads as tile rows)
PASSES = ("fwd", "bwd_dq", "bwd_dkdv")

# Shared memory per block (bytes) that a kernel may use, by compute capability (CUDA's documented maxima).
SHARED_LIMITS = {
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}


def shared_limit(capability: tuple[int, int]) -> int:
    """Shared memory per block on ``capability``; an unknown one gets the smallest limit of its major version."""
    if capability in SHARED_LIMITS:
        return SHARED_LIMITS[capability]
    same_major = [v for (major, _), v in SHARED_LIMITS.items() if major == capability[0]]
    return min(same_major) if same_major else min(SHARED_LIMITS.values())


def warpgroup_mma(capability: tuple[int, int]) -> bool:
    """Hopper and Blackwell data-centre parts: tensor-core MMAs of a warpgroup, which need 64-row tiles."""
    return capability[0] in (9, 10)


def elementwise_rows(interpreted: bool) -> int:
    """Rows per program of the elementwise passes (infusion pre-pass and backward, delta)."""
    return 16 if interpreted else 64


def _forward(block_d: int, capability: tuple[int, int], decode: bool) -> list[TileConfig]:
    if decode:
        rows = 64 if warpgroup_mma(capability) else 16
        first = TileConfig(rows, 64, 4, 2) if block_d <= 64 else TileConfig(rows, 64, 8, 2)
        return [first, TileConfig(rows, 128, 8, 2), TileConfig(rows, 32, 4, 3), TileConfig(rows, 32, 4, 1), TINY]
    if block_d <= 64:  # 8 warps: 4 spill on sm_80 without the causal bound (so does no plain kernel)
        return [TileConfig(64, 64, 8, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 2),
                TileConfig(64, 64, 4, 2), SMALL, TINY]  # fmt: skip
    if block_d <= 128:
        return [TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2),
                TileConfig(64, 128, 8, 2), SMALL, TINY]  # fmt: skip
    return [TileConfig(32, 32, 4, 2), TileConfig(64, 32, 8, 2), TINY]


def _backward(pass_name: str, block_d: int, capability: tuple[int, int]) -> list[TileConfig]:
    if block_d <= 64:
        if pass_name == "bwd_dq":
            return [TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 32, 4, 2),
                    TileConfig(32, 64, 4, 2), SMALL, TINY]  # fmt: skip
        # 32 query rows per step: 64 x 64 spills on sm_80 (4 or 8 warps) at some flags
        return [TileConfig(32, 64, 4, 2), TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2), TileConfig(64, 128, 8, 2),
                SMALL, TINY]  # fmt: skip
    if block_d <= 128:
        if pass_name == "bwd_dq":
            return [TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2),
                    TileConfig(128, 64, 8, 2), SMALL, TINY]  # fmt: skip
        # 32 query rows per step: 64 x 64 with 8 warps spills on Triton 3.6 (so does a plain kernel there)
        return [TileConfig(32, 64, 8, 2), TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2), TileConfig(64, 128, 8, 2),
                SMALL, TINY]  # fmt: skip
    return [TileConfig(32, 32, 4, 2), TileConfig(64, 32, 8, 2), TINY]


# The last candidates of every list: small enough that fp32 tiles of every head dim fit the smallest shared memory
# (99 KiB), unpipelined.
SMALL = TileConfig(32, 32, 4, 1)
TINY = TileConfig(16, 16, 4, 1)


def all_candidates(pass_name: str, block_d: int, capability: tuple[int, int], decode: bool = False) -> list[TileConfig]:
    """Every candidate written for ``pass_name`` on ``capability``, kept or not by :func:`fits`."""
    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    if pass_name == "fwd":
        return _forward(block_d, capability, decode)
    return _backward(pass_name, block_d, capability)


def candidates(
    pass_name: str, block_d: int, capability: tuple[int, int], decode: bool = False, dtype_bytes: int = 2
) -> list[TileConfig]:
    """The autotuner's configurations for ``pass_name`` ("fwd", "bwd_dq", "bwd_dkdv"): those that :func:`fit` the
    target, the default first. ``dtype_bytes``: 2 for fp16 / bf16, 4 for fp32."""
    options = all_candidates(pass_name, block_d, capability, decode)
    kept = [c for c in options if fits(pass_name, c, block_d, dtype_bytes, capability)]
    if not kept:  # every family has a default that fits (the compile check verifies it); never launch blind
        raise ValueError(f"no {pass_name} tile fits compute capability {capability} at head dim {block_d}")
    return kept


def has_tiles(block_d: int, dtype_bytes: int, capability: tuple[int, int]) -> bool:
    """Every pass has a candidate that fits ``capability`` (False only for fp32 at head dim 256 on the 99 KiB parts:
    ``backend="auto"`` runs "sdpa" there)."""
    return all(
        any(fits(p, c, block_d, dtype_bytes, capability) for c in all_candidates(p, block_d, capability, decode))
        for p, decode in (("fwd", False), ("fwd", True), ("bwd_dq", False), ("bwd_dkdv", False))
    )


def shared_bytes(
    pass_name: str, config: TileConfig, block_d: int, dtype_bytes: int, capability: tuple[int, int] | None = None
) -> int:
    """An upper bound of the shared memory Triton allocates for one program of ``pass_name`` with ``config``.

    The dot operands that are streamed (K', V' in the forward and dq passes; q, dO in the dK'dV' pass) are buffered
    ``num_stages`` deep (at least 2), the resident operands once, plus one (BLOCK_M, BLOCK_N) fp32 tile for the layout
    change between the two products of an iteration and 1 KiB of scratch; fp32 operands (``tf32x3``: split into
    TF32 parts) count 1.5x. On sm_100 (``capability`` (10, x)) the dK'dV' pass holds a third resident (BLOCK_N, D)
    tile (Triton 3.8 stages one operand of a transposed tcgen05 product: 82,240 B for bf16 D128 32x64, where the
    sm_90 build takes 65,792). Fitted to, and checked against, what the compiler reports for every candidate of the
    full compile matrix on sm_80 / sm_90 and for the default tiles on sm_100 (benchmarks/compile_check.py)."""
    stages = max(2, config.num_stages)
    m, n = config.block_m, config.block_n
    if pass_name == "fwd":  # q, and q * k_mul in the decode that distributes the infusion over its products
        operands = 2 * m * block_d + stages * 2 * n * block_d
    elif pass_name == "bwd_dq":
        operands = 2 * m * block_d + stages * 2 * n * block_d
    else:
        resident = 3 if capability is not None and capability[0] >= 10 else 2
        operands = resident * n * block_d + stages * 2 * m * block_d
    factor = 1.5 if dtype_bytes == 4 else 1.0
    return int(factor * dtype_bytes * operands) + 4 * m * n + 1024  # + barriers and reduction scratch


def fits(pass_name: str, config: TileConfig, block_d: int, dtype_bytes: int, capability: tuple[int, int]) -> bool:
    """The rule that drops a candidate before it is ever launched: its shared memory bound within the target's."""
    return shared_bytes(pass_name, config, block_d, dtype_bytes, capability) <= shared_limit(capability)


def exact_config(config: TileConfig, pass_name: str) -> TileConfig:
    """The tile of the exact (NaN / Inf) variant of a pass whose fast variant runs ``config``: small (its products
    carry indicator matrices), with the fast tile's rows for decode (at most 16 rows of queries there)."""
    if config == INTERPRETER:
        return INTERPRETER
    return TileConfig(min(config.block_m, 32) if pass_name != "fwd" or config.block_m > 16 else 16, 32, 4, 1)


def decode_tile(block_d: int, group: int, interpreted: bool = False) -> TileConfig:
    """The split decode pass's tile (memory-bound: not tuned): the GQA group's query heads as rows (at least 16, the
    smallest tensor-core tile; groups up to :data:`DECODE_SPLIT_MAX_GROUP`), 32 keys per tile, pipelined two deep up
    to head dim 64, unpipelined at 128; 16 keys above. The raw K / V tiles are infused in fp32 registers: these are
    tiles on which neither Triton 3.6 nor 3.8 spills on sm_80 or sm_90, and the fastest or within 3% of the fastest of
    the tiles timed on an H200 (benchmarks/results/gpu_check_NVIDIA_H200_decode.csv)."""
    import triton

    rows = max(16, triton.next_power_of_2(group))
    if interpreted:
        return TileConfig(rows, 16)
    if block_d <= 64:
        return TileConfig(rows, 32, 4, 2)
    return TileConfig(rows, 32 if block_d <= 128 else 16, 4, 1)


def decode_splits(units: int, keys: int, block_n: int, processors: int, interpreted: bool = False) -> tuple[int, int]:
    """(number of splits, keys per split) of a decode step over ``keys`` cached keys, ``units`` = B * Hkv: about two
    programs per multiprocessor (flash-decoding), each split a whole number of tiles and at least 4 tiles long on a
    GPU (a program's fixed cost: the query tile, the vectors, its partials), 1 in the interpreter (tests reach many
    splits on short caches)."""
    if keys <= 0:
        return 1, block_n
    tiles = -(-keys // block_n)
    wanted = max(1, -(-2 * processors // max(units, 1)))
    splits = max(1, min(wanted, tiles // (1 if interpreted else 4)))
    split_len = -(-tiles // splits) * block_n
    return -(-keys // split_len), split_len


_PROCESSORS: dict[int, int] = {}


def multiprocessor_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); 132 (an H100 / H200) for meta tensors (the compile check), 4 on CPU
    (the interpreter)."""
    if device.type != "cuda":
        return 132 if device.type == "meta" else 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROCESSORS:
        _PROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROCESSORS[index]


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
    configuration depends on (dtype first, then group and flags)."""
    if interpreter:
        return INTERPRETER
    capability = _capability(tensor)
    dtype_bytes = key[0].itemsize if key and isinstance(key[0], torch.dtype) else 2
    options = candidates(pass_name, block_d, capability, decode, dtype_bytes)
    if not autotune_enabled() or len(options) == 1:
        return options[0]
    full_key = (pass_name, capability, block_d, decode, *key)
    if full_key not in _TUNED:
        best = _tune(options, launch)
        if best is None:  # timing could not run (memory): the default, untimed; tuned again on a later call
            return options[0]
        _TUNED[full_key] = best
    return _TUNED[full_key]


def _capability(tensor: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(tensor.device)


def _benchmark(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _tune(options: list[TileConfig], launch: Callable[[TileConfig], None]) -> TileConfig | None:
    """The fastest of ``options``; None when timing itself ran out of memory. A candidate that fails to compile or
    launch is skipped (its error is kept); when none runs, the first error is raised."""
    best, best_ms, errors = None, float("inf"), []
    for config in options:
        try:
            ms = _benchmark(lambda config=config: launch(config))
        except torch.OutOfMemoryError:
            return None
        except Exception as exc:  # a compile / resource error of this candidate on this GPU: not a candidate here
            errors.append(exc)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise errors[0]
    return best


def tuned_configs() -> dict[tuple, TileConfig]:
    """What the autotuner chose in this process (benchmarks/gpu_check.py reports it)."""
    return dict(_TUNED)
