"""Choosing a learning rate on validation, grouping runs into settings, and the summary per setting."""

from __future__ import annotations

import math
import statistics

from .config import RECIPE_FIELDS, TASKS, NeuralDigitsConfig, recipe


def validation_score(metrics: dict[str, float], tasks: tuple[str, ...] | None = None) -> float:
    """What a learning rate is chosen by: the mean over ``tasks`` (None: every task with validation metrics in
    ``metrics``) of the validation accuracy (caption, draw) or mIoU (segmentation: unlike P@0.5 it has no threshold
    a degenerate mask can sit on; a random half or the whole canvas scores 0.5)."""
    if tasks is None:
        tasks = tuple(t for t in TASKS if f"val_{t}_accuracy" in metrics or f"val_{t}_miou" in metrics)
    keys = [f"val_{t}_accuracy" if t in ("caption", "draw") else f"val_{t}_miou" for t in tasks]
    return statistics.fmean(float(metrics[k]) for k in keys)


def beyond_edge(chosen: float, tried: list[float]) -> float | None:
    """Half a decade beyond ``chosen`` on the 1, 3, 10, 30 ... grid when it is the smallest (or largest) of ``tried``,
    else None: a choice at the edge of a sweep says the best may lie outside it."""
    if chosen == min(tried):
        further = chosen / 10**0.5
    elif chosen == max(tried):
        further = chosen * 10**0.5
    else:
        return None
    exponent = math.floor(math.log10(further))
    mantissa = further / 10**exponent
    return float(f"{(1 if mantissa < 1.7 else 3 if mantissa < 5.5 else 10) * 10**exponent:.0e}")


def choose_lr(runs: list[dict], seed: int) -> float:
    """The learning rate of the run with the best :func:`validation_score` among ``runs`` at ``seed`` (ties: the
    smaller lr)."""
    candidates = sorted((r for r in runs if int(r["seed"]) == seed), key=lambda r: (-validation_score(r), r["lr"]))
    if not candidates:
        raise ValueError(f"runs: no run at seed {seed} to choose a learning rate from")
    return float(candidates[0]["lr"])


_RECIPE_DEFAULTS = recipe(NeuralDigitsConfig())  # what a row that predates a recipe field ran with


def setting(row: dict) -> tuple:
    """A run's (variant, *recipe): the runs a learning rate is chosen among, and one row of the summary (runs of a
    variant with another recipe, e.g. more steps, are another experiment, never averaged with these). A field a row
    predates has its default."""
    values = []
    for field, default in _RECIPE_DEFAULTS.items():
        value = row.get(field, default)
        values.append(value in (True, "True", 1) if isinstance(default, bool) else type(default)(value))
    return (str(row["variant"]), *values)


def setting_label(row: dict, rows: list[dict]) -> str:
    """The variant of ``row``, with the recipe fields that differ among ``rows`` (e.g. "neural steps 800")."""
    keys = [setting(r) for r in rows]
    varying = [i for i, field in enumerate(RECIPE_FIELDS) if len({k[i + 1] for k in keys}) > 1]
    mine = setting(row)
    return " ".join([mine[0], *(f"{RECIPE_FIELDS[i]} {mine[i + 1]:g}" if isinstance(mine[i + 1], float)
                                 else f"{RECIPE_FIELDS[i]} {mine[i + 1]}" for i in varying)])  # fmt: skip


def summarise(runs: list[dict]) -> list[dict]:
    """One row per :func:`setting` (variant, recipe): its learning rate chosen on validation at the first seed, and
    the test metrics of that learning rate, mean / min / max over its seeds."""
    out = []
    for group in dict.fromkeys(setting(r) for r in runs):
        mine = [r for r in runs if setting(r) == group]
        variant = group[0]
        first = min(int(r["seed"]) for r in mine)
        lr = choose_lr(mine, first)
        chosen = [r for r in mine if float(r["lr"]) == lr]
        tried = " ".join(f"{x:g}" for x in sorted({float(r["lr"]) for r in mine}))
        row = {"variant": variant, "lr": lr, "lrs_tried": tried, "seeds": " ".join(str(int(r["seed"])) for r in chosen),
               **dict(zip(RECIPE_FIELDS, group[1:]))}  # fmt: skip
        row["val_score"] = statistics.fmean(validation_score(r) for r in chosen)
        for key in METRIC_KEYS:
            values = [float(r[key]) for r in chosen if r.get(key) not in (None, "")]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        row["trainable_params"] = chosen[0]["trainable_params"]
        row["train_seconds"] = statistics.fmean(float(r["train_seconds"]) for r in chosen)
        out.append(row)
    return out


METRIC_KEYS = ("caption_accuracy", "draw_accuracy", "segment_digit_miou", "segment_digit_p50", "segment_larger_miou",
               "segment_larger_p50", "segment_digit_p50_incl", "segment_larger_p50_incl")  # fmt: skip
