"""Writing result tables: one CSV writer shared by the benchmarks and the demos."""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence


def write_csv(rows: Sequence[dict], path: pathlib.Path, fields: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` (parents created), floats as ``%.6g``; columns ``fields`` or the first row's keys."""
    fields = list(fields) if fields is not None else list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend, or None (and one line saying how to get the plots) when
    matplotlib is not installed: plots are optional extras (``pip install "mit[bench]"``), the CSVs are not."""
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no PNG written (pip install "mit[bench]" for the plots)')
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
