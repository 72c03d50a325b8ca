"""The errors a training run raises, shared by the trainer's parts (one place: no part imports the trainer)."""

from __future__ import annotations


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


__all__ = ["CheckpointError", "RunDirectoryError", "RunOutputError", "TrainingDiverged"]
