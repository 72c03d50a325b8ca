"""The ``mit`` command: ``mit train`` and ``mit eval``. Run ``mit train --help`` for the options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

EXAMPLES = """\
examples (datasets and weights are downloaded by you; see README "Tuning on the paper's tasks"):
  mit train --task refseg --dataset refcoco --model llama-2-7b-hf --encoder ViT-L-14-336 \\
      --encoder-pretrained ViT-L-14-336px.pt --quick-gelu --data refer/data --out runs/refcoco --mixed-precision bf16
  mit train --task cls --dataset food101 --model llama-2-7b-hf --encoder-pretrained ViT-L-14-336px.pt \\
      --quick-gelu --data UPMC-Food101 --out runs/food101 --mixed-precision bf16
  mit train --task msa --dataset mosi --model llama-2-7b-hf --data MOSI/Processed --out runs/mosi
  mit train --config runs/refcoco.yaml --lr 2e-5          # a config file, with command-line overrides
  mit train --config runs/refcoco.yaml --resume           # continue a stopped run exactly where it stopped
  mit eval --checkpoint runs/refcoco --split testA        # evaluate the latest checkpoint on another split
  accelerate launch --num_processes 2 -m mit.cli train --config runs/refcoco.yaml   # several GPUs
  torchrun --nproc_per_node 2 -m mit.cli train --config runs/mosi.yaml               # several CPU processes (gloo)
