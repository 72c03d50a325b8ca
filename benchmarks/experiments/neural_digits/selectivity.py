"""Task selectivity of the neural adapter's units: switch off the units most selective for a task
(or as many random units) and measure every task."""

from __future__ import annotations

import torch
from tqdm import tqdm

from mit.demo.digits import DigitsSplit

from .config import TASKS, NeuralDigitsConfig
from .evaluate import eval_sets, evaluate, headline
from .models import NeuralDigits
from .train import build_rows, task_outputs


@torch.no_grad()
def unit_activity(model: NeuralDigits, train_split: DigitsSplit, count: int = 40) -> torch.Tensor:
    """Mean Z^a per task and unit, (tasks, layers, r), on ``count`` training samples per task (one task per forward:
    no padding within a forward)."""
    layers = model.units()
    sums = torch.zeros(len(TASKS), len(layers), layers[0].rank)
    current = {"task": 0}

    def record(i):
        def hook(module, args):
            sums[current["task"], i] += args[0].flatten(0, -2).mean(0)

        return hook

    handles = [layer.b_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    model.eval()
    gen = torch.Generator().manual_seed(777)
    try:
        for t, task in enumerate(TASKS):
            current["task"] = t
            task_outputs(model, [task], [build_rows(model, task, train_split, count, gen)])
    finally:
        for h in handles:
            h.remove()
        model.train()
    return sums


def switch_off(model: NeuralDigits, off: torch.Tensor) -> list:
    """Zero the units where ``off`` (layers, r) is True in every Z^a (pre-hooks of ``b_proj``); returns the handles."""
    keep = (~off).float()
    return [layer.b_proj.register_forward_pre_hook(lambda m, a, k=keep[i]: (a[0] * k,))
            for i, layer in enumerate(model.units())]  # fmt: skip


def selectivity_test(model, train_split, test, classifier, cfg: NeuralDigitsConfig) -> list[dict]:
    """Metrics with nothing off and, for each dose in ``cfg.selectivity_fractions``, with that fraction of the units
    off: the units most selective for each task, and as many random units (two draws). Rows: condition, units_off and
    the headline metric per task (``cfg.selectivity_samples`` test images or canvases per task)."""
    fractions = cfg.selectivity_fractions
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"selectivity_fractions must be fractions in (0, 1), got {fractions}")
    activity = unit_activity(model, train_split)
    total = activity[0].numel()
    sets = eval_sets(test, cfg, caption=cfg.selectivity_samples, segment=cfg.selectivity_samples)
    rows = []

    def measure(condition: str, off: torch.Tensor | None):
        handles = switch_off(model, off) if off is not None else []
        try:
            metrics = evaluate(model, TASKS, test, sets, classifier)
        finally:
            for h in handles:
                h.remove()
        rows.append({"condition": condition, "units_off": 0 if off is None else int(off.sum()),
                     **{t: headline(metrics, t) for t in TASKS}})  # fmt: skip
        tqdm.write(f"selectivity {condition:24s}: " + ", ".join(f"{t} {rows[-1][t]:.2f}" for t in TASKS))

    # selectivity of each unit for task t: its mean activity on t minus its mean on the other tasks, (tasks, total)
    scores = torch.stack([(activity[t] - torch.cat([activity[:t], activity[t + 1 :]]).mean(0)).flatten()
                          for t in range(len(TASKS))])  # fmt: skip
    gen = torch.Generator().manual_seed(4242)
    orders = [torch.randperm(total, generator=gen) for _ in range(2)]  # cut shorter per dose: nested random sets

    def units(indices: torch.Tensor) -> torch.Tensor:  # flat unit indices -> the (layers, r) mask
        off = torch.zeros(total, dtype=torch.bool)
        off[indices] = True
        return off.view_as(activity[0])

    measure("none", None)
    for fraction in fractions:
        m = max(1, round(fraction * total))
        for task, score in zip(TASKS, scores):
            measure(f"selective_{task}", units(score.topk(m).indices))
        for r, order in enumerate(orders):
            measure(f"random_{r}", units(order[:m]))
    return rows
