"""Training and evaluation on accelerate: the paper's schedule, exact resume, atomic trainable-only checkpoints.

Defaults follow the paper (Sec. 3.3): Adam, lr 4e-5, x0.1 every 10 epochs, 30 epochs, batch 8 per device, bf16 on
GPUs. Everything is a field of :class:`~mit.tuning.config.RunConfig`; what is task-specific comes from the task's
:class:`~mit.tuning.tasks.TaskSpec`, what is method-specific from its :class:`~mit.tuning.methods.TuningMethod`.

:class:`Trainer` composes parts that work on their own: :mod:`~mit.tuning.build` (encoder, LLM, method, heads),
:mod:`~mit.tuning.loaders` (datasets, seeded sharded batches, loaders), :mod:`~mit.tuning.optim` (optimizer and
schedule), :mod:`~mit.tuning.loop` (the step's checks), :mod:`~mit.tuning.checkpoints` (atomic checkpoints, reading
them back), :mod:`~mit.tuning.run_dir` (the directory's lock and logs) and :mod:`~mit.tuning.distributed`.

Run directory (``out``)::

    config.json                      the resolved RunConfig (nested by section)
    loss.csv                         global_step, epoch, loss, lr: one row per optimizer step
    metrics.csv                      one row per epoch: train loss, eval loss and the task's metrics
    checkpoints/step-000120/         trainable.safetensors (trainable parameters only), trainer_state.pt
                                     (optimizer, scheduler, counters, logs), rng_state_<rank>.pt, config.json
    checkpoints/latest               name of the newest complete checkpoint

A training run locks its directory (``.mit-run.lock``, an OS lock released when the process ends, even by a crash)
from the moment it is created to the end of :meth:`Trainer.train`, before it reads or writes anything there: a second
run on the same ``out`` is refused at once, naming the holder's pid. The lock file is removed on release; one left by
a killed run is harmless. A checkpoint directory is written under a temporary name
unique to the run (``checkpoints/.tmp-step-N.<pid>-<random>``) and renamed when complete, and ``latest`` is replaced
atomically, so a kill at any moment leaves the previous checkpoint usable; SIGTERM (and Ctrl-C) first remove the
incomplete checkpoint. A write that fails (a full disk, a read-only file system) raises :class:`RunOutputError` naming
the path, the operating system's reason and the last complete checkpoint, which stays usable.

Resuming restores the parameters, the optimizer and scheduler, every RNG and the position in the epoch's (seeded) data
order: the loss curve continues exactly as if the run had not stopped. It refuses a configuration that differs from
the checkpoint's in anything but the settings declared resume-safe (epochs, max_steps, paths, ...), loads with
``torch.load(weights_only=True)``, falls back to the previous complete checkpoint (saying so) when the latest cannot
be read, and removes temporary directories and files a killed run left behind. A non-finite loss (or non-finite
parameters after a step) stops the run with :class:`TrainingDiverged` before anything is saved, so the last checkpoint
stays the last good one.

Multi-GPU runs need no change: ``accelerate launch --num_processes N -m mit.cli train ...``; several CPU processes
(gloo): ``torchrun --nproc_per_node N -m mit.cli train ...``. Each process takes its shard of a per-epoch permutation
seeded by ``seed + epoch``; gradients are averaged by DDP. Sharded runs (FSDP2, DeepSpeed ZeRO-3; what changes for
them is in :mod:`mit.tuning.distributed`): docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
from typing import Any

import numpy as np
import torch

from ..utils.files import atomic_write_text, unique_suffix
from . import distributed
from .build import build_encoder, build_model, resolve_config
from .checkpoints import (
    CHECKPOINT_WEIGHTS,
    Checkpoint,
    CheckpointStore,
    checkpoint_dir,
    read_config,
    read_counters,
    set_rng_state,
)
from .config import RunConfig, resume_safe_flags
from .errors import CheckpointError, RunDirectoryError, RunOutputError, TrainingDiverged
from .loaders import build_datasets, epoch_batches, make_loader, shard
from .optim import paper_optimizer
from .run_dir import RUN_LOCK, RunDirectory
from .signals import Terminated, die_of_sigterm, sigterm_raises
from .tasks import batch_to, check_llm_path, resolve_dtype


def _warn(message: str) -> None:
    print(f"mit: warning: {message}", file=sys.stderr, flush=True)


class Trainer:
    """Builds the task model and data of a :class:`RunConfig` and trains / evaluates it.

    ``Trainer(config).train()`` runs to ``epochs`` (or ``max_steps`` optimizer steps, then stops with a checkpoint);
    with ``config.run.resume`` it continues from the latest readable checkpoint of ``out``. ``evaluate()`` returns the
    metrics of the evaluation split."""

    def __init__(self, config: RunConfig, accelerator=None, build_train_data: bool = True) -> None:
        if not isinstance(config, RunConfig):
            raise ValueError(f"config: expected a RunConfig, got {type(config).__name__}")
        self.spec = config.spec
        if accelerator is None:
            accelerator = distributed.make_accelerator(
                config.optim.precision, config.run.report_to, str(pathlib.Path(config.run.out) / "trackers")
            )
        else:
            distributed.enable_cpu_fsdp(accelerator)
            distributed.check_supported(accelerator)
        self.accelerator = accelerator
        self.out = pathlib.Path(config.run.out)
        # a training run holds the directory's lock from here to the end of train(), before anything is read or
        # written there (evaluation only reads checkpoints: no lock)
        self.run_dir = RunDirectory(self.out, lock=build_train_data and self.is_main)
        self.store = CheckpointStore(self.out)
        self._temp_token: str | None = None
        self.run_dir.acquire()
        try:
            self._build(config, build_train_data)
        except BaseException:
            self.run_dir.release(remove_created=True)  # nothing was written: a directory the lock created goes
            raise

    def _build(self, config: RunConfig, build_train_data: bool) -> None:
        """The model, the data, the optimizer and the resumed state (under the run's lock)."""
        from accelerate.utils import set_seed

        resume = build_train_data and config.run.resume
        if build_train_data and not resume and (self.out / "checkpoints" / "latest").exists():
            raise RunDirectoryError(
                f"out: {self.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        check_llm_path(config.llm.model)
        set_seed(config.optim.seed)
        dtype = resolve_dtype(config.llm.model_dtype, config.optim.mixed_precision)
        encoder = build_encoder(config.encoder, dtype) if self.spec.uses_image_encoder else None
        self.config = config = resolve_config(config, encoder)
        # a resumed run must be the same run: checked before the (long) model load and before anything is written
        resume_from = self._find_checkpoint() if resume else None
        train_split, eval_split = config.splits()
        splits = (train_split, eval_split) if build_train_data else (eval_split,)
        datasets = build_datasets(config, encoder.preprocessing if encoder is not None else None, splits)
        self.train_dataset = datasets[0] if build_train_data else None
        self.eval_dataset = datasets[-1]
        built = build_model(config, self.spec, dtype, encoder, self.eval_dataset)  # after the data: its errors first
        self.tokenizer, self.collate = built.tokenizer, built.collate
        self.parameters = [p for p in built.model.parameters() if p.requires_grad]
        optimizer, self.scheduler = paper_optimizer(self.parameters, config.optim)
        self.model, self.optimizer = self.accelerator.prepare(built.model, optimizer)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # micro-batches consumed in the current epoch
        self.global_step = 0  # optimizer steps
        self.loss_rows: list[dict[str, Any]] = []
        self.metric_rows: list[dict[str, Any]] = []
        self._epoch_losses: list[float] = []
        if resume_from is not None:
            self._apply(resume_from)

    # -------------------------------------------------------------------------------------------- helpers

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def close(self) -> None:
        """Release the lock of ``out`` (``train()`` does at its end; a Trainer that is never trained holds it until it
        is closed or garbage-collected). The Trainer stays usable: ``train()`` locks again."""
        self.run_dir.release()

    def _train_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of ``epoch`` (:func:`mit.tuning.loaders.epoch_batches`)."""
        return epoch_batches(
            self.train_dataset,
            self.config.optim.seed,
            epoch,
            self.config.optim.batch_size,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            self.spec.order,
        )

    def _loader(self, dataset, batches: list[list[int]]):
        return make_loader(dataset, batches, self.collate, self.config.optim.seed, self.config.run.num_workers)

    def _write_logs(self) -> None:
        if self.is_main:
            self.run_dir.write_logs(self.loss_rows, self.metric_rows, self.store)

    # ------------------------------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train until ``epochs`` (or ``max_steps``); returns the last evaluation's metrics (empty if none ran).

        Holds the lock of ``out`` until it returns. Raises :class:`TrainingDiverged` (after nothing was saved) when the
        loss or a parameter is not finite, :class:`RunOutputError` when an output cannot be written (the previous
        checkpoint stays usable). SIGTERM (default action only, main thread) removes the incomplete checkpoint and
        releases the lock, then ends the process as SIGTERM would."""
        if self.train_dataset is None:
            raise ValueError("this Trainer was built without training data (build_train_data=False)")
        self.run_dir.acquire()
        try:
            with sigterm_raises():
                return self._train()
        except Terminated:
            self.close()
            if self.is_main:
                _warn(f"terminated by SIGTERM; {self.store.last_checkpoint_text()}")
            die_of_sigterm()
            raise  # not reached
        finally:
            self.close()

    def _train(self) -> dict[str, float]:
        config = self.config
        if self.is_main:
            self.store.remove_stale_temporaries()
            with self.store.writing(str(self.out / "config.json")):
                atomic_write_text(self.out / "config.json", json.dumps(config.to_dict(), indent=2))
        last_metrics: dict[str, float] = {}
        epochs = config.optim.epochs
        progress = self._progress_bar() if config.run.progress and self.is_main else None
        tracking = config.run.report_to != "none"
        if tracking:  # accelerate's trackers log on the main process; a resumed run continues at its step
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_flat().items()}
            self.accelerator.init_trackers(f"mit-{config.task}", config=flat)
        try:
            while self.epoch < epochs:
                batches = self._train_batches(self.epoch)
                if self.step_in_epoch == 0:
                    self._epoch_losses = []
                if self._train_epoch(batches, progress):
                    return last_metrics  # max_steps reached
                # end of epoch: LR decay, evaluation, checkpoint
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                row: dict[str, Any] = {
                    "epoch": self.epoch + 1,
                    "global_step": self.global_step,
                    "lr": lr,
                    "train_loss": float(np.mean(self._epoch_losses)) if self._epoch_losses else math.nan,
                }
                if (self.epoch + 1) % config.run.eval_every == 0 or self.epoch + 1 == epochs:
                    last_metrics = self.evaluate()
                    row.update({"eval_" + k if k == "loss" else k: v for k, v in last_metrics.items()})
                self.metric_rows.append(row)
                self._report_epoch(row, epochs, progress)
                self.epoch += 1
                self.step_in_epoch = 0
                self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            if tracking:
                self.accelerator.end_training()
        return last_metrics

    def _report_epoch(self, row: dict[str, Any], epochs: int, progress) -> None:
        """An epoch's one console line (stderr, main process, unless ``--no-progress``: beside the progress bar, also
        in a log file) and its
        metrics to the trackers (``train/epoch_loss``, ``eval/<metric>``, at the epoch's last optimizer step)."""
        if self.config.run.report_to != "none":
            values = {"train/epoch_loss": row["train_loss"], "train/lr": row["lr"]}
            values.update({f"eval/{k.removeprefix('eval_')}": v for k, v in row.items()
                           if k not in ("epoch", "global_step", "lr", "train_loss")})  # fmt: skip
            self.accelerator.log(values, step=row["global_step"])
        if not self.is_main or not self.config.run.progress:
            return
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k not in ("epoch", "global_step", "lr"))  # fmt: skip
        line = f"mit: epoch {row['epoch']}/{epochs} (step {row['global_step']}, lr {row['lr']:.2e}): {shown}"
        if progress is not None:
            progress.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _progress_bar(self):
        from ..utils.progress import progress_bar

        per_epoch = len(self._train_batches(0))
        return progress_bar(
            total=per_epoch * self.config.optim.epochs,
            initial=self.epoch * per_epoch + self.step_in_epoch,
            desc=f"mit {self.config.task}",
            dynamic_ncols=True,
        )

    def _diverged(self, what: str) -> TrainingDiverged:
        latest = self.store.latest_name()
        kept = f"the last good checkpoint is {self.out / 'checkpoints' / latest}" if latest else "no checkpoint yet"
        return TrainingDiverged(
            f"{what} at optimizer step {self.global_step + 1} (epoch {self.epoch + 1}); stopped without saving, "
            f"{kept} (a lower --lr or --max-grad-norm may help)"
        )

    def _count_nonfinite_parameters(self) -> int:
        """Trainable parameter tensors (this process's shards, summed over processes) holding a NaN or Inf; the same
        number on every process, so that all of them stop together."""
        flags = [
            (~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()).to(self.accelerator.device)
            for p in self.unwrapped.parameters()  # DTensor shards under FSDP2
            if p.requires_grad
        ]
        local = torch.stack(flags).sum() if flags else torch.zeros((), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, "sum")
        return int(local.item())  # one device sync per step

    def _train_epoch(self, batches: list[list[int]], progress) -> bool:
        """Train on the rest of this epoch's micro-batches; True if ``max_steps`` stopped the run."""
        config, accelerator = self.config, self.accelerator
        grad_accum, max_steps = config.optim.grad_accum, config.run.max_steps
        self.model.train()
        n = len(batches)
        start = self.step_in_epoch
        group_losses: list[float] = []
        for index, batch in enumerate(self._loader(self.train_dataset, batches[start:]), start=start):
            group_start = index - index % grad_accum
            group_size = min(grad_accum, n - group_start)
            last_in_group = index == group_start + group_size - 1
            batch = batch_to(batch, accelerator.device)
            sync = contextlib.nullcontext() if last_in_group else accelerator.no_sync(self.model)
            with sync:
                loss = self.model(batch)["loss"]
                accelerator.backward(loss / group_size)
            value = accelerator.reduce(loss.detach().float(), "mean").item()
            if not math.isfinite(value):
                raise self._diverged(f"the training loss is {value}")
            group_losses.append(value)
            self.step_in_epoch = index + 1
            if progress is not None:
                progress.update(1)
            if not last_in_group:
                continue
            if config.optim.max_grad_norm is not None:  # all parameters (frozen ones have no gradient): FSDP's clipping
                accelerator.clip_grad_norm_(self.model.parameters(), config.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            bad = self._count_nonfinite_parameters()
            if bad:
                raise self._diverged(f"the update made {bad} trainable parameter tensors non-finite")
            self.global_step += 1
            loss_value = float(np.mean(group_losses))
            group_losses = []
            self._epoch_losses.append(loss_value)
            lr = self.optimizer.param_groups[0]["lr"]
            self.loss_rows.append({"global_step": self.global_step, "epoch": self.epoch, "loss": loss_value, "lr": lr})
            if config.run.report_to != "none":
                accelerator.log({"train/loss": loss_value, "train/lr": lr}, step=self.global_step)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            stop = max_steps is not None and self.global_step >= max_steps
            every = config.run.checkpoint_every
            if stop or (every and self.global_step % every == 0):
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
        indices = shard(list(range(len(dataset))), accelerator.process_index, accelerator.num_processes, pad=False)
        size = self.config.run.eval_batch_size or self.config.optim.batch_size
        records: list[Any] = []
        loss_sum, count = 0.0, 0
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        real = len(batches)
        batches = distributed.pad_batches(accelerator, batches)  # sharded: as many forwards on every process
        for i, batch in enumerate(self._loader(dataset, batches)):
            batch = batch_to(batch, accelerator.device)
            out = self.model(batch)
            if i >= real:
                continue  # a padding forward: its outputs are not counted
            records += self.spec.records(batch, out)
            loss_sum += float(out["loss"]) * len(batch["id"])
            count += len(batch["id"])
        from accelerate.utils import gather_object

        if accelerator.num_processes > 1:
            records = gather_object(records)
            totals = gather_object([(loss_sum, count)])
            loss_sum, count = sum(t[0] for t in totals), sum(t[1] for t in totals)
        if not records:
            raise ValueError("no evaluation records (is the evaluation split empty?)")
        metrics = {"loss": loss_sum / max(count, 1), **self.spec.metrics(records)}
        if was_training:
            self.model.train()
        return metrics

    # --------------------------------------------------------------------------------------- checkpoints

    def _checkpoint_temp_token(self) -> str:
        """``<pid>-<random>`` of the main process, the same on every process (the temporary checkpoint directory is
        shared); drawn once per Trainer, from the OS (the seeded RNGs are not touched)."""
        if self._temp_token is None:
            token = [unique_suffix()]
            if self.accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(token, from_process=0)
            self._temp_token = token[0]
        return self._temp_token

    def save_checkpoint(self) -> pathlib.Path:
        """Write ``checkpoints/step-N`` atomically (:meth:`CheckpointStore.save`) and the logs; the previous
        checkpoint stays the latest on any failure (an OSError becomes :class:`RunOutputError`)."""
        state = {
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_losses": list(self._epoch_losses),
            "loss_rows": self.loss_rows,
            "metric_rows": self.metric_rows,
        }
        final = self.store.save(
            self.accelerator,
            self.model,
            self.optimizer,
            f"step-{self.global_step:07d}",
            self._checkpoint_temp_token(),
            state,
            self.config.to_dict(),
            self.config.run.keep_checkpoints,
        )
        self._write_logs()
        self.accelerator.wait_for_everyone()
        return final

    def _find_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint of ``out``, checked against this run's configuration; None for a fresh
        start."""
        checkpoint = self.store.find(self.accelerator.process_index, self.accelerator.num_processes)
        if checkpoint is not None:
            conflicts = self.config.resume_conflicts(checkpoint.config)
            if conflicts:
                listed = ", ".join(f"{flag} ({old!r} -> {new!r})" for flag, old, new in conflicts)
                raise ValueError(
                    f"resume: the settings differ from those of {checkpoint.directory}: {listed}; only "
                    f"{', '.join(resume_safe_flags())} may change when resuming (or start a new run in another --out)"
                )
        return checkpoint

    def _apply(self, checkpoint: Checkpoint) -> None:
        weights = checkpoint.directory / CHECKPOINT_WEIGHTS
        # names and full shapes checked before anything is copied; then each process keeps its shard (FSDP, ZeRO-3)
        distributed.load_trainable(self.accelerator, self.model, checkpoint.tensors, source=str(weights))
        state = checkpoint.state
        if state is None:
            return
        distributed.load_optimizer_state(
            self.accelerator, self.model, self.optimizer, state["optimizer"], checkpoint.directory
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self._epoch_losses = list(state["epoch_losses"])
        self.loss_rows, self.metric_rows = list(state["loss_rows"]), list(state["metric_rows"])
        set_rng_state(checkpoint.rng)
        self._write_logs()

    def load_checkpoint(self, directory: str | os.PathLike, weights_only: bool = False) -> None:
        """Restore a checkpoint: trainable parameters, and (unless ``weights_only``) optimizer, scheduler, counters,
        logs and RNG states. Everything is read and checked before anything is changed."""
        accelerator = self.accelerator
        self._apply(
            CheckpointStore.read(
                pathlib.Path(directory), not weights_only, accelerator.process_index, accelerator.num_processes
            )
        )


def evaluate_checkpoint(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None, *, provenance: bool = False
) -> dict[str, Any]:
    """Rebuild the run of a checkpoint (its config.json, with ``overrides`` given by flag name), load its weights,
    evaluate. Returns the metrics; with ``provenance``, first what was evaluated: ``checkpoint`` (the directory, the
    run's latest one when ``path`` is a run directory), ``global_step`` and ``epoch`` it was saved at, ``task``,
    ``dataset``, ``split`` and ``samples`` (the number evaluated)."""
    directory = checkpoint_dir(path)
    config = read_config(directory).replace(**{**(overrides or {}), "resume": False})
    trainer = Trainer(config, build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    metrics = trainer.evaluate()
    if not provenance:
        return metrics
    counters = read_counters(directory)
    described = {"checkpoint": str(directory.resolve()), "global_step": counters["global_step"],
                 "epoch": counters["epoch"], "task": config.task, "dataset": config.data.dataset,
                 "split": config.splits()[1], "samples": len(trainer.eval_dataset)}  # fmt: skip
    return {**described, **metrics}


__all__ = [
    "RUN_LOCK",
    "CheckpointError",
    "RunConfig",
    "RunDirectoryError",
    "RunOutputError",
    "Trainer",
    "TrainingDiverged",
    "checkpoint_dir",
    "evaluate_checkpoint",
]