"""

# (flag help, metavar) of every TrainConfig field, grouped as --help shows them
GROUPS: dict[str, dict[str, tuple[str, str | None]]] = {
    "what to train": {
        "task": ("refseg (referring segmentation), cls (image-text classification) or msa (sentiment analysis)", None),
        "dataset": (
            "refseg: refcoco, refcoco+, refcocog; cls: food101, snli-ve; msa: mosi, mosei "
            "(default: refcoco / food101 / mosi)",
            None,
        ),
        "model": (
            "the frozen LLM: a Hugging Face Llama directory (config.json, weights, tokenizer) or 'smollm2'",
            "PATH",
        ),
        "data": ("dataset root in its published layout (see README)", "DIR"),
        "out": ("run directory: config.json, loss.csv, metrics.csv, checkpoints/", "DIR"),
    },
    "image encoder (refseg, cls)": {
        "encoder": (
            "CLIP architecture without --encoder-pretrained: ViT-L-14-336, ViT-L-14, ViT-B-16 or a config .json",
            "NAME",
        ),
        "encoder_pretrained": (
            "CLIP weights: a local Hugging Face checkpoint directory (e.g. openai/clip-vit-large-patch14-336) or, "
            "with --encoder-backend open_clip, an open_clip file or tag; omitted = random (tests only)",
            "PATH",
        ),
        "encoder_backend": ("transformers (CLIPVisionModelWithProjection) or open_clip", None),
        "quick_gelu": ("QuickGELU activations (required by OpenAI's CLIP weights)", None),
        "feature_layers": (
            "CLIP blocks feeding the segmentation decoder, e.g. 7,15,23 (default: 3 evenly spaced)",
            "LIST",
        ),
        "image_size": ("input resolution; must be the encoder's (336 for ViT-L-14-336)", "N"),
        "image_dir": ("image directory if not in the default place under --data", "DIR"),
    },
    "dataset files": {
        "split_by": ("RefCOCOg partition: umd (default) or google", None),
        "train_split": ("training split (default: train)", None),
        "eval_split": ("evaluation split (default: val / test for Food101 / dev for SNLI-VE / valid for MOSI)", None),
        "feature_file": ("MOSI/MOSEI pickle name in --data (default: unaligned_50.pkl, else aligned_50.pkl)", "NAME"),
        "limit_train": ("use only the first N training samples", "N"),
        "limit_eval": ("use only the first N evaluation samples", "N"),
    },
    "MiT": {
        "layers": ("0-based LLM layers to infuse, e.g. 12,16,20,24,28,31 (default: the paper's rule)", "LIST"),
        "infuse_kv": ("infuse keys and values", None),
        "infuse_ffn": ("infuse the feed-forward block", None),
        "head_rescale": ("adaptive per-head rescaling", None),
        "backend": ("kernel backend: auto, reference, triton, cpu", None),
        "modality_dim": ("msa: size of the sequence encoder's embedding", "N"),
    },
    "heads": {
        "seq_d_model": ("msa: sequence encoder width", "N"),
        "seq_layers": ("msa: sequence encoder layers (paper: 3)", "N"),
        "seq_heads": ("msa: sequence encoder attention heads", "N"),
        "decoder_hidden": ("refseg: decoder channels", "N"),
        "cls_hidden": ("cls: classification head hidden size", "N"),
        "reg_hidden": ("msa: regression head hidden size (0 = one linear layer)", "N"),
        "dropout": ("dropout in the trainable heads", "P"),
        "bce_weight": ("refseg: weight of a BCE term added to the DICE loss (paper: 0)", "W"),
        "padding_side": ("prompt padding: left or right (the task embedding is the last real token either way)", None),
        "max_length": ("prompt tokens kept (the end of the prompt)", "N"),
    },
    "optimisation (defaults: the paper's)": {
        "epochs": ("epochs (30)", "N"),
        "lr": ("Adam learning rate (4e-5)", "LR"),
        "lr_step": ("decay the learning rate every N epochs (10)", "N"),
        "lr_gamma": ("decay factor (0.1)", "G"),
        "weight_decay": ("Adam weight decay (0)", "W"),
        "batch_size": ("samples per process and step (8)", "N"),
        "eval_batch_size": ("evaluation batch size (default: --batch-size)", "N"),
        "grad_accum": ("gradient accumulation steps (1)", "N"),
        "max_grad_norm": ("clip gradients to this norm (off)", "X"),
        "mixed_precision": ("no / fp32, bf16 (the paper's) or fp16", None),
        "model_dtype": ("dtype of the frozen LLM and CLIP: auto (follows --mixed-precision), fp32, bf16, fp16", None),
        "seed": ("random seed (42)", "N"),
        "max_steps": ("stop after N optimizer steps (with a checkpoint)", "N"),
        "checkpoint_every": ("also checkpoint every N optimizer steps (0: at epoch ends only)", "N"),
        "keep_checkpoints": ("checkpoints kept (2)", "N"),
        "eval_every": ("evaluate every N epochs (1)", "N"),
        "num_workers": ("data loader workers (0)", "N"),
        "resume": ("continue the run in --out from its latest checkpoint", None),
        "progress": ("show a progress bar", None),
    },
}
CHOICES = {
    "task": ["refseg", "cls", "msa"],
    "dataset": ["refcoco", "refcoco+", "refcocog", "food101", "snli-ve", "mosi", "mosei"],
    "encoder_backend": ["transformers", "open_clip"],
    "split_by": ["unc", "umd", "google"],
    "padding_side": ["left", "right"],
    "mixed_precision": ["no", "fp32", "bf16", "fp16"],
    "model_dtype": ["auto", "fp32", "bf16", "fp16"],
    "backend": ["auto", "reference", "triton", "cpu"],
}


class CLIError(Exception):
    """A usage or configuration error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 12,16,20, got {text!r}") from None


def _trainer_module():
    """mit.tuning.trainer, or a one-line error naming the extra to install."""
    try:
        from .tuning import trainer
    except ImportError as exc:
        raise CLIError(f'the tuning framework needs its extra: pip install "mit[tuning]" ({exc})') from exc
    return trainer


