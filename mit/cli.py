"""The ``mit`` command: ``mit train``, ``mit eval``, ``mit export``, ``mit predict``, ``mit data toy``, ``mit demo``.
``mit train --help`` lists the options."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from typing import Any

from .utils.files import os_error_text

EXAMPLES = """\
examples (datasets and weights are downloaded by you; see README "Tuning on the paper's tasks"):
  mit train --task refseg --dataset refcoco --model llama-2-7b-hf --encoder ViT-L-14-336 --encoder-backend open_clip \\
      --encoder-pretrained ViT-L-14-336px.pt --quick-gelu --data refer/data --out runs/refcoco --mixed-precision bf16
  mit train --task cls --dataset food101 --model llama-2-7b-hf --encoder-pretrained clip-vit-large-patch14-336 \\
      --data UPMC-Food101 --out runs/food101 --mixed-precision bf16      # a Hugging Face CLIP directory
  mit train --task msa --dataset mosi --model llama-2-7b-hf --data MOSI/Processed --out runs/mosi
  mit train --task multitask --dataset mmud --model llama-2-7b-hf --encoder-pretrained clip-vit-large-patch14 \\
      --data MMUD --rank 128 --sparsity 0.4 --max-length 300 --out runs/mmud     # neural tuning, four tasks at once
  mit train --config runs/refcoco.yaml --lr 2e-5          # a config file, with command-line overrides
  mit train --config runs/refcoco.yaml --resume           # continue a stopped run exactly where it stopped
  mit eval --checkpoint runs/refcoco --split testA        # evaluate the latest checkpoint on another split
  mit data toy --out toy && mit train --task cls --dataset food101 --data toy --encoder toy/clip_tiny.json \\
      --model smollm2 --epochs 2 --batch-size 16 --lr 1e-3 --out runs/toy   # offline, about a minute
  accelerate launch --num_processes 2 -m mit.cli train --config runs/refcoco.yaml   # several GPUs
  torchrun --nproc_per_node 2 -m mit.cli train --config runs/mosi.yaml               # several CPU processes (gloo)
"""


class CLIError(Exception):
    """A usage or configuration error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _trainer_module():
    """mit.tuning.trainer, or a one-line error naming the extra to install."""
    try:
        from .tuning import trainer
    except ImportError as exc:
        raise CLIError(f'the tuning framework needs its extra: pip install "mit[tuning]" ({exc})') from exc
    return trainer


