"""The full compile matrix of the Triton kernels, for real GPU targets, on a machine without a GPU.

    python benchmarks/compile_check.py                      # sm_80 + sm_90 (+ sm_100 where Triton targets it)
    python benchmarks/compile_check.py --arch 80 90 --jobs 2

Writes ``benchmarks/results/compile_check_triton<version>.csv`` (one row per compile: errors, registers, stack
(spill) bytes, shared memory against the target's limit, tensor-core instructions, and the plain flash-attention
yardstick on the same tile) and ``.md`` (the summary and every target violation); exits 1 on a violation. Rows are
appended as they are compiled and an interrupted run resumes (rows compiled from other kernel sources are redone):
the whole matrix takes about 1.5 hours on 2 cores.
See :mod:`mit_kernels.compile_check` for what is compiled and which targets are checked.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mit_kernels import compile_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=(80, 90, 100), help="targets (default: all supported)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the CSV and the summary")
    args = parser.parse_args(argv)
    stem = os.path.join(args.out, f"compile_check_triton{compile_check.triton_version()}")
    return compile_check.main(
        ["--full", "--resume", "--jobs", str(args.jobs), "--csv", stem + ".csv", "--summary", stem + ".md"]
        + (["--arch", *map(str, args.arch)] if args.arch else [])
    )


if __name__ == "__main__":
    sys.exit(main())
