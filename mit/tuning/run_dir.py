"""The run directory's lock and logs: a training run locks ``out`` (``.mit-run.lock``, an OS lock released when the
process ends, even by a crash) before it reads or writes anything there, checks that it can write there, and keeps
``loss.csv`` / ``metrics.csv`` current with atomic writes."""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Any

from ..utils.files import (
    ATOMIC_TEMP_MARK,
    DirectoryInUse,
    DirectoryLock,
    atomic_write_text,
    os_error_text,
    unique_suffix,
)
from ..utils.results import csv_text
from .checkpoints import CheckpointStore
from .errors import RunDirectoryError

RUN_LOCK = ".mit-run.lock"  # the lock file of a run directory


class RunDirectory:
    """The directory ``out`` of a training run. With ``lock`` (the main process of a training run) :meth:`acquire`
    takes its lock; otherwise locking does nothing (evaluation only reads checkpoints)."""

    def __init__(self, out: pathlib.Path, lock: bool) -> None:
        self.out = pathlib.Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise RunDirectoryError(f"out: {self.out} is an existing file; expected a run directory (new or to resume)")
        self._lock = DirectoryLock(self.out, RUN_LOCK) if lock else None

    def acquire(self) -> None:
        """Lock ``out`` (creating it) and check that it is writable; RunDirectoryError when another run holds it or
        it cannot be written. Nothing when this process does not lock or already holds the lock."""
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

    def release(self, remove_created: bool = False) -> None:
        """Release the lock (if held); ``remove_created``: also remove the directory if the lock created it and
        nothing else was written."""
        if self._lock is not None:
            self._lock.release(remove_created=remove_created)

    def _unwritable(self, error: OSError) -> str:
        where = f" ({error.filename})" if error.filename and pathlib.Path(error.filename) != self.out else ""
        return f"out: cannot write to {self.out}: {os_error_text(error)}{where}; expected a writable run directory"

    def write_logs(self, loss_rows: list[dict[str, Any]], metric_rows: list[dict[str, Any]], store: CheckpointStore):
        """``loss.csv`` and ``metrics.csv``, each replaced atomically (a failure: RunOutputError naming the last
        complete checkpoint of ``store``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("loss.csv", loss_rows), ("metrics.csv", metric_rows)):
            with store.writing(str(self.out / name)):
                atomic_write_text(self.out / name, csv_text(rows))


__all__ = ["RUN_LOCK", "RunDirectory"]
