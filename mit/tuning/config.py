"""The run configuration: a :class:`RunConfig` composed of sections, each field typed, ranged and documented in place.

``mit train`` is generated from these fields (one flag per leaf, named like the field unless it says otherwise; the
help text is the field's), config files use the same names (flat, or nested by section as ``config.json`` is
written; each setting once), and every value is validated by type and range when the configuration is built
(:mod:`mit.utils.settings`).

Sections: ``llm`` (the frozen LLM and its prompts), ``data``, ``encoder`` (CLIP, for tasks with images), ``mit``
(:class:`mit.MiTConfig` itself), ``neural`` (:class:`mit.NeuralTuningConfig` itself, for tasks whose method is
neural tuning; its ``dropout`` is the flag ``--nt-dropout``), ``heads`` (every registered task's head settings, one
flat section: :data:`HeadConfig`; a run reads its own task's with :meth:`RunConfig.head_settings`), ``optim`` (the
paper's schedule by default) and ``run`` (output, checkpoints, evaluation, resume). Of the method sections, a run
writes only its own task's method's to ``config.json`` (:meth:`RunConfig.to_dict`); files that hold both (written
before) read as before.

The configuration reads the task registry (:mod:`mit.tuning.tasks`: task and dataset names, head settings); no task
module imports the configuration. Fields marked ``resume_safe`` may differ when a run is
resumed; any other difference makes ``--resume`` refuse (:meth:`RunConfig.resume_conflicts`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from ..config import MiTConfig
from ..neural import NeuralTuningConfig
from ..utils.settings import differences, flat_fields, from_mapping, info_of, setting, to_flat, validate
from .methods import METHODS, TuningMethod
from .tasks import TaskSpec, dataset_names, get_task, registered_tasks, task_names


def _split_by_choices() -> list[str]:
    from .data.refcoco import SPLITS

    return sorted({split_by for _, split_by in SPLITS})


PRECISIONS = ("no", "fp32", "bf16", "fp16")
# the sections as ``mit train --help`` shows them, in this order ("task" is RunConfig's own field)
SECTION_TITLES = {
    "task": "what to train",
    "llm": "the frozen LLM and its prompts",
    "data": "dataset files and splits",
    "encoder": "image encoder (tasks with images)",
    "mit": "MiT (mit.MiTConfig)",
    "neural": "neural tuning (mit.NeuralTuningConfig; tasks with method 'neural')",
    "heads": "task heads",
    "optim": "optimisation (defaults: the paper's)",
    "run": "output, checkpoints, evaluation, resume",
}
MODEL_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class LLMConfig:
    """The frozen LLM and how prompts are fed to it."""

    model: str = setting(
        help="the frozen LLM: a Hugging Face model directory (config.json, weights, tokenizer) or 'smollm2'",
        metavar="PATH",
        resume_safe=True,
    )
    model_dtype: str = setting(
        "auto", help="dtype of the frozen LLM and CLIP: auto follows --mixed-precision", choices=MODEL_DTYPES
    )
    padding_side: str = setting(
        "left", help="prompt padding (the task embedding is the last real token either way)", choices=("left", "right")
    )
    max_length: int = setting(64, help="prompt tokens kept (the end of the prompt)", metavar="N", low=1)

    def __post_init__(self) -> None:
        validate(self)


@dataclasses.dataclass
class DataConfig:
    """Which dataset, where, and which part of it."""

    root: str = setting(
        help="dataset root in its published layout (see README)", metavar="DIR", flag="data", resume_safe=True
    )
    dataset: str | None = setting(
        None, help="dataset of the task (default: the task's first one)", choices=dataset_names
    )
    image_dir: str | None = setting(
        None, help="image directory if not in the default place under --data", metavar="DIR", resume_safe=True
    )
    split_by: str | None = setting(
        None,
        help="RefCOCO partition (default: unc for RefCOCO/RefCOCO+, umd for RefCOCOg)",
        choices=_split_by_choices,
    )
    train_split: str | None = setting(None, help="training split (default: the dataset's)", metavar="NAME")
    eval_split: str | None = setting(
        None, help="evaluation split (default: the dataset's)", metavar="NAME", resume_safe=True
    )
    feature_file: str | None = setting(
        None, help="MOSI/MOSEI pickle in --data (default: unaligned_50.pkl, else aligned_50.pkl)", metavar="NAME"
    )
    limit_train: int | None = setting(None, help="use only the first N training samples", metavar="N", low=1)
    limit_eval: int | None = setting(
        None, help="use only the first N evaluation samples", metavar="N", low=1, resume_safe=True
    )

    def __post_init__(self) -> None:
        validate(self)


TRACKERS = ("none", "tensorboard", "wandb")  # --report-to: accelerate's trackers the trainer logs to
CHECKPOINT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # open_clip / OpenAI weight files


@dataclasses.dataclass
class EncoderConfig:
    """The frozen CLIP image encoder of tasks with images (its global embedding is what MiT infuses)."""

    encoder: str = setting(
        "ViT-L-14-336",
        help="CLIP architecture without --encoder-pretrained: ViT-L-14-336, ViT-L-14, ViT-B-16 or a config .json",
        metavar="NAME",
    )
    encoder_pretrained: str | None = setting(
        None,
        help="CLIP weights: a local Hugging Face checkpoint directory or, with --encoder-backend open_clip, an "
        "open_clip file or tag; omitted = random (tests only)",
        metavar="PATH",
        resume_safe=True,
    )
    encoder_backend: str = setting(
        "transformers",
        help="transformers (CLIPVisionModelWithProjection) or open_clip",
        choices=("transformers", "open_clip"),
    )
    quick_gelu: bool = setting(False, help="QuickGELU activations (required by OpenAI's CLIP weights)")
    feature_layers: list[int] | None = setting(
        None, help="CLIP blocks feeding the segmentation decoder (default: 3 evenly spaced)", metavar="LIST", low=0
    )
    image_size: int | None = setting(None, help="input resolution; must be the encoder's", metavar="N", low=1)

    def __post_init__(self) -> None:
        validate(self)
        weights = self.encoder_pretrained
        if self.encoder_backend == "transformers" and weights and weights.lower().endswith(CHECKPOINT_FILE_SUFFIXES):
            raise ValueError(
                f"encoder_pretrained: {weights!r} is a single checkpoint file, which the transformers backend cannot "
                "load (it reads a Hugging Face CLIP directory); pass --encoder-backend open_clip for an open_clip or "
                "OpenAI file"
            )


def head_section(tasks: list[TaskSpec], name: str = "HeadConfig") -> type:
    """One flat settings section holding the head settings of every task in ``tasks`` (``TaskSpec.head_settings``):
    each field once, its help prefixed by the tasks that read it (``"refseg, multitask: mask decoder channels"``). A
    field two tasks declare must agree in type and default (ValueError otherwise). Building the section also builds
    each task's own settings from it, so that their checks run (e.g. ``msa``: ``seq_d_model`` a multiple of
    ``seq_heads``)."""
    fields: dict[str, tuple[Any, dataclasses.Field, list[str]]] = {}
    owners = [spec for spec in tasks if spec.head_settings is not None]
    for spec in owners:
        hints = typing.get_type_hints(spec.head_settings)
        for field in dataclasses.fields(spec.head_settings):
            if field.name in fields:
                kind, first, names = fields[field.name]
                if kind != hints[field.name] or first.default != field.default:
                    raise ValueError(
                        f"head settings: task {spec.name!r} declares {field.name!r} as {hints[field.name]} = "
                        f"{field.default!r}, tasks {names} as {kind} = {first.default!r}; rename one"
                    )
                names.append(spec.name)
            else:
                fields[field.name] = (hints[field.name], field, [spec.name])

    def merged_field(field: dataclasses.Field, names: list[str]) -> dataclasses.Field:
        info = info_of(field)
        return setting(field.default, **{**vars(info), "help": f"{', '.join(names)}: {info.help}"})

    def __post_init__(self) -> None:
        validate(self)
        for spec in owners:
            spec.head_settings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(spec.head_settings)})

    return dataclasses.make_dataclass(
        name,
        [(key, kind, merged_field(field, names)) for key, (kind, field, names) in fields.items()],
        namespace={
            "__post_init__": __post_init__,
            "__doc__": "The trainable task heads: every registered task's head settings, one flat section.",
            "__module__": __name__,
        },
    )


HeadConfig = head_section(registered_tasks())  # the built-in tasks' (registered by importing mit.tuning.tasks)


@dataclasses.dataclass
class OptimConfig:
    """Optimisation; the defaults are the paper's (Sec. 3.3)."""

    epochs: int = setting(30, help="epochs (30)", metavar="N", low=1, resume_safe=True)
    lr: float = setting(4e-5, help="Adam learning rate (4e-5)", metavar="LR", low=0, low_open=True)
    lr_step: int = setting(10, help="decay the learning rate every N epochs (10)", metavar="N", low=1)
    lr_gamma: float = setting(0.1, help="decay factor (0.1)", metavar="G", low=0, low_open=True)
    weight_decay: float = setting(0.0, help="Adam weight decay (0)", metavar="W", low=0)
    batch_size: int = setting(8, help="samples per process and step (8)", metavar="N", low=1)
    grad_accum: int = setting(1, help="gradient accumulation steps (1)", metavar="N", low=1)
    max_grad_norm: float | None = setting(
        None, help="clip gradients to this norm (default: off)", metavar="X", low=0, low_open=True
    )
    mixed_precision: str = setting("no", help="no / fp32, bf16 (the paper's) or fp16", choices=PRECISIONS)
    seed: int = setting(42, help="random seed (42)", metavar="N", low=0)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def precision(self) -> str:
        """accelerate's name for ``mixed_precision``."""
        return "no" if self.mixed_precision == "fp32" else self.mixed_precision


