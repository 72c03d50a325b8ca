"""The results figure: test metrics, learning-rate choice, training curves, selectivity."""

from __future__ import annotations

import pathlib
import statistics

from mit.utils.results import pyplot

from .config import TASKS
from .selection import setting, setting_label, validation_score


def plot(summary: list[dict], runs: list[dict], curves: list[dict], selectivity: list[dict], path: pathlib.Path):
    plt = pyplot()
    if plt is None:
        return
    neural = [r for r in summary if r["variant"] == "neural"]
    selectivity = [r for r in selectivity if neural and float(r["lr"]) == neural[0]["lr"]  # the first neural setting
                   and setting({"variant": "neural", **r}) == setting(neural[0])]  # fmt: skip
    doses = sorted({int(r["units_off"]) for r in selectivity if r["condition"] != "none"})
    panels = 3 + bool(selectivity) + (len(doses) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    ax = axes[0]
    width = 0.8 / max(1, len(summary))
    step_counts = sorted({int(r["steps"]) for r in summary})

    def name(row: dict) -> str:  # the variant, with the recipe fields that vary among the settings
        return setting_label(row, summary)

    for i, row in enumerate(summary):
        keys = [f"{t}_accuracy" if t in ("caption", "draw") else f"{t}_p50" for t in TASKS]
        values = [float(row.get(k, float("nan"))) for k in keys]
        low = [v - float(row.get(f"{k}_min", v)) for k, v in zip(keys, values)]
        high = [float(row.get(f"{k}_max", v)) - v for k, v in zip(keys, values)]
        seeds = len(str(row["seeds"]).split())
        ax.bar([j + i * width for j in range(len(TASKS))], values, width, yerr=[low, high], capsize=2,
               label=f"{name(row)} (lr {row['lr']:g}, {seeds} seed{'s' if seeds > 1 else ''})")  # fmt: skip
    ax.axhline(0.9, color="black", linestyle="--", linewidth=1, label="target 0.9")
    ax.plot([-0.2, 1.6], [0.1, 0.1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.plot([1.6, 3.8], [0.5, 0.5], color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TASKS))], ["caption\nacc", "draw\nacc", "seg digit\nP@0.5",
                  "seg larger\nP@0.5"])  # fmt: skip
    steps_text = " / ".join(str(n) for n in step_counts)
    ax.set(ylim=(0, 1.05), title=f"test, chosen lr (bars: seed mean, min-max), {steps_text} steps")
    ax.legend(fontsize=6)
    ax = axes[1]
    for key in dict.fromkeys(setting(r) for r in runs):
        mine = [r for r in runs if setting(r) == key]
        first = min(int(r["seed"]) for r in mine)
        points = sorted((float(r["lr"]), validation_score(r)) for r in mine if int(r["seed"]) == first)
        ax.plot(*zip(*points), marker="o", label=name(mine[0]))
    ax.set(xscale="log", xlabel="adapter learning rate", ylabel="validation score (mean accuracy / mIoU)",
           title="learning-rate choice (validation images)")  # fmt: skip
    ax.legend(fontsize=7)
    ax = axes[2]
    for row in summary:
        first = min(int(s) for s in str(row["seeds"]).split())
        mine = [c for c in curves if setting(c) == setting(row) and float(c["lr"]) == row["lr"]
                and int(c["seed"]) == first]  # fmt: skip
        for run in dict.fromkeys(c["run"] for c in mine):  # one per task group (per_task: four)
            points = [c for c in mine if c["run"] == run]
            window = 10
            losses = [
                statistics.fmean(float(p["loss"]) for p in points[max(0, i - window + 1) : i + 1])
                for i in range(len(points))
            ]
            extra = name(row)[len(row["variant"]) :]  # the recipe fields that vary, if any
            ax.plot([p["step"] for p in points], losses, label=run + extra, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log", title="training loss (chosen lr)")
    ax.legend(fontsize=5)
    if selectivity:
        base_rows = {r["seed"]: r for r in selectivity if r["condition"] == "none"}

        def change(row: dict, task: str) -> float:  # of the task's metric against nothing off, same run
            return float(row[task]) - float(base_rows[row["seed"]][task])

        # the bars: the dose most runs have (every run has the default one)
        dose = max(doses, key=lambda n: (len({r["seed"] for r in selectivity if r["units_off"] == n}), -n))
        at_dose = [r for r in selectivity if int(r["units_off"]) == dose]
        ax = axes[3]
        conditions = list(dict.fromkeys(r["condition"] for r in at_dose))
        width = 0.8 / len(conditions)
        for i, condition in enumerate(conditions):
            mine = [r for r in at_dose if r["condition"] == condition]
            drops = [statistics.fmean(change(r, t) for r in mine) for t in TASKS]
            ax.bar([j + i * width for j in range(len(TASKS))], drops, width, label=condition)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TASKS))], ["caption", "draw", "seg digit", "seg larger"])
        runs_n = len({r["seed"] for r in at_dose})
        ax.set(ylabel="change of the test metric",
               title=f"{dose} units switched off (neural, mean of {runs_n} runs)")  # fmt: skip
        ax.legend(fontsize=6)
    if len(doses) > 1:  # dose-response: each task's change when its own selective units / random units are off
        ax = axes[4]
        seeds = sorted({r["seed"] for r in selectivity if int(r["units_off"]) not in (0, dose)})
        dosed = [r for r in selectivity if r["seed"] in seeds]

        def curve(task: str, off: str) -> list[tuple[int, float]]:  # (units off, mean change of the task) per dose
            points = []
            for n in doses:
                mine = [r for r in dosed if r["condition"].startswith(off) and int(r["units_off"]) == n]
                changes = [change(r, task) for r in mine]
                if changes:
                    points.append((n, statistics.fmean(changes)))
            return points

        for t, task in enumerate(TASKS):
            ax.plot(*zip(*curve(task, f"selective_{task}")), marker="o", color=f"C{t}", label=f"{task}: own units off")
            ax.plot(*zip(*curve(task, "random")), marker="x", linestyle="--", color=f"C{t}", label=f"{task}: random")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xlabel="units switched off", ylabel="change of the task's test metric",
               title=f"dose-response (seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))})")  # fmt: skip
        ax.legend(fontsize=5)
    fig.suptitle("Neural tuning vs dense / per-task / MiT, frozen SmolLM2-135M, four digit tasks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
