"""One run of a variant, and the grid: every variant over the learning rates (first seed), the chosen one
at the other seeds, the selectivity test."""

from __future__ import annotations

import dataclasses
import pathlib

import torch
from tqdm import tqdm

from mit.demo.digits import load_digits_split, pixel_statistics
from mit.models import load_smollm2

from .config import TASKS, VARIANTS, NeuralDigitsConfig, recipe
from .evaluate import digit_classifier, eval_sets, evaluate
from .heads import pretrain_encoder
from .models import build_model
from .results import write_results
from .selection import beyond_edge, choose_lr, validation_score
from .selectivity import selectivity_test
from .tasks import split_validation, variant_groups
from .train import train


def run_variant(variant: str, base, tokenizer, data, classifier, cfg: NeuralDigitsConfig):
    """Train ``variant`` at ``cfg.lr`` and ``cfg.seed``; evaluate on the validation and the test images. ``data`` is
    (training, validation, test) splits. Returns (metrics row, curve rows, the trained model of the last group)."""
    train_split, val, test = data
    sets = {name: eval_sets(split, cfg, caption=cfg.eval_caption) for name, split in (("val", val), ("test", test))}
    stats = pixel_statistics(train_split.images)
    groups = variant_groups(variant)
    if cfg.batch_size % len(TASKS):
        raise ValueError(f"batch_size must be a multiple of the {len(TASKS)} tasks, got {cfg.batch_size}")
    metrics, curves, seconds, params, served = {}, [], 0.0, 0, []
    model = None
    run_name = f"{variant} lr={cfg.lr:g} seed={cfg.seed}"
    for tasks in groups:
        torch.manual_seed(cfg.seed)
        model = build_model(variant, base, tokenizer, cfg, stats)
        model.encoder_pretrain_loss = pretrain_encoder(model.encoder, train_split, cfg.encoder_pretrain_steps, cfg.seed)
        model.encoder.requires_grad_(cfg.train_encoder)
        name = run_name if len(groups) == 1 else f"{run_name} task={tasks[0]}"
        curve, sec = train(model, tasks, cfg.batch_size // len(TASKS), train_split, cfg, name)
        curves += [{"variant": variant, **recipe(cfg), "lr": cfg.lr, "seed": cfg.seed, **c} for c in curve]
        seconds += sec
        params += sum(p.numel() for p in model.trainable_parameters())
        metrics.update({f"val_{k}": v for k, v in evaluate(model, tasks, val, sets["val"], classifier).items()})
        metrics.update(evaluate(model, tasks, test, sets["test"], classifier))
        served += tasks
    row = {"variant": variant, "lr": cfg.lr, "seed": cfg.seed, **recipe(cfg),
           "sparsity": 1.0 if variant == "dense" else (cfg.sparsity if variant != "mit" else float("nan")),
           "val_score": validation_score(metrics, tuple(served)), **metrics,
           "trainable_params": params, "train_seconds": seconds}  # fmt: skip
    tqdm.write(f"{run_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({seconds:.0f} s)")
    return row, curves, model


def run_demo(cfg: NeuralDigitsConfig, out_dir: pathlib.Path, base=None, tokenizer=None, stem: str = "neural_digits"):
    """Run every variant at every learning rate of ``cfg.lrs`` (first seed; while the best is at an edge, up to
    ``cfg.extend_edges`` more, half a decade further each), then each variant's chosen learning rate at the other seeds
    (and the selectivity test on the neural runs at the chosen learning rate); write the results
    (:func:`write_results`).
    Returns (summary rows, run rows, selectivity rows)."""
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {sorted(unknown)}")
    if not cfg.lrs or not cfg.seeds:
        raise ValueError(f"lrs and seeds must be non-empty, got lrs={cfg.lrs}, seeds={cfg.seeds}")
    if base is None:
        base, tokenizer = load_smollm2()
    train_split, test = load_digits_split(cfg.test_fraction)
    train_split, val = split_validation(train_split, cfg.validation_fraction)
    data = (train_split, val, test)
    classifier = digit_classifier(train_split)
    runs, curves, selectivity = [], [], []

    def one(variant: str, lr: float, seed: int, keep: bool):
        """Train and evaluate one run; return (the trained model if ``keep`` else None, its config)."""
        run_cfg = dataclasses.replace(cfg, lr=lr, seed=seed)
        row, curve, model = run_variant(variant, base, tokenizer, data, classifier, run_cfg)
        runs.append(row)
        curves.extend(curve)
        write_results(runs, curves, selectivity, out_dir, stem)  # after every run: an interrupted grid keeps its runs
        return (model if keep else None), run_cfg

    def select(model, run_cfg) -> None:  # the selectivity test, on neural runs at the chosen learning rate
        rows = selectivity_test(model, train_split, test, classifier, run_cfg)
        selectivity.extend({**recipe(run_cfg), "lr": run_cfg.lr, "seed": run_cfg.seed, **r} for r in rows)

    for variant in cfg.variants:
        tested = variant == "neural" and cfg.selectivity
        # each first-seed run's model is kept until the choice only when the selectivity test will need it
        first = {lr: one(variant, lr, cfg.seeds[0], keep=tested) for lr in cfg.lrs}
        chosen = choose_lr([r for r in runs if r["variant"] == variant], cfg.seeds[0])
        for _ in range(cfg.extend_edges if len(cfg.lrs) > 1 else 0):
            further = beyond_edge(chosen, list(first))
            if further is None:
                break
            first[further] = one(variant, further, cfg.seeds[0], keep=tested)
            chosen = choose_lr([r for r in runs if r["variant"] == variant], cfg.seeds[0])
        if tested:
            select(*first[chosen])
        del first
        for seed in cfg.seeds[1:]:
            model, run_cfg = one(variant, chosen, seed, keep=tested)
            if tested:
                select(model, run_cfg)
            del model
    summary = write_results(runs, curves, selectivity, out_dir, stem)
    return summary, runs, selectivity