@dataclasses.dataclass
class RunSettings:
    """Output, checkpoints, evaluation and resuming."""

    out: str = setting(help="run directory: config.json, loss.csv, metrics.csv, checkpoints/", metavar="DIR")
    max_steps: int | None = setting(
        None, help="stop after N optimizer steps (with a checkpoint)", metavar="N", low=1, resume_safe=True
    )
    checkpoint_every: int = setting(
        0, help="also checkpoint every N optimizer steps (0: at epoch ends only)", metavar="N", low=0, resume_safe=True
    )
    keep_checkpoints: int = setting(2, help="checkpoints kept (2)", metavar="N", low=1, resume_safe=True)
    eval_every: int = setting(1, help="evaluate every N epochs (1)", metavar="N", low=1, resume_safe=True)
    eval_batch_size: int | None = setting(
        None, help="evaluation batch size (default: --batch-size)", metavar="N", low=1, resume_safe=True
    )
    num_workers: int = setting(0, help="data loader workers (0)", metavar="N", low=0, resume_safe=True)
    resume: bool = setting(False, help="continue the run in --out from its latest checkpoint", resume_safe=True)
    progress: bool = setting(True, help="show a progress bar and one line per epoch (stderr)", resume_safe=True)
    report_to: str = setting(
        "none",
        help="experiment tracker, through accelerate: none, tensorboard (event files in --out/trackers) or wandb",
        choices=TRACKERS,
        resume_safe=True,
    )

    def __post_init__(self) -> None:
        validate(self)


