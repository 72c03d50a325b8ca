"""Training and evaluation on accelerate: the paper's schedule, exact resume, atomic trainable-only checkpoints.

Defaults follow the paper (Sec. 3.3): Adam, lr 4e-5, x0.1 every 10 epochs, 30 epochs, batch 8 per device, bf16 on
GPUs. Everything is a field of :class:`TrainConfig`.

Run directory (``out``)::

    config.json                      the resolved TrainConfig
    loss.csv                         global_step, epoch, loss, lr: one row per optimizer step
    metrics.csv                      one row per epoch: train loss, eval loss and the task's metrics
    checkpoints/step-000120/         trainable.safetensors (trainable parameters only), trainer_state.pt
                                     (optimizer, scheduler, counters, logs), rng_state_<rank>.pt, config.json
    checkpoints/latest               name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, and ``latest`` is replaced
atomically, so a kill at any moment leaves the previous checkpoint usable. Resuming restores the parameters, the
optimizer and scheduler, every RNG and the position in the epoch's (seeded) data order: the loss curve continues
exactly as if the run had not stopped.

Multi-GPU runs need no change: ``accelerate launch --num_processes N -m mit.cli train ...``; several CPU processes
(gloo): ``torchrun --nproc_per_node N -m mit.cli train ...``. Each process takes its shard of a per-epoch permutation
seeded by ``seed + epoch``; gradients are averaged by DDP. Sharded runs (FSDP2, DeepSpeed ZeRO-3; what changes for
them is in :mod:`mit.tuning.distributed`): docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..config import MiTConfig
from . import distributed
from .tasks import (
    DATASETS,
    DEFAULT_DATASET,
    DEFAULT_SPLITS,
    SELECTION_METRIC,
    TASKS,
    batch_to,
    build_task_model,
    check_llm_path,
    compute_metrics,
    evaluation_records,
    load_llm,
    make_collate,
    resolve_dtype,
)

MIXED_PRECISION = ("no", "fp32", "bf16", "fp16")
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; ``mit train`` builds it from a config file and command-line flags."""

    task: str
    model: str
    data: str
    out: str
    dataset: str | None = None
    # image encoder (refseg, cls)
    encoder: str = "ViT-L-14-336"
    encoder_pretrained: str | None = None
    encoder_backend: str = "transformers"
    quick_gelu: bool = False
    feature_layers: list[int] | None = None
    image_size: int | None = None
    image_dir: str | None = None
    # dataset files and splits
    split_by: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    feature_file: str | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    # MiT
    layers: list[int] | None = None
    infuse_kv: bool = True
    infuse_ffn: bool = True
    head_rescale: bool = True
    backend: str = "auto"
    modality_dim: int = 768
    # heads and the sequence encoder
    seq_d_model: int = 128
    seq_layers: int = 3
    seq_heads: int = 4
    decoder_hidden: int = 256
    cls_hidden: int = 512
    reg_hidden: int = 0
    dropout: float = 0.1
    bce_weight: float = 0.0
    # prompts
    padding_side: str = "left"
    max_length: int = 64
    # optimisation
    epochs: int = 30
    lr: float = 4e-5
    lr_step: int = 10
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    model_dtype: str = "auto"
    seed: int = 42
    max_steps: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 1
    num_workers: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(condition: bool, name: str, expected: str) -> None:
            if not condition:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        need(self.task in TASKS, "task", f"one of {list(TASKS)}")
        if self.dataset is None:
            self.dataset = DEFAULT_DATASET[self.task]
        need(self.dataset in DATASETS[self.task], "dataset", f"one of {list(DATASETS[self.task])} for task {self.task}")
        for name in ("model", "data", "out"):
            need(isinstance(getattr(self, name), str) and getattr(self, name) != "", name, "a non-empty path")
        need(self.encoder_backend in ("transformers", "open_clip"), "encoder_backend", "transformers or open_clip")
        need(self.padding_side in ("left", "right"), "padding_side", "left or right")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"one of {list(MIXED_PRECISION)}")
        need(self.model_dtype in ("auto", "fp32", "bf16", "fp16"), "model_dtype", "auto, fp32, bf16 or fp16")
        for name in (
            "epochs",
            "lr_step",
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_every",
            "keep_checkpoints",
            "seq_d_model",
            "seq_layers",
            "seq_heads",
            "decoder_hidden",
            "cls_hidden",
            "modality_dim",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("checkpoint_every", "num_workers", "reg_hidden"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("max_steps", "limit_train", "limit_eval", "eval_batch_size", "image_size"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1), name, "None or an integer >= 1")
        for name in ("lr", "lr_gamma"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("weight_decay", "bce_weight"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0, name, "a number >= 0")
        need(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")

    @property
    def precision(self) -> str:
        return "no" if self.mixed_precision == "fp32" else self.mixed_precision

    def splits(self) -> tuple[str, str]:
        train, evaluation = DEFAULT_SPLITS[self.dataset]
        return self.train_split or train, self.eval_split or evaluation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected keys among {sorted(known)}")
        missing = sorted(k for k in ("task", "model", "data", "out") if data.get(k) is None)
        if missing:
            raise ValueError(f"missing required settings {missing} (give them in the config file or as --{missing[0]})")
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------- data


def build_datasets(config: TrainConfig, image_size: int | None, splits: tuple[str, ...]) -> list:
    from .data import Food101Dataset, MSADataset, RefCOCODataset, SNLIVEDataset

    out = []
    for i, split in enumerate(splits):
        limit = config.limit_train if i == 0 and len(splits) == 2 else config.limit_eval
        if config.task == "refseg":
            out.append(
                RefCOCODataset(
                    config.data, config.dataset, split, config.split_by, image_size, config.image_dir, limit=limit
                )
            )
        elif config.dataset == "food101":
            out.append(Food101Dataset(config.data, split, image_size, limit=limit))
        elif config.dataset == "snli-ve":
            out.append(SNLIVEDataset(config.data, split, image_size, config.image_dir, limit=limit))
        else:
            out.append(MSADataset(config.data, split, config.feature_file, limit=limit))
    return out


def _shard(indices: list[int], rank: int, world: int, pad: bool) -> list[int]:
    if pad and len(indices) % world:
        indices = indices + indices[: world - len(indices) % world]
    return indices[rank::world]


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (the global RNG others may use)
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    numpy_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds the task model and data of a :class:`TrainConfig` and trains / evaluates it.

    ``Trainer(config).train()`` runs to ``epochs`` (or ``max_steps`` optimizer steps, then stops with a checkpoint);
    with ``config.resume`` it continues from ``out/checkpoints/latest``. ``evaluate()`` returns the metrics of the
    evaluation split."""

    def __init__(self, config: TrainConfig, accelerator=None, build_train_data: bool = True) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        # several processes without GPUs (torchrun / accelerate launch on CPU): accelerate needs cpu=True for gloo
        world = int(os.environ.get("WORLD_SIZE", "1"))
        multi_cpu = not torch.cuda.is_available() and world > 1
        if accelerator is None and world == 1:
            from accelerate.state import AcceleratorState

            # accelerate keeps one global state per process; a second Trainer in the same process (tests, notebooks)
            # may ask for another precision
            AcceleratorState._reset_state()
        self.accelerator = accelerator or Accelerator(mixed_precision=config.precision, cpu=multi_cpu)
        distributed.enable_cpu_fsdp(self.accelerator)  # ACCELERATE_USE_FSDP on CPU processes (accelerate: DDP)
        distributed.check_supported(self.accelerator)
        self.out = pathlib.Path(config.out)
        if build_train_data and not config.resume and (self.out / "checkpoints" / "latest").exists():
            raise ValueError(
                f"out: {self.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        check_llm_path(config.model)
        set_seed(config.seed)
        dtype = resolve_dtype(config.model_dtype, config.mixed_precision)
        encoder = None
        image_size = None
        if config.task in ("refseg", "cls"):
            from .encoders import CLIPImageEncoder

            encoder = CLIPImageEncoder(
                config.encoder,
                config.encoder_pretrained,
                config.feature_layers,
                config.encoder_backend,
                config.quick_gelu,
            )
            encoder.to(dtype)
            image_size = config.image_size or encoder.image_size
            if image_size != encoder.image_size:
                raise ValueError(
                    f"image_size: expected the CLIP model's input size {encoder.image_size}, got {image_size}"
                )
        train_split, eval_split = config.splits()
        splits = (train_split, eval_split) if build_train_data else (eval_split,)
        datasets = build_datasets(config, image_size, splits)
        self.train_dataset = datasets[0] if build_train_data else None
        self.eval_dataset = datasets[-1]
        llm, self.tokenizer = load_llm(config.model, dtype)  # after the data: its errors come before a long load
        modality_dim = encoder.embed_dim if encoder is not None else config.modality_dim
        mit_config = MiTConfig(
            modality_dim=modality_dim,
            layers=config.layers,
            infuse_kv=config.infuse_kv,
            infuse_ffn=config.infuse_ffn,
            head_rescale=config.head_rescale,
            backend=config.backend,
        )
        self.model = build_task_model(
            config.task,
            llm,
            mit_config,
            encoder=encoder,
            num_classes=getattr(self.eval_dataset, "num_classes", None),
            feature_dims=getattr(self.eval_dataset, "feature_dims", None),
            seq_d_model=config.seq_d_model,
            seq_layers=config.seq_layers,
            seq_heads=config.seq_heads,
            decoder_hidden=config.decoder_hidden,
            cls_hidden=config.cls_hidden,
            reg_hidden=config.reg_hidden,
            dropout=config.dropout,
            bce_weight=config.bce_weight,
        )
        self.collate = make_collate(config.task, self.tokenizer, config.padding_side, config.max_length)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_step, gamma=config.lr_gamma
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # micro-batches consumed in the current epoch
        self.global_step = 0  # optimizer steps
        self.loss_rows: list[dict[str, Any]] = []
        self.metric_rows: list[dict[str, Any]] = []
        self._epoch_losses: list[float] = []
        if config.resume:
            latest = self.out / "checkpoints" / "latest"
            if latest.is_file():
                self.load_checkpoint(self.out / "checkpoints" / latest.read_text().strip())

    # -------------------------------------------------------------------------------------------- helpers

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _train_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of ``epoch``: a permutation seeded by ``seed + epoch``, sharded by rank."""
        generator = torch.Generator().manual_seed(self.config.seed + epoch)
        order = torch.randperm(len(self.train_dataset), generator=generator).tolist()
        mine = _shard(order, self.accelerator.process_index, self.accelerator.num_processes, pad=True)
        size = self.config.batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def _loader(self, dataset, batches: list[list[int]]) -> DataLoader:
        # an own generator: creating the iterator would otherwise draw a seed from the global RNG, which must stay
        # where a checkpoint left it for an exact resume
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.config.num_workers,
            generator=generator,
        )

    def _write_logs(self) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "loss.csv", _csv_text(self.loss_rows))
            _atomic_write_text(self.out / "metrics.csv", _csv_text(self.metric_rows))

    # ------------------------------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train until ``epochs`` (or ``max_steps``); returns the last evaluation's metrics (empty if none ran)."""
        if self.train_dataset is None:
            raise ValueError("this Trainer was built without training data (build_train_data=False)")
        config = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "config.json", json.dumps(config.to_dict(), indent=2))
        last_metrics: dict[str, float] = {}
        progress = None
        if config.progress and self.is_main:
            from tqdm.auto import tqdm

            total = len(self._train_batches(0)) * config.epochs
            progress = tqdm(
                total=total,
                initial=self.epoch * len(self._train_batches(0)) + self.step_in_epoch,
                desc=f"mit {config.task}",
                dynamic_ncols=True,
            )
        try:
            while self.epoch < config.epochs:
                batches = self._train_batches(self.epoch)
                if self.step_in_epoch == 0:
                    self._epoch_losses = []
                stopped = self._train_epoch(batches, progress)
                if stopped:
                    return last_metrics
                # end of epoch: LR decay, evaluation, checkpoint
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                row: dict[str, Any] = {
                    "epoch": self.epoch + 1,
                    "global_step": self.global_step,
                    "lr": lr,
                    "train_loss": float(np.mean(self._epoch_losses)) if self._epoch_losses else math.nan,
                }
                if (self.epoch + 1) % config.eval_every == 0 or self.epoch + 1 == config.epochs:
                    last_metrics = self.evaluate()
                    row.update({"eval_" + k if k == "loss" else k: v for k, v in last_metrics.items()})
                self.metric_rows.append(row)
                self.epoch += 1
                self.step_in_epoch = 0
                self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        return last_metrics

    def _train_epoch(self, batches: list[list[int]], progress) -> bool:
        """Train on the rest of this epoch's micro-batches; True if ``max_steps`` stopped the run."""
        config, accelerator = self.config, self.accelerator
        self.model.train()
        n = len(batches)
        start = self.step_in_epoch
        group_losses: list[float] = []
        for index, batch in enumerate(self._loader(self.train_dataset, batches[start:]), start=start):
            group_start = index - index % config.grad_accum
            group_size = min(config.grad_accum, n - group_start)
            last_in_group = index == group_start + group_size - 1
            batch = batch_to(batch, accelerator.device)
            sync = contextlib.nullcontext() if last_in_group else accelerator.no_sync(self.model)
            with sync:
                loss = self.model(batch)["loss"]
                accelerator.backward(loss / group_size)
            group_losses.append(accelerator.reduce(loss.detach().float(), "mean").item())
            self.step_in_epoch = index + 1
            if progress is not None:
                progress.update(1)
            if not last_in_group:
                continue
            if config.max_grad_norm:  # all parameters (frozen ones have no gradient): FSDP's sharded clipping
                accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            loss_value = float(np.mean(group_losses))
            group_losses = []
            self._epoch_losses.append(loss_value)
            lr = self.optimizer.param_groups[0]["lr"]
            self.loss_rows.append({"global_step": self.global_step, "epoch": self.epoch, "loss": loss_value, "lr": lr})
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            stop = config.max_steps is not None and self.global_step >= config.max_steps
            if stop or (config.checkpoint_every and self.global_step % config.checkpoint_every == 0):
                self.save_checkpoint()
            if stop:
                return True
        return False

    # ---------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict[str, float]:
        """Metrics (and mean loss) of ``dataset`` (default: the evaluation split), gathered over processes."""
        dataset = dataset if dataset is not None else self.eval_dataset
        accelerator = self.accelerator
        was_training = self.model.training
        self.model.eval()
        indices = _shard(list(range(len(dataset))), accelerator.process_index, accelerator.num_processes, pad=False)
        size = self.config.eval_batch_size or self.config.batch_size
        records: list[tuple] = []
        loss_sum, count = 0.0, 0
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        real = len(batches)
        batches = distributed.pad_batches(accelerator, batches)  # sharded: as many forwards on every process
        for i, batch in enumerate(self._loader(dataset, batches)):
            batch = batch_to(batch, accelerator.device)
            out = self.model(batch)
            if i >= real:
                continue  # a padding forward: its outputs are not counted
            records += evaluation_records(self.config.task, batch, out)
            loss_sum += float(out["loss"]) * len(batch["id"])
            count += len(batch["id"])
        from accelerate.utils import gather_object

        if accelerator.num_processes > 1:
            records = gather_object(records)
            totals = gather_object([(loss_sum, count)])
            loss_sum, count = sum(t[0] for t in totals), sum(t[1] for t in totals)
        metrics = {"loss": loss_sum / max(count, 1), **compute_metrics(self.config.task, records)}
        if was_training:
            self.model.train()
        return metrics

    # --------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> pathlib.Path:
        """Write ``checkpoints/step-N`` atomically (temp dir + rename) and point ``latest`` at it."""
        accelerator = self.accelerator
        root = self.out / "checkpoints"
        name = f"step-{self.global_step:07d}"
        tmp = root / f".tmp-{name}"
        final = root / name
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        # full trainable tensors and optimizer state (collectives under FSDP / DeepSpeed: every process calls them)
        weights = distributed.trainable_state_dict_full(accelerator, self.model)
        optimizer_state = distributed.optimizer_state(accelerator, self.model, self.optimizer, tmp)
        if self.is_main:
            save_file(weights, str(tmp / CHECKPOINT_WEIGHTS), metadata={"format": "pt"})
            state = {
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "epoch_losses": list(self._epoch_losses),
                "loss_rows": self.loss_rows,
                "metric_rows": self.metric_rows,
                "num_processes": accelerator.num_processes,
            }
            torch.save(state, tmp / CHECKPOINT_STATE)
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _atomic_write_text(root / "latest", name)
            kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
            self._write_logs()
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: str | os.PathLike, weights_only: bool = False) -> None:
        """Restore a checkpoint: trainable parameters, and (unless ``weights_only``) optimizer, scheduler, counters,
        logs and RNG states."""
        directory = pathlib.Path(directory)
        weights = directory / CHECKPOINT_WEIGHTS
        if not weights.is_file():
            raise ValueError(f"checkpoint {directory}: missing {CHECKPOINT_WEIGHTS}")
        tensors = load_file(str(weights))
        # names and full shapes checked, then each process keeps its shard (FSDP / DeepSpeed)
        distributed.load_trainable(self.accelerator, self.model, tensors, source=str(weights))
        if weights_only:
            return
        state = torch.load(directory / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"checkpoint {directory} was written by {state['num_processes']} processes; resuming "
                f"exactly needs the same number, got {self.accelerator.num_processes}"
            )
        distributed.load_optimizer_state(self.accelerator, self.model, self.optimizer, state["optimizer"], directory)
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self._epoch_losses = list(state["epoch_losses"])
        self.loss_rows, self.metric_rows = list(state["loss_rows"]), list(state["metric_rows"])
        rng = directory / f"rng_state_{self.accelerator.process_index}.pt"
        _set_rng_state(torch.load(rng, weights_only=False))
        self._write_logs()


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory."""
    path = pathlib.Path(path)
    if (path / CHECKPOINT_WEIGHTS).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    raise ValueError(
        f"--checkpoint {path}: expected a run directory with checkpoints/latest or a checkpoint "
        f"directory with {CHECKPOINT_WEIGHTS}"
    )


def evaluate_checkpoint(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Rebuild the run of a checkpoint (its config.json, with ``overrides``), load its weights, evaluate."""
    directory = checkpoint_dir(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"checkpoint {directory}: missing config.json")
    data = json.loads(config_path.read_text())
    data.update(overrides or {})
    data["resume"] = False
    trainer = Trainer(TrainConfig.from_dict(data), build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    return trainer.evaluate()


__all__ = ["SELECTION_METRIC", "TrainConfig", "Trainer", "checkpoint_dir", "evaluate_checkpoint"]
