"""Training and evaluation on accelerate: the paper's schedule, exact resume, atomic trainable-only checkpoints.

Defaults follow the paper (Sec. 3.3): Adam, lr 4e-5, x0.1 every 10 epochs, 30 epochs, batch 8 per device, bf16 on
GPUs. Everything is a field of :class:`~mit.tuning.config.RunConfig`; what is task-specific comes from the task's
:class:`~mit.tuning.tasks.TaskSpec`.

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
import dataclasses
import errno
import io
import json
import math
import os
import pathlib
import random
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize_tensors
from torch.utils.data import DataLoader

from ..neural import TASK_TOKENS
from ..utils.files import (
    ATOMIC_TEMP_MARK,
    DirectoryInUse,
    DirectoryLock,
    atomic_write_text,
    os_error_text,
    unique_suffix,
    write_bytes,
)
from ..utils.results import csv_text
from . import distributed
from .config import RunConfig
from .tasks import (
    batch_to,
    build_task_model,
    check_llm_path,
    load_llm,
    make_collate,
    resolve_dtype,
)

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"
TEMP_PREFIX = ".tmp-"
RUN_LOCK = ".mit-run.lock"  # the lock file of a run directory


class TrainingDiverged(RuntimeError):
    """The loss (or a trainable parameter) became NaN or infinite; the run stopped without saving."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


class RunDirectoryError(ValueError):
    """``out`` cannot hold this run: an existing file, in use by another run, or not writable. Raised before the run
    reads or writes anything in it."""


class RunOutputError(RuntimeError):
    """Writing an output of a started run (config.json, a checkpoint, loss.csv, metrics.csv) failed, e.g. on a full
    disk. The message names the path, the operating system's reason and the last complete checkpoint, which stays
    usable (``--resume`` continues from it); the incomplete checkpoint was removed. ``__cause__`` is the OSError."""


class _Terminated(BaseException):
    """SIGTERM arrived during :meth:`Trainer.train` (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`_Terminated` in the main thread, so that ``finally`` blocks run (the
    incomplete checkpoint is removed). Only when SIGTERM has its default action and this is the main thread (where
    Python runs signal handlers); otherwise nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _die_of_sigterm() -> None:
    """End the process as SIGTERM's default action would (the parent sees "killed by SIGTERM")."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM)  # not reached: the signal is delivered before kill() returns


