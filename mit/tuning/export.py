"""From a training run to inference: ``mit export`` (a checkpoint -> a task adapter directory) and ``mit predict``.

An exported directory holds everything a prediction needs besides the frozen base LLM and CLIP weights::

    mit_config.json, adapter_model.safetensors   the MiT adapter (mit.save_adapter: mit.load_adapter reads it too)
    task_head.safetensors                        the task's trainable modules outside the LLM (head, ...)
    task.json                                    format, task, the run's settings, class names, prompt template,
                                                 the checkpoint and step it came from

Prediction is implemented for ``cls`` (image + text -> a class name and its probability) and ``refseg`` (image +
referring expression -> a mask, written as a PNG at the image's resolution); the other tasks are refused with a
ValueError saying so (``msa`` reads acoustic / facial feature sequences, not images; ``multitask`` answers with text
and masks of its own kind).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

FORMAT = "mit-task-v1"
TASK_FILE = "task.json"
HEAD_WEIGHTS = "task_head.safetensors"
PREDICT_TASKS = {"cls": "text", "refseg": "description"}  # task -> the prompt template's text field


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Write the task adapter of checkpoint ``path`` (a checkpoint directory, or a run directory: its latest) to the
    new directory ``out`` (written under a temporary name, then renamed: never half written). ValueError when ``out``
    exists or the run's method is not MiT."""
    from safetensors.torch import save_file

    from ..integrations.adapter import save_adapter
    from .checkpoints import checkpoint_dir, read_config, read_counters
    from .trainer import Trainer

    target = pathlib.Path(out)
    if target.exists():
        raise ValueError(f"out: {str(target)!r} exists; expected a new directory (nothing is overwritten)")
    directory = checkpoint_dir(path)
    config = read_config(directory).replace(progress=False, resume=False)
    if config.method.name != "mit":
        raise ValueError(f"checkpoint: mit export writes MiT adapters; this run trained {config.method.name!r}")
    trainer = Trainer(config, build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    model = trainer.unwrapped
    head = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith("llm.")}  # fmt: skip
    counters = read_counters(directory)
    dataset = trainer.eval_dataset
    task = {
        "format": FORMAT, "task": config.task, "run_config": config.to_dict(),
        "classes": list(getattr(dataset, "classes", []) or []), "template": getattr(dataset, "template", None),
        "checkpoint": str(directory.resolve()), "global_step": counters["global_step"],
    }  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_adapter(model.llm, staging)
        save_file(head, str(staging / HEAD_WEIGHTS))
        (staging / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trainer.close()
    return target


def read_task(directory: str | os.PathLike) -> dict[str, Any]:
    """``task.json`` of an exported directory, checked; ValueError naming the file otherwise."""
    path = pathlib.Path(directory) / TASK_FILE
    if not path.is_file():
        raise ValueError(f"adapter: {str(path)!r} does not exist; expected a directory written by mit export")
    try:
        task = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter: {path} is not valid JSON ({error})") from None
    if not isinstance(task, dict) or task.get("format") != FORMAT:
        raise ValueError(f"adapter: {path}: expected format {FORMAT!r}, got {task.get('format')!r}")
    return task


class Predictor:
    """An exported ``cls`` or ``refseg`` adapter on its base LLM and CLIP tower, ready to answer:
    ``predict(images, texts)`` (``masks_dir`` for refseg)."""

    def __init__(self, directory: str | os.PathLike, overrides: dict[str, Any] | None = None) -> None:
        from safetensors.torch import load_file

        from ..integrations.adapter import load_adapter
        from .build import build_encoder, build_model, resolve_config
        from .config import RunConfig
        from .tasks import resolve_dtype

        directory = pathlib.Path(directory)
        task = read_task(directory)
        if task["task"] not in PREDICT_TASKS:
            raise ValueError(
                f"adapter: mit predict supports the tasks {tuple(PREDICT_TASKS)}; this adapter is {task['task']!r}"
            )
        config = RunConfig.from_dict(task["run_config"], str(directory / TASK_FILE))
        config = config.replace(**{**(overrides or {}), "progress": False, "resume": False})
        from accelerate.utils import set_seed

        set_seed(config.optim.seed)  # as the trainer does: a tower without --encoder-pretrained is the run's random one
        dtype = resolve_dtype(config.llm.model_dtype, config.optim.mixed_precision)
        encoder = build_encoder(config.encoder, dtype)
        config = resolve_config(config, encoder)
        classes = task["classes"]
        stub = SimpleNamespace(
            classes=classes, num_classes=len(classes)
        )  # the number of classes the head was built with
        built = build_model(config, config.spec, dtype, encoder, stub)
        self.model, self.encoder, self.tokenizer, self.spec = built.model.eval(), encoder, built.tokenizer, config.spec
        self.padding_side, self.max_length = config.llm.padding_side, config.llm.max_length
        load_adapter(self.model.llm, directory)  # the MiT maps: checked against the model, then copied
        head = load_file(str(directory / HEAD_WEIGHTS))
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("llm.")
                   and n not in head]  # fmt: skip
        result = self.model.load_state_dict(head, strict=False)
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter: {HEAD_WEIGHTS} does not match the task model (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")  # fmt: skip
        self.classes, self.template, self.task = classes, task["template"], task

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[str | os.PathLike],
        texts: Sequence[str],
        batch_size: int = 8,
        progress: bool = False,
        masks_dir: str | os.PathLike | None = None,
    ) -> list[dict[str, Any]]:
        """One answer per (image path, text) pair, in order, computed ``batch_size`` pairs at a time.

        ``cls``: ``{"image", "text", "label", "probability"}`` (the most probable class). ``refseg``: ``{"image",
        "text", "mask", "foreground"}``: the mask, at the image's own resolution (the logits resized bilinearly and
        thresholded at 0, as evaluation does), is written as a black / white PNG in ``masks_dir`` (created; required
        for refseg) under ``<index>_<image stem>.png``; ``foreground`` is the fraction of its pixels that are in it."""
        from ..utils.progress import progress_bar
        from .data.common import load_image
        from .prompts import format_prompt
        from .tasks.base import encode_text

        if len(images) != len(texts):
            raise ValueError(f"texts: expected one text per image ({len(images)}), got {len(texts)}")
        if not images:
            raise ValueError("images: expected at least one image")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        segment = self.task["task"] == "refseg"
        if segment:
            if masks_dir is None:
                raise ValueError("masks_dir: a refseg adapter predicts masks; expected a directory to write them to")
            masks_dir = pathlib.Path(masks_dir)
            masks_dir.mkdir(parents=True, exist_ok=True)
        view = self.encoder.preprocessing.square if segment else self.encoder.preprocessing.crop
        field = PREDICT_TASKS[self.task["task"]]
        rows: list[dict[str, Any]] = []
        starts = range(0, len(images), batch_size)
        for start in progress_bar(starts, desc="predicting", unit="batch", disable=not progress):
            paths, batch_texts = images[start : start + batch_size], texts[start : start + batch_size]
            pictures = [load_image(path) for path in paths]
            items = [{"prompt": format_prompt(self.template, **{field: text}), "id": str(path)}
                     for path, text in zip(paths, batch_texts)]  # fmt: skip
            batch = {**encode_text(self.spec, self.tokenizer, items, self.padding_side, self.max_length),
                     "id": [x["id"] for x in items], "image": torch.stack([view(p) for p in pictures])}  # fmt: skip
            logits = self.model(batch)["logits"].float()
            for i, (path, text, picture) in enumerate(zip(paths, batch_texts, pictures)):
                row = {"image": str(path), "text": text}
                if segment:
                    row.update(
                        self._write_mask(
                            logits[i], picture.size, masks_dir / f"{start + i:05d}_{pathlib.Path(path).stem}.png"
                        )
                    )
                else:
                    probabilities = logits[i].softmax(-1)
                    index = int(probabilities.argmax())
                    row.update(label=self.classes[index], probability=float(probabilities[index]))
                rows.append(row)
        return rows

    @staticmethod
    def _write_mask(logits: torch.Tensor, size: tuple[int, int], path: pathlib.Path) -> dict[str, Any]:
        """``logits`` (S, S) -> the mask at ``size`` (width, height), written as a PNG at ``path``."""
        from PIL import Image
        from torch.nn import functional as F

        from ..utils.files import atomic_write

        width, height = size
        resized = F.interpolate(logits[None, None], size=(height, width), mode="bilinear", align_corners=False)
        mask = (resized[0, 0] > 0).cpu()
        picture = Image.fromarray(mask.numpy().astype("uint8") * 255, mode="L")
        atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))
        return {"mask": str(path), "foreground": float(mask.float().mean())}


__all__ = ["FORMAT", "HEAD_WEIGHTS", "PREDICT_TASKS", "TASK_FILE", "Predictor", "export_checkpoint", "read_task"]
