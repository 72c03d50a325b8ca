"""Writing result tables: one CSV writer shared by the trainer, the benchmarks and the demos."""

from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Sequence

from .files import atomic_write_text


def csv_text(rows: Sequence[dict], fields: Sequence[str] | None = None, float_format: str | None = None) -> str:
    """``rows`` as CSV text; columns ``fields`` or every key in order of first appearance; floats with
    ``float_format`` (e.g. ``"{:.6g}"``) or ``repr`` (exact) when None. Empty ``rows``: ``""``."""
    if not rows:
        return ""
    if fields is None:
        fields = []
        for row in rows:
            fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if float_format is not None:
            row = {k: (float_format.format(v) if isinstance(v, float) else v) for k, v in row.items()}
        writer.writerow(row)
    return buffer.getvalue()


def add_out_argument(parser) -> None:
    """The benchmarks' ``--out`` option (read with :func:`output_csv`): a directory, or a path ending in ``.csv``."""
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output directory (default: benchmarks/results; a path ending in .csv names the file)",
    )


def output_csv(out: str | pathlib.Path | None, default_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Where a benchmark writes its CSV (its PNG goes beside it): ``--out`` names a directory, as for every other
    tool (the file is ``name`` there); a path ending in ``.csv`` is taken as the file itself (the older spelling).
    None: ``default_dir / name``."""
    if out is None:
        return pathlib.Path(default_dir) / name
    out = pathlib.Path(out)
    return out if out.suffix.lower() == ".csv" else out / name


def write_csv(rows: Sequence[dict], path: pathlib.Path, fields: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` atomically (parents created), floats as ``%.6g``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, csv_text(rows, fields, "{:.6g}"))


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