def _typed(leaf):
    """argparse ``type=`` for a leaf setting: the text parsed as the field's type, errors as argparse's."""
    from .utils.settings import parse_text

    def convert(text: str):
        try:
            return parse_text(leaf.kind, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = {int: "int", float: "float"}.get(leaf.kind.base, "value")  # argparse names it in errors
    return convert


def _task_help() -> tuple[str, str]:
    from .tuning.tasks import get_task, task_names

    specs = [get_task(name) for name in task_names()]
    task = ", ".join(f"{s.name} ({s.description})" for s in specs)
    datasets = "; ".join(f"{s.name}: {', '.join(d.name for d in s.datasets)}" for s in specs)
    return task, f"{datasets} (default: the task's first)"


def _add_run_options(train: argparse.ArgumentParser) -> None:
    """One option per leaf of RunConfig, grouped by section, help and choices from the fields themselves."""
    from .tuning.config import SECTION_TITLES, RunConfig
    from .utils.settings import flat_fields

    task_help, dataset_help = _task_help()
    groups = {name: train.add_argument_group(title) for name, title in SECTION_TITLES.items()}
    for leaf in flat_fields(RunConfig):
        section = leaf.path[0] if len(leaf.path) > 1 else "task"
        help_text = {"task": task_help, "dataset": dataset_help}.get(leaf.flag, leaf.info.help)
        flag = "--" + leaf.flag.replace("_", "-")
        if leaf.kind.base is bool:
            groups[section].add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            groups[section].add_argument(
                flag,
                type=_typed(leaf),
                choices=leaf.info.allowed(),
                metavar=leaf.info.metavar,
                default=argparse.SUPPRESS,
                help=help_text,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mit",
        description="Multimodal Infusion Tuning: tune a frozen decoder LLM (Llama, Mistral, Qwen2 / Qwen3, Gemma2 / "
        "Gemma3, Phi3) on referring segmentation, image-text classification and multimodal sentiment analysis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,predict,data,demo}", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="tune MiT + a task head on a dataset",
        description="Tune MiT and a task head on a frozen LLM. Settings come from --config (YAML or JSON, keys as "
        "the long options with _ or -) and are overridden by the flags given.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    train.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)")
    _add_run_options(train)
    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Evaluate a checkpoint (the latest of a run directory, or a checkpoint directory) on a split; "
        "prints JSON: what was evaluated (checkpoint directory, global_step, epoch, task, dataset, split, samples), "
        "then the metrics.",
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
    from .tuning.config import PRECISIONS

    evaluate.add_argument("--mixed-precision", choices=list(PRECISIONS), help="precision for evaluation")
    evaluate.add_argument("--output", metavar="FILE", help="also write the metrics to this JSON file")
    export = sub.add_parser(
        "export",
        help="a checkpoint -> an adapter directory for inference (MiT adapter + task head + classes)",
        description="Write the task adapter of a checkpoint (the latest of a run directory, or a checkpoint "
        "directory): the MiT adapter (mit.load_adapter reads it), the task head's weights and task.json (the run's "
        "settings, class names, prompt template, the checkpoint and step). 'mit predict --adapter DIR' uses it.",
    )
    export.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint directory")
    export.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    predict = sub.add_parser(
        "predict",
        help="an exported adapter + images and texts -> answers (task cls) or masks (task refseg)",
        description="Answer with an exported adapter: one JSON line per (image, text) pair, in order. Task cls "
        "(image-text classification): the predicted class and its probability. Task refseg (referring segmentation; "
        "the text is the referring expression): the mask, written as a PNG at the image's resolution into --masks, "
        "and the fraction of the image it covers. The base LLM and CLIP weights are the run's, or --model / "
        "--encoder-pretrained where they moved.",
    )
    predict.add_argument("--adapter", required=True, metavar="DIR", help="a directory written by mit export")
    predict.add_argument("--images", required=True, nargs="+", metavar="FILE", help="image files")
    predict.add_argument("--text", nargs="+", metavar="TEXT",
                         help="one text per image, or one for all (default: the empty text)")  # fmt: skip
    predict.add_argument("--model", metavar="PATH", help="LLM directory, if it moved since training")
    predict.add_argument("--encoder-pretrained", metavar="PATH", help="CLIP weights, if they moved")
    predict.add_argument("--batch-size", type=int, default=8, metavar="N", help="pairs per forward (8)")
    predict.add_argument("--output", metavar="FILE", help="also write the answers to this JSON lines file")
    predict.add_argument("--masks", metavar="DIR", help="refseg: the directory the masks are written to (created)")
    data = sub.add_parser(
        "data",
        help="write a small real dataset to try mit train offline: 'mit data toy --out DIR'",
        description="Write a dataset. 'toy': scikit-learn's handwritten digits in UPMC-Food101's layout (classify the "
        "digit; every sample has the same text, so the image decides), with a small CLIP config for --encoder; "
        "prints the mit train command that runs on it in about a minute.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument("kind", choices=["toy"], help="which dataset")
    data.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")
    data.add_argument("--train", type=int, default=400, metavar="N", help="training samples (400)")
    data.add_argument("--test", type=int, default=200, metavar="N", help="test samples (200)")
    sub.add_parser(
        "demo",
        help="real-model demonstrations: 'mit demo digits [--quick]', 'mit demo neural-digits [--quick]' (from a "
        "source checkout: runs benchmarks/experiments/neural_digits/run.py; see 'mit demo digits --help')",
        description="Run a demonstration. 'digits': MiT teaches a frozen SmolLM2-135M to answer yes/no questions "
        "about real handwritten digit images, against text-only and prefix-concatenation baselines. "
        "'neural-digits': neural tuning, one adapter on a frozen SmolLM2-135M for four digit tasks (caption, draw, "
        "two segmentations).",
        epilog=DEMO_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


DEMO_USAGE = """\
demos (each takes --help):
  mit demo digits [--quick]          yes/no questions about real digit images: MiT vs text-only vs prefix
  mit demo neural-digits [--quick]   neural tuning: one adapter, four digit tasks (from a source checkout)
"""


DEMOS = ("digits", "neural-digits")


def _demo(argv: list[str]) -> int:
    if not argv or argv[0] not in DEMOS:
        raise CLIError(f"demo: choose one of {', '.join(DEMOS)} (got {argv[0] if argv else 'nothing'})")
    if argv[0] == "neural-digits":
        return _neural_digits_experiment(argv[1:])
    from .demo import digits as demo_digits

    demo_digits.main(argv[1:])
    return 0


NEURAL_DIGITS_SCRIPT = pathlib.Path("benchmarks") / "experiments" / "neural_digits" / "run.py"


def _neural_digits_experiment(argv: list[str]) -> int:
    """``mit demo neural-digits``: the neural-tuning experiment is not part of the installed package; in a source
    checkout (the current directory, or the one an editable install points to) this runs its script
    (``python benchmarks/experiments/neural_digits/run.py``) with the same flags."""
    import subprocess

    candidates = (
        pathlib.Path.cwd() / NEURAL_DIGITS_SCRIPT,
        pathlib.Path(__file__).resolve().parents[1] / NEURAL_DIGITS_SCRIPT,
    )
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise CLIError(
            f"demo neural-digits: the experiment lives in a source checkout of mit ({NEURAL_DIGITS_SCRIPT}), not in "
            "the installed package; run 'python benchmarks/experiments/neural_digits/run.py' there"
        )
    return subprocess.call([sys.executable, str(script), *argv])


def load_config_file(path: str) -> dict[str, Any]:
    """The settings of a YAML or JSON config file as ``{flag name: value}``. Refused, naming the file: a file that
    cannot be read or parsed, a key given twice (at any depth, in either format), a setting given twice under two
    spellings (``lr`` and ``optim.lr``, ``batch-size`` and ``batch_size``), an unknown key, and a list setting written
    as a lone string (``layers: "12"``; ``layers: [12]`` or ``layers: 12,16``)."""
    from .utils.config_files import DuplicateKeyError, load_json, load_yaml

    file = pathlib.Path(path)
    if file.is_dir():
        raise CLIError(f"--config {file}: is a directory; expected a .yaml, .yml or .json file")
    if not file.is_file():
        raise CLIError(f"--config {file}: no such file")
    if file.suffix not in (".yaml", ".yml", ".json"):
        raise CLIError(f"--config {file}: expected a .yaml, .yml or .json file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise CLIError(f"--config {file}: cannot read it: {os_error_text(error)}") from None
    except UnicodeDecodeError as error:
        raise CLIError(f"--config {file}: expected UTF-8 text, got {error.reason} at byte {error.start}") from None
    kind = "JSON" if file.suffix == ".json" else "YAML"
    try:
        data = load_json(text) if kind == "JSON" else load_yaml(text)
    except DuplicateKeyError as error:
        raise CLIError(f"--config {file}: {error}") from None
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise CLIError(f"--config {file}: not valid {kind}: {str(error).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {file}: expected a mapping of settings, got {type(data).__name__}")
    from .tuning.config import RunConfig
    from .utils.settings import flatten, leaves_by_flag, parse_text

    try:
        flat = flatten(RunConfig, data, f"--config {file}")
    except ValueError as error:
        raise CLIError(str(error)) from None
    leaves = leaves_by_flag(RunConfig)
    for name, value in flat.items():
        # PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot) and a list may be written as "12,16" (a string in YAML):
        # those two are parsed like the command line does; everything else must already have its type (a "false"
        # string for a bool is an error, not "on"; "12", without a comma, is a string, not a list, and left to the
        # field's own check to refuse)
        kind = leaves[name].kind
        if isinstance(value, str) and (kind.base is float or (kind.base == "list[int]" and "," in value)):
            try:
                flat[name] = parse_text(kind, value)
            except ValueError as error:
                raise CLIError(f"--config {file}: {name}: {error}") from None
    return flat


def _train(args: argparse.Namespace) -> int:
    trainer_module = _trainer_module()
    from .tuning.config import RunConfig

    settings = load_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    try:
        config = RunConfig.from_dict(settings, "settings")
    except ValueError as error:
        missing = re.fullmatch(r"settings: missing required setting '(\w+)'", str(error))
        if missing:  # name the option the user types, and the key of a config file
            name = missing.group(1)
            option = "--" + name.replace("_", "-")
            raise CLIError(f"missing required setting {option} ({name!r} in a --config file)") from None
        raise
    trainer = trainer_module.Trainer(config)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"out": str(config.run.out), "global_step": trainer.global_step, **metrics}, default=float))
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
    metrics = evaluate_checkpoint(args.checkpoint, overrides, provenance=True)  # says what it evaluated, then how
    text = json.dumps(metrics, indent=2, default=float)
    print(text)
    if args.output:
        from .utils.files import atomic_write_text

        try:
            atomic_write_text(args.output, text + "\n")
        except OSError as error:
            raise CLIError(f"--output {args.output}: cannot write it: {os_error_text(error)}") from None
    return 0


def _export(args: argparse.Namespace) -> int:
    _trainer_module()  # the tuning extra's one-line error when it is missing
    from .tuning.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"adapter": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _trainer_module()
    from .tuning.export import Predictor

    texts = args.text or [""]
    if len(texts) == 1:
        texts = texts * len(args.images)
    if len(texts) != len(args.images):
        raise CLIError(f"--text: expected one text per image ({len(args.images)}) or one for all, got {len(texts)}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    overrides = {k: getattr(args, k) for k in ("model", "encoder_pretrained") if getattr(args, k)}
    predictor = Predictor(args.adapter, overrides)
    if predictor.task["task"] == "refseg" and not args.masks:
        raise CLIError("--masks: a refseg adapter predicts masks; give the directory to write them to")
    answers = predictor.predict(args.images, texts, args.batch_size, progress=True, masks_dir=args.masks)
    lines = [json.dumps(row) for row in answers]
    print("\n".join(lines))
    if args.output:
        from .utils.files import atomic_write_text

        try:
            atomic_write_text(args.output, "\n".join(lines) + "\n")
        except OSError as error:
            raise CLIError(f"--output {args.output}: cannot write it: {os_error_text(error)}") from None
    return 0


def _data(args: argparse.Namespace) -> int:
    from .tuning.data.toy import toy_train_command, write_toy_dataset

    counts = write_toy_dataset(args.out, train=args.train, test=args.test)
    print(f"wrote {counts['train']} training and {counts['test']} test digits to {args.out} (UPMC-Food101 layout)")
    print(f"try (about a minute; a smoke run: the CLIP tower is random, accuracy stays near chance): "
          f"{toy_train_command(args.out)}")  # fmt: skip
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        # "[Errno 13] Permission denied: 'x'" -> "x: Permission denied" (the Unix tools' form)
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        return f"{' -> '.join(names)}: {error.strerror}" if names else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


# a run that started and then stopped (exit status 1); any other error is a usage or configuration error (2)
RUN_FAILURES = ("TrainingDiverged", "RunOutputError")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mit`` console script; returns the exit status.

    Every error is one line on stderr (``mit: error: ...``). Exit status 2: a usage or configuration error, found
    before training starts (a bad value, a config file that cannot be read or has a duplicated key, a path that cannot
    be read, ``--out`` a file, in use by another run or not writable). 1: a run that started and then stopped: it
    diverged, or an output could not be written (a full disk); the last complete checkpoint stays usable. 130:
    interrupted (Ctrl-C)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"] and argv[1:2] not in (["-h"], ["--help"]):
            return _demo(argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        commands = {"train": _train, "eval": _eval, "export": _export, "predict": _predict, "data": _data}
        return commands[args.command](args)
    except CLIError as error:
        print(f"mit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as error:  # OSError: a path that cannot be read or written
        print(f"mit: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if type(error).__name__ not in RUN_FAILURES:
            raise
        print(f"mit: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mit: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
