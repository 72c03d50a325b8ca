"""Compile every Triton kernel the package can launch for real GPU targets, on a machine without a GPU.

Triton's compiler, ptxas and cuobjdump ship in the Triton wheel, so a kernel compiles for sm_80 / sm_90 (and sm_100
where the installed Triton targets it) anywhere. The interpreter, which runs the tests without a GPU, compiles
nothing: a kernel can pass every interpreter test and not compile, or compile and spill. This module compiles the
exact launches the package makes (:class:`mit_kernels.triton_common.Launch`, built by the same plan objects that run
them, on meta tensors with the shapes, strides and alignment of a real contiguous launch, so Triton applies the same
divisibility specialisation) and records, per compile:

- compiled or the error; shared memory against the target's per-block limit (and whether the tile-choice rule of
  :mod:`mit_kernels.triton_configs` kept the candidate, and its bound);
- registers and stack (local-memory, i.e. spill) bytes per thread (``cuobjdump --dump-resource-usage``);
- tensor-core instructions in the SASS: HMMA (mma.sync, sm_80), HGMMA (wgmma, sm_90), UTC*MMA (tcgen05, sm_100);

next to the yardstick: a plain flash-attention forward / backward (:mod:`mit_kernels.triton_yardstick`) compiled on
the same tile, dtype, head dim and target, for the rows the lean targets below apply to (:func:`lean_target`).
``python -m mit_kernels compile-check`` runs a bounded subset (each kernel's default tile, bf16 at head dims 64 and
128, fp32 at 64, sm_90: what CI runs; ``--head-dims`` narrows it); ``--full`` the whole matrix
(benchmarks/compile_check.py writes it to benchmarks/results/). Targets checked (:func:`violations`): no compile
failure; every candidate the rule keeps fits and the rule's bound holds; for fp16 / bf16 and head dims up to 128 every
fast pass's default tile on sm_80 and sm_90 spills no more than the yardstick, has tensor-core MMAs of the target's
kind (wgmma on sm_90, decode included) and at most 1.25x the yardstick's shared memory; the decode step's
fixed-tile split and combine passes spill nothing there (fp16 / bf16); fp32 and every head dim have a default tile
that fits an A100.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable

import torch

HEAD_DIMS = (16, 32, 64, 128, 256)  # every head-dim bucket the Triton kernels accept (D <= 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_PASSES = ("fwd", "bwd_dq", "bwd_dkdv")
DECODE_PASSES = ("decode_split", "decode_combine")  # fixed tiles (not tuned): they must spill nothing
MMA_KIND = {80: "HMMA", 90: "HGMMA", 100: "UTCMMA"}
CSV_FIELDS = (
    "case", "source", "kernel", "pass", "variant", "arch", "dtype", "head_dim", "causal", "rescale", "kv_mask", "group",
    "decode", "block_m", "block_n", "num_warps", "num_stages", "default", "kept", "compiled", "error", "shared",
    "shared_limit", "shared_bound", "fits", "registers", "stack", "mma", "seconds", "yard_registers", "yard_stack",
    "yard_shared", "yard_mma",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch to compile. ``pass_name``: infuse, fwd, decode_split, decode_combine, delta, bwd_dq, bwd_dkdv,
    infusion_bwd, ffn_fwd, ffn_bwd;
    ``exact``: the NaN / Inf variant of an attention pass; ``config``: the tile (None: the pass's fixed one)."""

    pass_name: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    causal: bool = True
    rescale: bool = True
    kv_mask: bool = True
    group: int = 4
    decode: bool = False
    exact: bool = False
    config: object = None
    default: bool = True
    ffn_shape: tuple[int, int] = (256, 1536)  # (L, F) of an FFN case


def triton_version() -> str:
    import triton

    return triton.__version__


