"""The result files of a run of the grid, reading them back and merging parts run side by side."""

from __future__ import annotations

import csv
import pathlib

from mit.utils.results import write_csv

from .config import RECIPE_FIELDS, TASKS
from .plot import plot
from .selection import METRIC_KEYS, setting, summarise


def write_results(runs, curves, selectivity, out_dir: pathlib.Path, stem: str) -> list[dict]:
    """Write ``{stem}.csv`` (the summary per variant), ``{stem}_runs.csv`` (every run: validation and test metrics),
    ``{stem}_curves.csv`` (training losses), ``{stem}_selectivity.csv`` and ``{stem}.png``; return the summary."""
    summary = summarise(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(summary, out_dir / f"{stem}.csv")
    write_csv(runs, out_dir / f"{stem}_runs.csv")
    write_csv(curves, out_dir / f"{stem}_curves.csv")
    if selectivity:
        write_csv(selectivity, out_dir / f"{stem}_selectivity.csv")
    plot(summary, runs, curves, selectivity, out_dir / f"{stem}.png")
    return summary


def read_rows(path: pathlib.Path) -> list[dict]:
    """A CSV written by :func:`write_results`, numbers parsed (empty cells dropped)."""

    def parse(value: str):
        for kind in (int, float):  # counts and seeds stay integers (write_csv writes floats with 6 digits)
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def merge_runs(dirs: list[pathlib.Path], out_dir: pathlib.Path, stem: str = "neural_digits") -> list[dict]:
    """Merge the ``{stem}_runs.csv`` / ``_curves.csv`` / ``_selectivity.csv`` of several invocations (parts of the
    grid run side by side) into one set of results in ``out_dir``. Runs are deterministic, so a run (variant, steps,
    lr, seed) present in several parts (e.g. repeated for more selectivity doses) must have the same metrics there and
    is kept once, with its first part's curves; different metrics are an error, as are different results of one
    selectivity condition (run, condition, units off). Rows written before they recorded (all of) their recipe get
    their run's, and the defaults for what the run did not record either."""
    runs, curves, selectivity = {}, {}, {}
    for d in dirs:
        d = pathlib.Path(d)
        if not (d / f"{stem}_runs.csv").exists():
            raise ValueError(f"from_runs: {d} has no {stem}_runs.csv")
        mine = [_with_recipe(r) for r in read_rows(d / f"{stem}_runs.csv")]
        recipes = {(r["variant"], float(r["lr"]), int(r["seed"])): {f: r[f] for f in RECIPE_FIELDS} for r in mine}
        new = set()
        for r in mine:
            key = (*setting(r), float(r["lr"]), int(r["seed"]))
            if key not in runs:
                runs[key] = r
                new.add(key)
            elif any(runs[key].get(k) != r.get(k) for k in _run_metric_keys(runs[key], r)):
                raise ValueError(f"from_runs: run {key} appears twice with different metrics (in {d})")
        for c in read_rows(d / f"{stem}_curves.csv"):
            c = {**recipes[(c["variant"], float(c["lr"]), int(c["seed"]))], **c}  # older rows: their run's recipe
            run = (*setting(c), float(c["lr"]), int(c["seed"]))
            if run in new:
                curves[(*run, c["run"], int(c["step"]))] = c
        if (d / f"{stem}_selectivity.csv").exists():  # the selectivity test runs on neural runs only
            for r in read_rows(d / f"{stem}_selectivity.csv"):
                r = {**recipes[("neural", float(r["lr"]), int(r["seed"]))], **r}  # older rows: their run's recipe
                key = (*setting({"variant": "neural", **r}), float(r["lr"]), int(r["seed"]), r["condition"],
                       int(r["units_off"]))  # fmt: skip
                if key in selectivity and any(float(selectivity[key][t]) != float(r[t]) for t in TASKS):
                    raise ValueError(f"from_runs: selectivity {key} appears twice with different metrics (in {d})")
                selectivity.setdefault(key, r)
    return write_results(list(runs.values()), list(curves.values()), list(selectivity.values()), out_dir, stem)


def _with_recipe(row: dict) -> dict:
    """A run's ``row`` with every recipe field (:data:`RECIPE_FIELDS`), the defaults for those it predates."""
    return {**row, **dict(zip(RECIPE_FIELDS, setting(row)[1:]))}


def _run_metric_keys(first: dict, second: dict) -> list[str]:
    """The keys two rows of one run must agree on: every validation and test metric either holds (not times)."""
    return [k for k in {*first, *second} if k.startswith("val_") or k in METRIC_KEYS]
