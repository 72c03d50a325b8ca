"""The experiment's command line: ``python benchmarks/experiments/neural_digits/run.py [flags]`` (flags: ``--help``;
what the experiment is: the package docstring, :mod:`neural_digits`)."""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: import the package ``neural_digits`` from benchmarks/experiments
    _HERE = pathlib.Path(__file__).resolve().parent
    if sys.path and pathlib.Path(sys.path[0]).resolve() == _HERE:
        sys.path.pop(0)  # this directory's modules (config, tasks, ...) must not shadow top-level names
    sys.path.insert(0, str(_HERE.parent))

import neural_digits
from neural_digits.config import LCL, VARIANTS, NeuralDigitsConfig, quick_config
from neural_digits.grid import run_demo
from neural_digits.results import merge_runs

# a run writes here unless told otherwise: never over the committed results in benchmarks/results/ by accident
DEFAULT_OUT = pathlib.Path("mit-results") / "neural-digits"


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/experiments/neural_digits/run.py",
        description=neural_digits.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the neural run only, 25 steps, smaller evaluation")
    parser.add_argument("--steps", type=int, help="optimiser steps per run")
    parser.add_argument("--lrs", type=float, nargs="+", help="adapter learning rates to try per variant (AdamW)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds: the grid at the first, the chosen lr at all")
    parser.add_argument("--extend-edges", type=int, help="at most this many lrs beyond an edge the choice sits on")
    parser.add_argument("--head-lr", type=float, help="learning rate of the patch encoder, projection, tokens, heads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="variants to run")
    parser.add_argument("--encoder-pretrain-steps", type=int, help="patch-encoder pretraining steps (0: none)")
    parser.add_argument("--segment-tokens", type=int, choices=range(1, len(LCL) + 1),
                        help="how many of <LCL-1..5> a segmentation answer has (the reference: 5)")  # fmt: skip
    parser.add_argument("--freeze-encoder", action="store_true", help="keep the pretrained patch encoder frozen")
    parser.add_argument("--no-selectivity", action="store_true", help="skip the task-selectivity test")
    parser.add_argument("--selectivity-fractions", type=float, nargs="+",
                        help="doses of the selectivity test: fractions of the units switched off")  # fmt: skip
    parser.add_argument("--from-runs", type=pathlib.Path, nargs="+", metavar="DIR",
                        help="train nothing: merge earlier invocations' results (their --out) into --out")  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output directory (default: ./{DEFAULT_OUT}; --out benchmarks/results refreshes the "
                        "committed results)")  # fmt: skip
    args = parser.parse_args(argv)
    stem = "neural_digits" + ("_quick" if args.quick else "")
    if args.from_runs:
        summary = merge_runs(args.from_runs, args.out, stem)
    else:
        cfg = quick_config() if args.quick else NeuralDigitsConfig()
        for field, value in (("steps", args.steps), ("lrs", args.lrs), ("seeds", args.seeds),
                             ("head_lr", args.head_lr), ("variants", args.variants),
                             ("extend_edges", args.extend_edges),
                             ("selectivity_fractions", args.selectivity_fractions),
                             ("encoder_pretrain_steps", args.encoder_pretrain_steps),
                             ("segment_tokens", args.segment_tokens)):  # fmt: skip
            if value is not None:
                setattr(cfg, field, tuple(value) if isinstance(value, list) else value)
        if args.freeze_encoder:
            cfg.train_encoder = False
        if args.no_selectivity:
            cfg.selectivity = False
        summary, _, _ = run_demo(cfg, args.out, stem=stem)
    for row in summary:
        print(row)
    print(f"wrote {args.out}/{stem}.csv, {stem}_runs.csv, {stem}_curves.csv and {stem}.png")
    return summary


if __name__ == "__main__":
    main()