def _bin(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def supported_archs() -> list[int]:
    """sm_80 and sm_90, and sm_100 when the installed Triton compiles for it (it ships ptxas-blackwell)."""
    archs = [80, 90]
    if os.path.exists(_bin("ptxas-blackwell")):
        archs.append(100)
    return archs


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def attention_inputs(case: Case, batch: int = 2, hkv: int = 2, length: int = 512):
    """Meta tensors of a contiguous launch: (q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask)."""
    lq = 1 if case.decode else length
    d, dt = case.head_dim, case.dtype
    q = _meta(batch, hkv * case.group, lq, d, dtype=dt)
    k, v = _meta(batch, hkv, length, d, dtype=dt), _meta(batch, hkv, length, d, dtype=dt)
    vectors = [_meta(batch, hkv, d, dtype=dt) for _ in range(4)]
    mask = _meta(batch, length, dtype=torch.bool) if case.kv_mask else None
    return q, k, v, *vectors, _meta(hkv, dtype=torch.float32), mask


def build_launch(case: Case):
    """The :class:`~mit_kernels.triton_common.Launch` the package makes for ``case``."""
    from . import triton_attention as ta
    from . import triton_ffn
    from .triton_configs import exact_config

    if case.pass_name in ("ffn_fwd", "ffn_bwd"):
        length, features = case.ffn_shape
        x = _meta(2, length, features, dtype=case.dtype)
        m = _meta(2, features, dtype=case.dtype)
        if case.pass_name == "ffn_fwd":
            return triton_ffn.ffn_gate_fwd_launch(x, x, m)[0]
        return triton_ffn.ffn_gate_bwd_launch(x, x, x, m)[0]
    inputs = attention_inputs(case)
    if case.pass_name in DECODE_PASSES:  # a generation step (Lq = 1): split pass, then combine pass
        plan = ta.ForwardPlan(*inputs, case.causal, case.head_dim**-0.5, case.rescale)
        return plan.decode_launches()[DECODE_PASSES.index(case.pass_name)]
    if case.pass_name in ("infuse", "fwd"):
        plan = ta.ForwardPlan(*inputs, case.causal, case.head_dim**-0.5, case.rescale)
        if case.pass_name == "infuse":
            return plan.infuse_launch()[0]
        return plan.attention(exact_config(case.config, "fwd") if case.exact else case.config, exact=case.exact)
    q = inputs[0]
    plan = ta.BackwardPlan(q, *inputs, q, _meta(*q.shape[:3], dtype=torch.float32), case.causal,
                           case.head_dim**-0.5, case.rescale)  # fmt: skip
    if case.pass_name == "delta":
        return plan.delta_launch()
    if case.pass_name == "infusion_bwd":
        return plan.infusion_launch()
    build = plan.dq_launch if case.pass_name == "bwd_dq" else plan.dkdv_launch
    return build(exact_config(case.config, case.pass_name) if case.exact else case.config, exact=case.exact)


def compile_launch(launch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` exactly as a launch on such a GPU would (same binder, same
    specialisation of the arguments, same options). Returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def cubin_statistics(compiled, arch: int) -> dict:
    """Registers and stack bytes per thread, shared memory, and tensor-core instructions of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
    if match is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage.stdout[-500:]} {usage.stderr[-500:]}")
    pattern = {80: r"\bHMMA\b", 90: r"\bHGMMA\b", 100: r"\bUTC\w*MMA\b"}[arch]
    return {
        "registers": int(match.group(1)),
        "stack": int(match.group(2)) + int(match.group(3)),
        "shared": int(compiled.metadata.shared),
        "mma": len(re.findall(pattern, sass.stdout)),
    }


@functools.cache
def _yardstick_stats(case: Case) -> dict:
    """The yardstick's statistics for ``case`` (cached: padding mask and rescaling do not change it)."""
    return _compile_stats(_yardstick_launch(case), case.arch)


def _yardstick_launch(case: Case):
    from . import triton_yardstick
    from .triton_attention import dot_settings
    from .triton_common import Launch

    q, k = attention_inputs(case)[:2]
    out, lse = torch.empty_like(q), _meta(*q.shape[:3], dtype=torch.float32)
    grid, args, kwargs = triton_yardstick.yardstick_launch_args(
        case.pass_name, q, k, out, lse, case.group, case.causal, case.config, dot_settings(case.dtype)["PRECISION"]
    )
    return Launch(f"plain_{case.pass_name}", triton_yardstick.YARDSTICK[case.pass_name], grid, args, kwargs)


def _compile_stats(launch, arch: int) -> dict:
    start = time.perf_counter()
    try:
        stats = cubin_statistics(compile_launch(launch, arch), arch)
        stats.update(compiled=True, error="")
    except Exception as exc:  # a compile error is a result of the check, recorded with its first line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        stats = {"compiled": False, "error": f"{type(exc).__name__}: {first}", "registers": "", "stack": "",
                 "shared": "", "mma": ""}  # fmt: skip
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


def case_key(case: Case) -> str:
    """A stable text key of ``case`` (the CSV's ``case`` column, what ``--resume`` matches)."""
    fields = dataclasses.asdict(case)
    fields["dtype"] = str(case.dtype).removeprefix("torch.")
    fields["config"] = str(case.config)
    return repr(tuple(fields.values()))


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of what decides a compile and the Triton version (the CSV's ``source`` column: ``--resume`` reuses a row
    only when it was compiled from the same kernels by the same Triton): the kernel modules, and of
    :mod:`mit_kernels.triton_configs` what a launch takes from it besides its case's tile (the exact variant's tile,
    the elementwise kernels' rows, the decode bound, the split decode's tile and splits). The tile rule (candidates,
    shared-memory bound, limits) is not in it: a row's tile is part of its case, and the rule's columns are recomputed
    when a row is reused."""
    import hashlib
    import inspect

    from . import triton_configs

    digest = hashlib.sha256(triton_version().encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("triton_attention.py", "triton_ffn.py", "triton_common.py", "triton_yardstick.py"):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    for function in (triton_configs.exact_config, triton_configs.elementwise_rows, triton_configs.decode_tile,
                     triton_configs.decode_splits):  # fmt: skip
        digest.update(inspect.getsource(function).encode())
    constants = (triton_configs.DECODE_ROWS, triton_configs.DECODE_SPLIT_MAX_GROUP, triton_configs.INTERPRETER)
    digest.update(repr(constants).encode())
    return digest.hexdigest()[:16]


def rule_columns(case: Case) -> dict:
    """What the tile rule of :mod:`mit_kernels.triton_configs` says of a fast attention case's tile: kept, and its
    shared-memory bound."""
    from .triton_configs import fits, shared_bytes

    capability = (case.arch // 10, case.arch % 10)
    size = case.dtype.itemsize
    return {
        "kept": fits(case.pass_name, case.config, case.head_dim, size, capability),
        "shared_bound": shared_bytes(case.pass_name, case.config, case.head_dim, size, capability),
    }


def run_case(case: Case) -> dict:
    """Compile one case (and its yardstick, for fast attention passes) and return its CSV row."""
    from .triton_configs import shared_limit

    launch = build_launch(case)
    config = launch.config
    capability = (case.arch // 10, case.arch % 10)
    row = {
        "case": case_key(case), "source": source_hash(),
        "kernel": getattr(launch.kernel, "__name__", str(launch.kernel)), "pass": case.pass_name,
        "variant": "exact" if case.exact else "fast", "arch": case.arch,
        "dtype": str(case.dtype).removeprefix("torch."),
        "head_dim": case.head_dim, "causal": case.causal, "rescale": case.rescale, "kv_mask": case.kv_mask,
        "group": case.group, "decode": case.decode, "default": case.default,
        "block_m": getattr(config, "block_m", ""), "block_n": getattr(config, "block_n", ""),
        "num_warps": launch.kwargs.get("num_warps", ""), "num_stages": launch.kwargs.get("num_stages", ""),
        "shared_limit": shared_limit(capability), "kept": "", "shared_bound": "",
    }  # fmt: skip
    row.update(_compile_stats(launch, case.arch))
    row["fits"] = bool(row["compiled"]) and row["shared"] <= row["shared_limit"]
    if case.pass_name in ATTENTION_PASSES and not case.exact:
        row.update(rule_columns(case))
    if lean_target(row):  # the yardstick is compiled only where a target compares with it
        yard = _yardstick_stats(dataclasses.replace(case, kv_mask=False, rescale=False, default=False))
        row.update({f"yard_{k}": yard[k] for k in ("registers", "stack", "shared", "mma")})
    else:
        row.update({f"yard_{k}": "" for k in ("registers", "stack", "shared", "mma")})
    return row


def lean_target(row: dict) -> bool:
    """Whether the lean targets (spill, tensor-core MMAs, shared memory beside the yardstick) apply to ``row``: the
    default tile of a fast attention pass, fp16 / bf16, head dim up to 128, sm_80 or sm_90."""
    return (
        row["pass"] in ATTENTION_PASSES and row["variant"] == "fast" and bool(row["default"])
        and row["dtype"] in ("float16", "bfloat16") and row["head_dim"] <= 128 and row["arch"] in (80, 90)
    )  # fmt: skip


def _attention_cases(arch, dtypes, head_dims, flags, every_tile: bool) -> Iterable[Case]:
    from .triton_configs import all_candidates, candidates

    capability = (arch // 10, arch % 10)
    for dtype, d, (causal, rescale, kv_mask, group) in itertools.product(dtypes, head_dims, flags):
        common = dict(arch=arch, dtype=dtype, head_dim=d, kv_mask=kv_mask, group=group)
        yield Case("infuse", rescale=rescale, **common)
        yield Case("infusion_bwd", rescale=rescale, **common)
        yield Case("delta", **common)
        yield Case("decode_split", rescale=rescale, causal=causal, decode=True, **common)
        yield Case("decode_combine", decode=True, **common)
        for pass_name, decode in (("fwd", False), ("fwd", True), ("bwd_dq", False), ("bwd_dkdv", False)):
            # rescale only changes the kernels that compute the gate: the decode forward (the others get False)
            rescales = (rescale,) if decode else (False,)
            default = candidates(pass_name, d, capability, decode, dtype.itemsize)[0]
            tiles = all_candidates(pass_name, d, capability, decode) if every_tile else [default]
            for config, resc in itertools.product(tiles, rescales):
                base = Case(pass_name, causal=causal, rescale=resc, decode=decode, config=config,
                            default=config == default, **common)  # fmt: skip
                yield base
                if config == default:
                    yield dataclasses.replace(base, exact=True)


def subset_cases(archs: Iterable[int] = (90,), head_dims: Iterable[int] = (64, 128)) -> list[Case]:
    """What CI compiles: every kernel's default tile in bf16 at head dims 64 and 128 (or ``head_dims``) and in fp32 at
    the smallest of them, causal with padding, GQA 4, head rescaling; decode and prefill; the FFN gate. fp32 has no
    lean target, only compile-and-fit, and its tiles are the same kernels at other constants: one head dim shows its
    lowering (the other's rows are in the full matrix); compiling them was a third of the subset's time."""
    head_dims = tuple(head_dims)
    bad = [d for d in head_dims if d not in HEAD_DIMS]
    if not head_dims or bad:
        raise ValueError(f"head_dims must be a non-empty subset of {HEAD_DIMS}, got {head_dims}")
    out = []
    for arch in archs:
        flags = [(True, True, True, 4)]
        out += _attention_cases(arch, (torch.bfloat16,), head_dims, flags, every_tile=False)
        out += _attention_cases(arch, (torch.float32,), (min(head_dims),), flags, every_tile=False)
        out += [Case(p, arch, dt, 0) for p in ("ffn_fwd", "ffn_bwd") for dt in (torch.bfloat16, torch.float32)]
    return _unique(out)


def full_cases(archs: Iterable[int] | None = None) -> list[Case]:
    """The full matrix: every dtype x head-dim bucket x flag combination (causal, rescale, padding mask, GQA 1 / 4,
    decode / prefill) at the default tiles with their exact variants, plus every candidate tile (kept by the rule or
    not) at one flag combination; FFN gates over the row / feature tilings a launch can get."""
    out = []
    every_flag = list(itertools.product((True, False), (True, False), (True, False), (1, 4)))
    for arch in archs or supported_archs():
        out += _attention_cases(arch, DTYPES, HEAD_DIMS, every_flag, every_tile=False)
        out += _attention_cases(arch, DTYPES, HEAD_DIMS, [(True, True, True, 4)], every_tile=True)
        for pass_name, dtype, shape in itertools.product(
            ("ffn_fwd", "ffn_bwd"), DTYPES, ((1, 1536), (2, 1536), (4, 11008), (256, 1536), (256, 64))
        ):
            out.append(Case(pass_name, arch, dtype, 0, ffn_shape=shape))
    return _unique(out)


def _unique(cases: list[Case]) -> list[Case]:
    return list(dict.fromkeys(cases))


def run(cases: list[Case], jobs: int = 1, progress: bool = True, on_row=None) -> list[dict]:
    """Compile ``cases`` (``jobs`` processes) and return their rows, in order; ``on_row(row)`` is called as each
    one is done (the CLI appends it to the CSV, so an interrupted run can resume). Needs the kernels defined for
    compilation: ValueError under ``TRITON_INTERPRET=1`` (the interpreter's kernels cannot be compiled)."""
    from .triton_common import interpreter_active

    if interpreter_active():
        raise ValueError(
            "the compile check compiles for real GPUs: run it without TRITON_INTERPRET=1 (the kernels were defined "
            "for the interpreter)"
        )
    # Cases that share a yardstick compile go to the same worker (its cache), in chunks of at most 16 and at least two
    # per worker (a short list is shared out evenly); rows come back in order.
    order = sorted(range(len(cases)), key=lambda i: _yardstick_key(cases[i]))
    ordered = [cases[i] for i in order]
    if jobs <= 1:
        done = map(run_case, ordered)
        pool = None
    else:
        pool = concurrent.futures.ProcessPoolExecutor(jobs)
        done = pool.map(run_case, ordered, chunksize=max(1, min(16, -(-len(ordered) // (2 * jobs)))))
    rows = [None] * len(cases)
    try:
        for position, row in zip(order, _progress(done, progress, len(cases))):
            rows[position] = row
            if on_row is not None:
                on_row(row)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


def _yardstick_key(case: Case) -> tuple:
    return (case.arch, case.pass_name, str(case.dtype), case.head_dim, case.causal, case.group, case.decode,
            str(case.config), case.exact, case.kv_mask, case.rescale)  # fmt: skip


def _progress(items, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="compile-check", unit="kernel")


def violations(rows: list[dict]) -> list[str]:
    """Every way ``rows`` miss the targets (module docstring); empty when all hold."""
    out = []
    for r in rows:
        where = (f"{r['pass']}/{r['variant']} sm_{r['arch']} {r['dtype']} D{r['head_dim']} causal={r['causal']} "
                 f"mask={r['kv_mask']} group={r['group']} decode={r['decode']} tile={r['block_m']}x{r['block_n']}"
                 f"/{r['num_warps']}w{r['num_stages']}s")  # fmt: skip
        if not r["compiled"]:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["kept"] is True and not r["fits"]:
            out.append(f"{where}: kept by the rule but needs {r['shared']} B of shared memory > {r['shared_limit']}")
        if r["shared_bound"] != "" and r["shared"] > r["shared_bound"]:
            out.append(f"{where}: shared memory {r['shared']} B above the rule's bound {r['shared_bound']}")
        if r["default"] and r["variant"] == "fast" and not r["fits"] and r["arch"] in (80, 90):
            out.append(f"{where}: the default tile does not fit ({r['shared']} > {r['shared_limit']} B)")
        if (r["pass"] in DECODE_PASSES and r["dtype"] in ("float16", "bfloat16") and r["arch"] in (80, 90)
                and r["head_dim"] <= 128 and r["stack"]):  # fmt: skip
            out.append(f"{where}: {r['stack']} B of stack (spill) per thread in a fixed-tile decode pass")
        if lean_target(r):
            if r["stack"] > r["yard_stack"]:
                out.append(f"{where}: {r['stack']} B of stack (spill) per thread > the yardstick's {r['yard_stack']}")
            if r["mma"] == 0:
                out.append(f"{where}: no {MMA_KIND[r['arch']]} instruction")
            if r["yard_shared"] and r["shared"] > 1.25 * r["yard_shared"]:
                out.append(f"{where}: shared memory {r['shared']} B > 1.25x the yardstick's {r['yard_shared']}")
    return out


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


_INT_FIELDS = ("arch", "head_dim", "group", "shared", "shared_limit", "shared_bound", "registers", "stack", "mma",
               "yard_registers", "yard_stack", "yard_shared", "yard_mma", "block_m", "block_n", "num_warps",
               "num_stages")  # fmt: skip
_BOOL_FIELDS = ("causal", "rescale", "kv_mask", "decode", "default", "kept", "compiled", "fits")


def read_csv(path: str) -> list[dict]:
    """Rows written by :func:`write_csv` (or appended by the CLI), with their numbers and flags typed again."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for name in _INT_FIELDS:
            row[name] = int(row[name]) if row[name] not in ("", None) else ""
        for name in _BOOL_FIELDS:
            row[name] = {"True": True, "False": False}.get(row[name], "")
        row["seconds"] = float(row["seconds"] or 0)
    return rows


def summary(rows: list[dict]) -> str:
    """A short markdown summary: counts, failures, and the default tiles' statistics beside the yardstick."""
    compiled = sum(1 for r in rows if r["compiled"])
    bad = violations(rows)
    lines = [
        f"Triton {triton_version()}, torch {torch.__version__}: {len(rows)} compiles, {compiled} compiled, "
        f"{len(rows) - compiled} failed; {len(bad)} target violations.",
        "",
        "Default tiles of the fast attention passes, causal, padding mask, GQA 4 (registers / stack bytes / shared "
        "bytes / tensor-core instructions); the fp16 / bf16 rows up to head dim 128 carry the lean targets and stand "
        "beside the plain flash-attention yardstick on the same tile (not compiled for the other rows):",
        "",
        "| pass | sm | dtype | D | decode | tile | MiT reg | MiT stack | MiT shared | MiT MMA | plain reg "
        "| plain stack | plain shared | plain MMA |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if (r["pass"] in ATTENTION_PASSES and r["variant"] == "fast" and r["default"] and r["causal"] and r["kv_mask"]
                and r["group"] == 4 and r["compiled"]):  # fmt: skip
            lines.append(
                f"| {r['pass']} | {r['arch']} | {r['dtype']} | {r['head_dim']} | {r['decode']} | {r['block_m']}x"
                f"{r['block_n']}/{r['num_warps']}w{r['num_stages']}s | {r['registers']} | {r['stack']} | {r['shared']} "
                f"| {r['mma']} | {r['yard_registers']} | {r['yard_stack']} | {r['yard_shared']} | {r['yard_mma']} |"
            )
    lines += ["", "Violations:" if bad else "No violations.", *[f"- {v}" for v in bad]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m mit_kernels compile-check``: compile, print the summary, exit 1 on any violation."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mit_kernels compile-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full matrix (default: the bounded CI subset)")
    parser.add_argument("--arch", type=int, nargs="+", choices=(80, 90, 100), help="targets (default: subset sm_90)")
    parser.add_argument("--head-dims", type=int, nargs="+", choices=HEAD_DIMS,
                        help="head dims of the subset (default: 64 128; fp32 at the smallest; the full matrix has "
                        "every bucket)")  # fmt: skip
    parser.add_argument("--csv", help="write every row to this CSV file")
    parser.add_argument("--summary", help="write the markdown summary to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--limit", type=int, help="compile only the first N cases (a smoke test of the check)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the rows of --csv compiled from the same sources and Triton; compile only the missing cases",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.full and args.head_dims:
        parser.error("--head-dims selects the subset's head dims; --full compiles every bucket")
    cases = full_cases(args.arch) if args.full else subset_cases(args.arch or (90,), args.head_dims or (64, 128))
    cases = cases[: args.limit] if args.limit else cases
    kept = {}
    if args.resume and args.csv and os.path.exists(args.csv):
        existing = read_csv(args.csv)
        kept = {r["case"]: r for r in existing if r["source"] == source_hash()}
        if len(kept) < len(existing):  # rows not reused are set aside, never lost
            import shutil
            import sys

            shutil.copyfile(args.csv, args.csv + ".bak")
            message = (
                f"compile-check: reusing {len(kept)} of {len(existing)} rows of {args.csv} (the others were compiled "
                f"from other kernel sources or Triton; all kept in {args.csv}.bak)"
            )
            print(message, file=sys.stderr)
    for case in cases:  # reused rows: the current tile rule's verdict
        if case_key(case) in kept and case.pass_name in ATTENTION_PASSES and not case.exact:
            kept[case_key(case)].update(rule_columns(case))
    todo = [c for c in cases if case_key(c) not in kept]
    if args.csv:  # the rows kept, then each new one as it is done: an interrupted run loses nothing
        write_csv([kept[case_key(c)] for c in cases if case_key(c) in kept], args.csv)
        handle = open(args.csv, "a", newline="")
        import csv

        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)

        def on_row(row: dict) -> None:
            writer.writerow(row)
            handle.flush()
    else:
        handle, on_row = None, None
    try:
        fresh = dict(zip(map(case_key, todo), run(todo, jobs=args.jobs, progress=not args.no_progress, on_row=on_row)))
    finally:
        if handle is not None:
            handle.close()
    rows = [kept.get(case_key(c)) or fresh[case_key(c)] for c in cases]
    if args.csv:
        write_csv(rows, args.csv)  # in case order
    text = summary(rows)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text)
    print(text)
    return 1 if violations(rows) else 0