def _field_types() -> dict[str, Any]:
    TrainConfig = _trainer_module().TrainConfig

    types = {}
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type)
        if "list[int]" in kind:
            types[f.name] = _int_list
        elif kind.startswith("bool"):
            types[f.name] = bool
        elif kind.startswith("int"):
            types[f.name] = int
        elif kind.startswith("float"):
            types[f.name] = float
        else:
            types[f.name] = str
    return types


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mit",
        description="Multimodal Infusion Tuning: tune a frozen Llama model on referring segmentation, image-text "
        "classification and multimodal sentiment analysis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,demo}", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="tune MiT + a task head on a dataset",
        description="Tune MiT and a task head on a frozen LLM. Settings come from --config (YAML or JSON, keys as "
        "the long options with _ or -) and are overridden by the flags given.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)")
    types = _field_types()
    for title, fields in GROUPS.items():
        group = train.add_argument_group(title)
        for name, (text, metavar) in fields.items():
            flag = "--" + name.replace("_", "-")
            if types[name] is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(
                    flag,
                    type=types[name],
                    choices=CHOICES.get(name),
                    metavar=metavar,
                    default=argparse.SUPPRESS,
                    help=text,
                )
    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Evaluate a checkpoint (the latest of a run directory, or a checkpoint directory) on a split; "
        "prints the metrics as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint directory")
    evaluate.add_argument("--split", help="split to evaluate (default: the run's evaluation split)")
    evaluate.add_argument("--data", metavar="DIR", help="dataset root, if it moved since training")
    evaluate.add_argument("--model", metavar="PATH", help="LLM directory, if it moved since training")
    evaluate.add_argument("--encoder-pretrained", metavar="PATH", help="CLIP weights, if they moved")
    evaluate.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N samples")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch size")
    evaluate.add_argument("--mixed-precision", choices=CHOICES["mixed_precision"], help="precision for evaluation")
    evaluate.add_argument("--output", metavar="FILE", help="also write the metrics to this JSON file")
    sub.add_parser(
        "demo",
        help="real-model demonstrations: 'mit demo digits [--quick]' (see 'mit demo digits --help')",
        description="Run a demonstration. 'digits': MiT teaches a frozen SmolLM2-135M to answer yes/no questions "
        "about real handwritten digit images, against text-only and prefix-concatenation baselines.",
    )
    return parser


DEMOS = ("digits",)


def _demo(argv: list[str]) -> int:
    if not argv or argv[0] not in DEMOS:
        raise CLIError(f"demo: choose one of {', '.join(DEMOS)} (got {argv[0] if argv else 'nothing'})")
    from .demo import digits as demo_digits

    demo_digits.main(argv[1:])
    return 0


def load_config_file(path: str) -> dict[str, Any]:
    file = pathlib.Path(path)
    if not file.is_file():
        raise CLIError(f"--config {file}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif file.suffix == ".json":
            data = json.loads(text)
        else:
            raise CLIError(f"--config {file}: expected a .yaml, .yml or .json file")
    except (json.JSONDecodeError, ValueError) as error:
        raise CLIError(f"--config {file}: not valid {file.suffix[1:].upper()}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # yaml.YAMLError
        raise CLIError(f"--config {file}: not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {file}: expected a mapping of settings, got {type(data).__name__}")
    types = _field_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise CLIError(f"--config {file}: unknown setting {key!r}; expected one of the long options of `mit train`")
        if types[name] is _int_list and isinstance(value, str):
            value = _int_list(value)
        elif types[name] is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise CLIError(f"--config {file}: {key} must be a number, got {value!r}") from None
        out[name] = value
    return out


def _train(args: argparse.Namespace) -> int:
    trainer_module = _trainer_module()
    TrainConfig, Trainer = trainer_module.TrainConfig, trainer_module.Trainer

    settings = load_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    config = TrainConfig.from_dict(settings)
    trainer = Trainer(config)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"out": str(config.out), "global_step": trainer.global_step, **metrics}, default=float))
    return 0


def _eval(args: argparse.Namespace) -> int:
    evaluate_checkpoint = _trainer_module().evaluate_checkpoint

    overrides: dict[str, Any] = {"progress": False}
    if args.split:
        overrides["eval_split"] = args.split
    for key in ("data", "model", "encoder_pretrained", "mixed_precision"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    if args.limit:
        overrides["limit_eval"] = args.limit
    if args.batch_size:
        overrides["eval_batch_size"] = args.batch_size
    metrics = evaluate_checkpoint(args.checkpoint, overrides)
    text = json.dumps(metrics, indent=2, default=float)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mit`` console script; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"] and argv[1:2] not in (["-h"], ["--help"]):
            return _demo(argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _train(args) if args.command == "train" else _eval(args)
    except CLIError as error:
        print(f"mit: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"mit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