def _default_mit() -> MiTConfig:
    return MiTConfig(modality_dim=768)


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs; ``mit train`` builds it from a config file and command-line flags.

    ``RunConfig.from_dict`` accepts nested sections (``{"optim": {"lr": 1e-3}}``, as ``to_dict`` writes them) or the
    flat flag names (``{"lr": 1e-3}``), or a mix; a setting given under two spellings (``lr`` beside ``optim.lr``) is a
    ValueError naming both. For tasks with an image encoder ``mit.modality_dim`` is set to the encoder's embedding size
    when the model is built."""

    task: str = setting(help="the task", choices=task_names)
    llm: LLMConfig = setting()
    data: DataConfig = setting()
    run: RunSettings = setting()
    encoder: EncoderConfig = setting(default_factory=EncoderConfig)
    mit: MiTConfig = setting(default_factory=_default_mit)
    neural: NeuralTuningConfig = setting(default_factory=NeuralTuningConfig)
    heads: HeadConfig = setting(default_factory=HeadConfig)
    optim: OptimConfig = setting(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        validate(self)
        spec = get_task(self.task)
        self.data.dataset = spec.dataset(self.data.dataset).name

    @property
    def spec(self) -> TaskSpec:
        """The task's :class:`~mit.tuning.tasks.TaskSpec`."""
        return get_task(self.task)

    @property
    def method(self) -> TuningMethod:
        """The task's tuning method."""
        return self.spec.method

    @property
    def method_config(self) -> Any:
        """The configuration of the task's method: the section ``method.config_section`` (``mit`` or ``neural``)."""
        return getattr(self, self.method.config_section)

    def with_method_config(self, method_config: Any) -> RunConfig:
        """A copy whose method section is ``method_config`` (validated)."""
        return dataclasses.replace(self, **{self.method.config_section: method_config})

    def head_settings(self) -> Any:
        """The task's own head settings (an instance of ``spec.head_settings``, None if it has none), from the
        ``heads`` section; a field the section lacks (a task registered after this module was imported) keeps the
        task's default."""
        kind = self.spec.head_settings
        if kind is None:
            return None
        names = {f.name for f in dataclasses.fields(self.heads)}
        return kind(**{f.name: getattr(self.heads, f.name) for f in dataclasses.fields(kind) if f.name in names})

    def _unused_sections(self) -> set[str]:
        """The sections of the methods this run's task does not use."""
        return {m.config_section for m in METHODS.values()} - {self.method.config_section}

    def splits(self) -> tuple[str, str]:
        """(training split, evaluation split)."""
        train, evaluation = self.spec.dataset(self.data.dataset).splits
        return self.data.train_split or train, self.data.eval_split or evaluation

    def to_dict(self) -> dict[str, Any]:
        """Nested by section (what ``config.json`` holds); of the method sections only the task's method's."""
        data = dataclasses.asdict(self)
        for section in self._unused_sections():
            data.pop(section, None)
        return data

    def to_flat(self) -> dict[str, Any]:
        """``{flag name: value}``."""
        return to_flat(self)

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with some settings (flat flag names) changed, validated."""
        return from_mapping(RunConfig, {**self.to_flat(), **flat}, "RunConfig")

    def resume_conflicts(self, previous: RunConfig) -> list[tuple[str, Any, Any]]:
        """(flag, previous value, this value) of the settings that differ from ``previous`` and may not change when
        resuming it."""
        unused = self._unused_sections()
        return differences(previous, self, ignore=lambda leaf: leaf.info.resume_safe or leaf.path[0] in unused)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        return from_mapping(cls, data, where)

    @classmethod
    def from_json(cls, text: str, where: str = "config.json") -> RunConfig:
        return cls.from_dict(json.loads(text), where)


def resume_safe_flags() -> list[str]:
    """The settings that may differ when resuming."""
    return [leaf.flag for leaf in flat_fields(RunConfig) if leaf.info.resume_safe]
