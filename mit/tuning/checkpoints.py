"""Checkpoints of a run directory: atomic writes, the ``latest`` pointer, reading one back completely (and safely)
before anything of it is applied, and the fallback to an older complete checkpoint.

Layout::

    checkpoints/step-000120/         trainable.safetensors (trainable parameters only), trainer_state.pt
                                     (optimizer, scheduler, counters, logs), rng_state_<rank>.pt, config.json
    checkpoints/latest               name of the newest complete checkpoint
    checkpoints/.tmp-step-N.<pid>-<random>   a checkpoint being written (renamed when complete)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import random
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize_tensors

from ..utils.files import ATOMIC_TEMP_MARK, atomic_write_text, os_error_text, write_bytes
from . import distributed
from .config import RunConfig
from .errors import CheckpointError, RunOutputError

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"
TEMP_PREFIX = ".tmp-"
STATE_KEYS = ("optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "epoch_losses", "loss_rows")


def _warn(message: str) -> None:
    print(f"mit: warning: {message}", file=sys.stderr, flush=True)


def save_torch(obj: Any, path: pathlib.Path) -> None:
    """torch.save, serialised in memory and written by Python: a failed write is an OSError with its errno (torch's
    own file writer reports a full disk as an unrelated RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read completely into memory and checked, before anything of it is applied. ``config``,
    ``state`` and ``rng`` are None when only the weights were read."""

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


def read_counters(directory: pathlib.Path) -> dict[str, Any]:
    """``{"global_step", "epoch"}`` a checkpoint was saved at (its trainer state, loaded with ``weights_only=True``;
    any process count: nothing else of the state is used)."""
    path = directory / CHECKPOINT_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path}: unreadable trainer state ({error})") from None
    if not isinstance(state, dict) or not {"global_step", "epoch"} <= set(state):
        raise CheckpointError(f"checkpoint {path}: expected a trainer state with global_step and epoch")
    return {"global_step": state["global_step"], "epoch": state["epoch"]}


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


class CheckpointStore:
    """The checkpoints of the run directory ``out``: where they are, writing one atomically, reading one back."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = pathlib.Path(out)
        self.root = self.out / "checkpoints"

    def latest_name(self) -> str | None:
        latest = self.root / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def last_checkpoint_text(self, failed: str | None = None) -> str:
        """Where ``--resume`` would continue from; ``failed``: the name of a checkpoint whose save just failed (the
        end of an epoch saves the step of its last optimizer step again)."""
        latest = self.latest_name()
        if not latest:
            return "no checkpoint was written yet"
        again = ", saved before at the same step" if latest == failed else ""
        return f"the last complete checkpoint is {self.root / latest}{again} (--resume continues from it)"

    @contextlib.contextmanager
    def writing(self, what: str, checkpoint: str | None = None) -> Iterator[None]:
        """An OSError inside becomes a RunOutputError: "cannot write <what>: <reason>; the last complete checkpoint
        is ..." (``checkpoint``: the name of the checkpoint being written, if one is)."""
        try:
            yield
        except OSError as error:
            raise RunOutputError(
                f"cannot write {what}: {os_error_text(error)}; {self.last_checkpoint_text(checkpoint)}"
            ) from error

    def remove_stale_temporaries(self) -> None:
        """Remove what killed runs left: temporary checkpoint directories and temporary files of atomic writes. Only
        the holder of the run's lock calls this, so none of them belongs to a live run."""
        root = self.root
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

    def save(
        self,
        accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        name: str,
        temp_token: str,
        state: dict[str, Any],
        config: dict[str, Any],
        keep: int,
    ) -> pathlib.Path:
        """Write ``checkpoints/<name>`` atomically (the temporary directory ``.tmp-<name>.<temp_token>``, renamed when
        complete) and point ``latest`` at it; keep the newest ``keep``. ``state``: the trainer's counters, logs and
        scheduler state (the optimizer's is gathered here); ``config``: the run's configuration as a dict. Every
        process calls this (the state of sharded models is gathered by collectives). On any failure or interrupt the
        temporary directory is removed and the previous checkpoint stays the latest; an OSError (a full disk) becomes
        :class:`RunOutputError`."""
        is_main = accelerator.is_main_process
        root = self.root
        tmp = root / f"{TEMP_PREFIX}{name}.{temp_token}"
        final = root / name
        try:
            with self.writing(f"checkpoint to {final}", checkpoint=name):
                if is_main:
                    root.mkdir(parents=True, exist_ok=True)
                    tmp.mkdir()
                accelerator.wait_for_everyone()
                save_torch(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
                # full trainable tensors and optimizer state (collectives under FSDP / DeepSpeed: every process calls
                # them)
                weights = distributed.trainable_state_dict_full(accelerator, model)
                optimizer_state = distributed.optimizer_state(accelerator, model, optimizer, tmp)
                if is_main:
                    write_bytes(tmp / CHECKPOINT_WEIGHTS, serialize_tensors(weights, metadata={"format": "pt"}))
                    full_state = {"optimizer": optimizer_state, **state, "num_processes": accelerator.num_processes}
                    save_torch(full_state, tmp / CHECKPOINT_STATE)
                    write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
                accelerator.wait_for_everyone()
                if is_main:
                    if final.exists():
                        shutil.rmtree(final)
                    os.rename(tmp, final)
                    atomic_write_text(root / "latest", name)
        except BaseException:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if is_main:
            kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
            for old in kept[:-keep]:
                shutil.rmtree(old, ignore_errors=True)  # an old one left behind is harmless
        return final

    def candidates(self) -> list[pathlib.Path]:
        """The run's complete checkpoints, the one ``latest`` names first, then the others, newest first."""
        root = self.root
        if not root.is_dir():
            return []
        steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)
        latest = self.latest_name()
        first = [root / latest] if latest and (root / latest).is_dir() else []
        return first + [p for p in steps if p not in first]

    def find(self, process_index: int, num_processes: int) -> Checkpoint | None:
        """The newest checkpoint that reads completely; None when the run has none yet (a fresh start). Unreadable
        ones are skipped, saying so; CheckpointError when none reads."""
        candidates = self.candidates()
        if not candidates:
            if (self.root / "latest").exists():
                raise CheckpointError(f"resume: {self.root} has no complete checkpoint to resume from")
            return None
        failures = []
        for directory in candidates:
            try:
                checkpoint = self.read(directory, True, process_index, num_processes)
            except CheckpointError as error:
                failures.append(str(error))
                if directory != candidates[-1]:
                    _warn(f"{error}; falling back to the previous checkpoint")
                continue
            if failures and process_index == 0:
                _warn(f"resuming from {directory}")
            return checkpoint
        raise CheckpointError(f"resume: no readable checkpoint in {self.root}: {'; '.join(failures)}")

    @staticmethod
    def read(directory: pathlib.Path, full: bool, process_index: int = 0, num_processes: int = 1) -> Checkpoint:
        """Read and check a checkpoint without applying it: the weights (their names and shapes are checked against
        the model when applied), and with ``full`` the trainer state, process ``process_index``'s RNG state and the
        config. Everything is loaded with ``torch.load(weights_only=True)``."""
        weights = directory / CHECKPOINT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {directory}: missing {CHECKPOINT_WEIGHTS}")
        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types for truncated / corrupt files
            raise CheckpointError(f"checkpoint {weights}: unreadable ({error})") from None
        if not full:
            return Checkpoint(directory, None, tensors, None, None)
        config = read_config(directory)
        state_path = directory / CHECKPOINT_STATE
        rng_path = directory / f"rng_state_{process_index}.pt"
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint {directory}: missing {pathlib.Path(error.filename).name}") from None
        except Exception as error:  # truncated zip, unpickling refused, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"checkpoint {directory}: unreadable trainer state ({first})") from None
        needed = set(STATE_KEYS)
        if not isinstance(state, dict) or not needed <= set(state):
            raise CheckpointError(f"checkpoint {state_path}: expected a trainer state with {sorted(needed)}")
        if state["num_processes"] != num_processes:
            raise ValueError(
                f"resume: checkpoint {directory} was written by {state['num_processes']} processes; resuming "
                f"exactly needs the same number, got {num_processes}"
            )
        return Checkpoint(directory, config, tensors, state, rng)


__all__ = [
    "CHECKPOINT_STATE",
    "CHECKPOINT_WEIGHTS",
    "TEMP_PREFIX",
    "Checkpoint",
    "CheckpointStore",
    "checkpoint_dir",
    "read_config",
    "read_counters",
    "rng_state",
    "save_torch",
    "set_rng_state",
]
