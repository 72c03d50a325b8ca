"""Every benchmark's --out names a directory (as for the other tools); a path ending in .csv still names the file."""

from __future__ import annotations

import pathlib

from mit.utils.results import output_csv


def test_out_is_a_directory_or_an_explicit_csv(tmp_path):
    default = pathlib.Path("benchmarks/results")
    assert output_csv(None, default, "flops.csv") == default / "flops.csv"
    assert output_csv(tmp_path, default, "flops.csv") == tmp_path / "flops.csv"
    assert output_csv(str(tmp_path / "new"), default, "flops.csv") == tmp_path / "new" / "flops.csv"
    assert output_csv(tmp_path / "mine.CSV", default, "flops.csv") == tmp_path / "mine.CSV"


# (a benchmark run with --out a directory that does not exist: the flops_rows fixture of
# tests/benchmarks/test_memory_flops.py, whose quick run the FLOP tests read)