def _save_torch(obj: Any, path: pathlib.Path) -> None:
    """torch.save, serialised in memory and written by Python: a failed write is an OSError with its errno (torch's
    own file writer reports a full disk as an unrelated RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


# ----------------------------------------------------------------------------------------------------------- data


def build_datasets(config: RunConfig, image_size: int | None, splits: tuple[str, ...]) -> list:
    """The datasets of ``splits``; with two splits the first one is the training split (``limit_train``)."""
    dataset = config.spec.dataset(config.data.dataset)
    out = []
    for i, split in enumerate(splits):
        limit = config.data.limit_train if i == 0 and len(splits) == 2 else config.data.limit_eval
        out.append(dataset.build(config.data, split, image_size, limit))
    return out


def _shard(indices: list[int], rank: int, world: int, pad: bool) -> list[int]:
    if pad and len(indices) % world:
        indices = indices + indices[: world - len(indices) % world]
    return indices[rank::world]


def _rng_state() -> dict[str, Any]:
    """Every RNG's state in types ``torch.load(weights_only=True)`` reads back (tensors, lists, numbers, str)."""
    python = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the global RNG others may use)
    state = {
        "python": [python[0], list(python[1]), python[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    """transformers' weight-loading progress bar off while ``quiet`` (``--no-progress``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _warn(message: str) -> None:
    print(f"mit: warning: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Checkpoint:
    """A checkpoint read completely into memory and checked, before anything of it is applied."""

    directory: pathlib.Path
    config: RunConfig | None
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any] | None
    rng: dict[str, Any] | None


def read_config(directory: pathlib.Path) -> RunConfig:
    """The RunConfig a checkpoint (or run directory) was written with."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: missing config.json")
    try:
        return RunConfig.from_json(path.read_text(), str(path))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


# ------------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds the task model and data of a :class:`RunConfig` and trains / evaluates it.

    ``Trainer(config).train()`` runs to ``epochs`` (or ``max_steps`` optimizer steps, then stops with a checkpoint);
    with ``config.run.resume`` it continues from the latest readable checkpoint of ``out``. ``evaluate()`` returns the
    metrics of the evaluation split."""

    def __init__(self, config: RunConfig, accelerator=None, build_train_data: bool = True) -> None:
        from accelerate import Accelerator

        if not isinstance(config, RunConfig):
            raise ValueError(f"config: expected a RunConfig, got {type(config).__name__}")
        self.spec = config.spec
        # several processes without GPUs (torchrun / accelerate launch on CPU): accelerate needs cpu=True for gloo
        world = int(os.environ.get("WORLD_SIZE", "1"))
        multi_cpu = not torch.cuda.is_available() and world > 1
        if accelerator is None and world == 1:
            from accelerate.state import AcceleratorState

            # accelerate keeps one global state per process; a second Trainer in the same process (tests, notebooks)
            # may ask for another precision
            AcceleratorState._reset_state()
        self.accelerator = accelerator or Accelerator(mixed_precision=config.optim.precision, cpu=multi_cpu)
        distributed.enable_cpu_fsdp(self.accelerator)  # ACCELERATE_USE_FSDP on CPU processes (accelerate: DDP)
        distributed.check_supported(self.accelerator)
        self.out = pathlib.Path(config.run.out)
        if self.out.exists() and not self.out.is_dir():
            raise RunDirectoryError(f"out: {self.out} is an existing file; expected a run directory (new or to resume)")
        # a training run holds the directory's lock from here to the end of train(): before anything is read or
        # written there (evaluation only reads checkpoints: no lock)
        self._lock = DirectoryLock(self.out, RUN_LOCK) if build_train_data and self.is_main else None
        self._temp_token: str | None = None
        self._acquire_run_lock()
        try:
            self._build(config, build_train_data)
        except BaseException:
            if self._lock is not None:  # nothing was written: a directory the lock created goes with it
                self._lock.release(remove_created=True)
            raise

    def _build(self, config: RunConfig, build_train_data: bool) -> None:
        """The rest of ``__init__``, under the run's lock: the model, the data, the optimizer, the resumed state."""
        from accelerate.utils import set_seed

        resume = build_train_data and config.run.resume
        if build_train_data and not resume and (self.out / "checkpoints" / "latest").exists():
            raise RunDirectoryError(
                f"out: {self.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        check_llm_path(config.llm.model)
        set_seed(config.optim.seed)
        dtype = resolve_dtype(config.llm.model_dtype, config.optim.mixed_precision)
        encoder = None
        image_size = None
        if self.spec.uses_image_encoder:
            from .encoders import CLIPImageEncoder

            settings = config.encoder
            encoder = CLIPImageEncoder(
                settings.encoder,
                settings.encoder_pretrained,
                settings.feature_layers,
                settings.encoder_backend,
                settings.quick_gelu,
            )
            encoder.to(dtype)
            image_size = settings.image_size or encoder.image_size
            if image_size != encoder.image_size:
                raise ValueError(
                    f"image_size: expected the CLIP model's input size {encoder.image_size}, got {image_size}"
                )
            if self.spec.method == "neural":
                # the image tokens are CLIP's patch tokens: their width is the encoder's, whatever --image-dim says
                config = config.replace(image_dim=encoder.width)
            else:
                # the infused embedding is CLIP's: its size is the encoder's, whatever --modality-dim says
                config = config.replace(modality_dim=encoder.embed_dim)
        if self.spec.method == "neural" and not config.neural.new_tokens:
            config = config.replace(new_tokens=list(TASK_TOKENS))
        self.config = config
        # a resumed run must be the same run: checked before the (long) model load and before anything is written
        self._resume_from = self._find_checkpoint() if resume else None
        train_split, eval_split = config.splits()
        splits = (train_split, eval_split) if build_train_data else (eval_split,)
        datasets = build_datasets(config, image_size, splits)
        self.train_dataset = datasets[0] if build_train_data else None
        self.eval_dataset = datasets[-1]
        with _quiet_loading(not config.run.progress):
            # after the data: its errors come first
            llm, self.tokenizer = load_llm(config.llm.model, dtype, causal_lm=self.spec.causal_lm)
        self.model = build_task_model(
            self.spec,
            llm,
            config.neural if self.spec.method == "neural" else config.mit,
            encoder=encoder,
            dataset=self.eval_dataset,
            heads=config.heads,
            tokenizer=self.tokenizer,
        )
        self.collate = make_collate(self.spec, self.tokenizer, config.llm.padding_side, config.llm.max_length)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        optim = config.optim
        self.optimizer = torch.optim.Adam(self.parameters, lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=optim.lr_step, gamma=optim.lr_gamma)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # micro-batches consumed in the current epoch
        self.global_step = 0  # optimizer steps
        self.loss_rows: list[dict[str, Any]] = []
        self.metric_rows: list[dict[str, Any]] = []
        self._epoch_losses: list[float] = []
        if self._resume_from is not None:
            self._apply(self._resume_from)
            self._resume_from = None

    # ------------------------------------------------------------------------------------- run directory

    def _acquire_run_lock(self) -> None:
        """Lock ``out`` (creating it) and check that it is writable; RunDirectoryError when another run holds it or it
        cannot be written. Nothing when this process does not lock (evaluation, processes other than the main one) or
        already holds the lock."""
        if self._lock is None or self._lock.held:
            return
        try:
            self._lock.acquire()
        except DirectoryInUse as error:
            if error.holder_pid == os.getpid():
                who = "another Trainer of this process (let its train() finish or call its close())"
            else:
                who = f"another run ({error.holder or 'holder unknown'})"
            raise RunDirectoryError(
                f"out: {self.out} is in use by {who}, which holds {error.lock_file}; wait for it to end or choose "
                "another --out"
            ) from None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise RunDirectoryError(
                    f"out: cannot lock {self._lock.path}: {os_error_text(error)}; expected a run directory on a file "
                    "system that supports file locks (flock)"
                ) from None
            raise RunDirectoryError(self._unwritable(error)) from None
        probe = self.out / f".mit-write-probe{ATOMIC_TEMP_MARK}{unique_suffix()}"
        try:  # the lock file may predate a change of permissions (or a remount read-only): try a new file
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            probe.unlink()
        except OSError as error:
            self._lock.release(remove_created=True)
            raise RunDirectoryError(self._unwritable(error)) from None

    def _unwritable(self, error: OSError) -> str:
        where = f" ({error.filename})" if error.filename and pathlib.Path(error.filename) != self.out else ""
        return f"out: cannot write to {self.out}: {os_error_text(error)}{where}; expected a writable run directory"

    def close(self) -> None:
        """Release the lock of ``out`` (``train()`` does at its end; a Trainer that is never trained holds it until it
        is closed or garbage-collected). The Trainer stays usable: ``train()`` locks again."""
        if self._lock is not None:
            self._lock.release()

    def _last_checkpoint_text(self, failed: str | None = None) -> str:
        """Where ``--resume`` would continue from; ``failed``: the name of a checkpoint whose save just failed (the
        end of an epoch saves the step of its last optimizer step again)."""
        latest = self._latest_name()
        if not latest:
            return "no checkpoint was written yet"
        again = ", saved before at the same step" if latest == failed else ""
        path = self.out / "checkpoints" / latest
        return f"the last complete checkpoint is {path}{again} (--resume continues from it)"

    @contextlib.contextmanager
    def _writing(self, what: str, checkpoint: str | None = None) -> Iterator[None]:
        """An OSError inside becomes a RunOutputError: "cannot write <what>: <reason>; the last complete checkpoint
        is ..." (``checkpoint``: the name of the checkpoint being written, if one is)."""
        try:
            yield
        except OSError as error:
            raise RunOutputError(
                f"cannot write {what}: {os_error_text(error)}; {self._last_checkpoint_text(checkpoint)}"
            ) from error

    # -------------------------------------------------------------------------------------------- helpers

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _train_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of ``epoch``: a permutation seeded by ``seed + epoch``, sharded by rank."""
        generator = torch.Generator().manual_seed(self.config.optim.seed + epoch)
        order = torch.randperm(len(self.train_dataset), generator=generator).tolist()
        mine = _shard(order, self.accelerator.process_index, self.accelerator.num_processes, pad=True)
        if self.spec.order is not None:  # e.g. tasks mixed equally in every batch
            mine = self.spec.order(self.train_dataset, mine)
        size = self.config.optim.batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def _loader(self, dataset, batches: list[list[int]]) -> DataLoader:
        # an own generator: creating the iterator would otherwise draw a seed from the global RNG, which must stay
        # where a checkpoint left it for an exact resume
        generator = torch.Generator().manual_seed(self.config.optim.seed)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.config.run.num_workers,
            generator=generator,
        )

    def _write_logs(self) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with self._writing(str(self.out / "loss.csv")):
                atomic_write_text(self.out / "loss.csv", csv_text(self.loss_rows))
            with self._writing(str(self.out / "metrics.csv")):
                atomic_write_text(self.out / "metrics.csv", csv_text(self.metric_rows))

    def _latest_name(self) -> str | None:
        latest = self.out / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    # ------------------------------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train until ``epochs`` (or ``max_steps``); returns the last evaluation's metrics (empty if none ran).

        Holds the lock of ``out`` until it returns. Raises :class:`TrainingDiverged` (after nothing was saved) when the
        loss or a parameter is not finite, :class:`RunOutputError` when an output cannot be written (the previous
        checkpoint stays usable). SIGTERM (default action only, main thread) removes the incomplete checkpoint and
        releases the lock, then ends the process as SIGTERM would."""
        if self.train_dataset is None:
            raise ValueError("this Trainer was built without training data (build_train_data=False)")
        self._acquire_run_lock()
        try:
            with _sigterm_raises():
                return self._train()
        except _Terminated:
            self.close()
            if self.is_main:
                _warn(f"terminated by SIGTERM; {self._last_checkpoint_text()}")
            _die_of_sigterm()
            raise  # not reached
        finally:
            self.close()

    def _train(self) -> dict[str, float]:
        config = self.config
        if self.is_main:
            self._remove_stale_temporaries()
            with self._writing(str(self.out / "config.json")):
                atomic_write_text(self.out / "config.json", json.dumps(config.to_dict(), indent=2))
        last_metrics: dict[str, float] = {}
        progress = None
        epochs = config.optim.epochs
        if config.run.progress and self.is_main:
            from tqdm.auto import tqdm

            per_epoch = len(self._train_batches(0))
            progress = tqdm(
                total=per_epoch * epochs,
                initial=self.epoch * per_epoch + self.step_in_epoch,
                desc=f"mit {config.task}",
                dynamic_ncols=True,
            )
        try:
            while self.epoch < epochs:
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
                if (self.epoch + 1) % config.run.eval_every == 0 or self.epoch + 1 == epochs:
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

    def _diverged(self, what: str) -> TrainingDiverged:
        latest = self._latest_name()
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
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
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
        indices = _shard(list(range(len(dataset))), accelerator.process_index, accelerator.num_processes, pad=False)
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

    def _remove_stale_temporaries(self) -> None:
        """Remove what killed runs left: temporary checkpoint directories and temporary files of atomic writes. Only
        the holder of the run's lock calls this, so none of them belongs to a live run."""
        root = self.out / "checkpoints"
        if root.is_dir():
            for stale in root.iterdir():
                if stale.is_dir() and stale.name.startswith(TEMP_PREFIX):
                    _warn(f"removing {stale}, an incomplete checkpoint of an interrupted run")
                    shutil.rmtree(stale, ignore_errors=True)
        for directory in (self.out, root):
            if directory.is_dir():
                for stale in directory.glob(f".*{ATOMIC_TEMP_MARK}*"):
                    if stale.is_file():
                        stale.unlink(missing_ok=True)

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
        """Write ``checkpoints/step-N`` atomically (a temporary directory unique to this run, renamed when complete)
        and point ``latest`` at it. On any failure or interrupt the temporary directory is removed and the previous
        checkpoint stays the latest; an OSError (a full disk) becomes :class:`RunOutputError`."""
        accelerator = self.accelerator
        root = self.out / "checkpoints"
        name = f"step-{self.global_step:07d}"
        tmp = root / f"{TEMP_PREFIX}{name}.{self._checkpoint_temp_token()}"
        final = root / name
        try:
            with self._writing(f"checkpoint to {final}", checkpoint=name):
                if self.is_main:
                    root.mkdir(parents=True, exist_ok=True)
                    tmp.mkdir()
                accelerator.wait_for_everyone()
                _save_torch(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
                # full trainable tensors and optimizer state (collectives under FSDP / DeepSpeed: every process calls
                # them)
                weights = distributed.trainable_state_dict_full(accelerator, self.model)
                optimizer_state = distributed.optimizer_state(accelerator, self.model, self.optimizer, tmp)
                if self.is_main:
                    write_bytes(tmp / CHECKPOINT_WEIGHTS, serialize_tensors(weights, metadata={"format": "pt"}))
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
                    _save_torch(state, tmp / CHECKPOINT_STATE)
                    write_bytes(tmp / "config.json", json.dumps(self.config.to_dict(), indent=2).encode())
                accelerator.wait_for_everyone()
                if self.is_main:
                    if final.exists():
                        shutil.rmtree(final)
                    os.rename(tmp, final)
                    atomic_write_text(root / "latest", name)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.is_main:
            kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
            for old in kept[: -self.config.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)  # an old one left behind is harmless
            self._write_logs()
        accelerator.wait_for_everyone()
        return final

    def _candidates(self) -> list[pathlib.Path]:
        """The run's complete checkpoints, the one ``latest`` names first, then the others, newest first."""
        root = self.out / "checkpoints"
        if not root.is_dir():
            return []
        steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)
        latest = self._latest_name()
        first = [root / latest] if latest and (root / latest).is_dir() else []
        return first + [p for p in steps if p not in first]

    def _find_checkpoint(self) -> _Checkpoint | None:
        """The newest checkpoint that reads completely, checked against this run's configuration; None when the run
        has none yet (a fresh start). Unreadable ones are skipped, saying so; a configuration conflict is an error."""
        candidates = self._candidates()
        if not candidates:
            if (self.out / "checkpoints" / "latest").exists():
                raise CheckpointError(f"resume: {self.out / 'checkpoints'} has no complete checkpoint to resume from")
            return None
        failures = []
        for directory in candidates:
            try:
                checkpoint = self._read(directory, full=True)
            except CheckpointError as error:
                failures.append(str(error))
                if directory != candidates[-1]:
                    _warn(f"{error}; falling back to the previous checkpoint")
                continue
            self._check_resume_config(checkpoint)
            if failures and self.is_main:
                _warn(f"resuming from {directory}")
            return checkpoint
        raise CheckpointError(f"resume: no readable checkpoint in {self.out / 'checkpoints'}: {'; '.join(failures)}")

    def _check_resume_config(self, checkpoint: _Checkpoint) -> None:
        conflicts = self.config.resume_conflicts(checkpoint.config)
        if conflicts:
            listed = ", ".join(f"{flag} ({old!r} -> {new!r})" for flag, old, new in conflicts)
            from .config import resume_safe_flags

            raise ValueError(
                f"resume: the settings differ from those of {checkpoint.directory}: {listed}; only "
                f"{', '.join(resume_safe_flags())} may change when resuming (or start a new run in another --out)"
            )

    def _read(self, directory: pathlib.Path, full: bool) -> _Checkpoint:
        """Read and check a checkpoint without applying it: weights (names and shapes against this model's trainable
        parameters happen in _apply), and with ``full`` the trainer state, this process's RNG state and the config."""
        weights = directory / CHECKPOINT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {directory}: missing {CHECKPOINT_WEIGHTS}")
        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"checkpoint {weights}: unreadable ({error})") from None
        if not full:
            return _Checkpoint(directory, None, tensors, None, None)
        config = read_config(directory)
        state_path = directory / CHECKPOINT_STATE
        rng_path = directory / f"rng_state_{self.accelerator.process_index}.pt"
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint {directory}: missing {pathlib.Path(error.filename).name}") from None
        except Exception as error:  # truncated zip, unpickling refused, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"checkpoint {directory}: unreadable trainer state ({first})") from None
        needed = {"optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "epoch_losses", "loss_rows"}
        if not isinstance(state, dict) or not needed <= set(state):
            raise CheckpointError(f"checkpoint {state_path}: expected a trainer state with {sorted(needed)}")
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"resume: checkpoint {directory} was written by {state['num_processes']} processes; resuming "
                f"exactly needs the same number, got {self.accelerator.num_processes}"
            )
        return _Checkpoint(directory, config, tensors, state, rng)

    def _apply(self, checkpoint: _Checkpoint) -> None:
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
        _set_rng_state(checkpoint.rng)
        self._write_logs()

    def load_checkpoint(self, directory: str | os.PathLike, weights_only: bool = False) -> None:
        """Restore a checkpoint: trainable parameters, and (unless ``weights_only``) optimizer, scheduler, counters,
        logs and RNG states. Everything is read and checked before anything is changed."""
        self._apply(self._read(pathlib.Path(directory), full=not weights_only))


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
    """Rebuild the run of a checkpoint (its config.json, with ``overrides`` given by flag name), load its weights,
    evaluate."""
    directory = checkpoint_dir(path)
    config = read_config(directory).replace(**{**(overrides or {}), "resume": False})
    trainer = Trainer(config, build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    return trainer.evaluate()


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
