"""Every benchmark's --out names a directory (as for the other tools); a path ending in .csv still names the file."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from mit.utils.results import output_csv

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_out_is_a_directory_or_an_explicit_csv(tmp_path):
    default = pathlib.Path("benchmarks/results")
    assert output_csv(None, default, "flops.csv") == default / "flops.csv"
    assert output_csv(tmp_path, default, "flops.csv") == tmp_path / "flops.csv"
    assert output_csv(str(tmp_path / "new"), default, "flops.csv") == tmp_path / "new" / "flops.csv"
    assert output_csv(tmp_path / "mine.CSV", default, "flops.csv") == tmp_path / "mine.CSV"


def test_a_benchmark_writes_into_the_directory_it_is_given(tmp_path):
    """flops.py --quick (seconds: FLOPs are counted on the meta device) with --out a directory that does not exist."""
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "flops.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "flops.csv").stat().st_size > 0
