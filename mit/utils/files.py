"""File-system helpers: atomic writes (a reader, or a run killed mid-write, sees the old file or the new one, never a
part), durable writes whose failures are plain :class:`OSError` (``errno`` set: ``ENOSPC`` for a full disk), names
unique to a process, and an advisory lock on a directory that the operating system releases when its holder dies.
"""

from __future__ import annotations

import errno
import os
import pathlib
import secrets
import socket
from collections.abc import Callable
from typing import IO

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

# what atomic_write puts between the file name and the unique suffix of its temporary files: ``.<name>.tmp-<suffix>``
ATOMIC_TEMP_MARK = ".tmp-"


def unique_suffix() -> str:
    """``<pid>-<8 random hex digits>``: distinct for every call, and for every process (even two processes with the
    same pid on two hosts sharing a file system)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def os_error_text(error: OSError) -> str:
    """The operating system's reason of ``error`` (``"No space left on device"``), without errno and path; the
    message itself when it carries no errno (an ``OSError`` raised with a text of its own)."""
    if error.errno is not None and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (fsync). A failure is an :class:`OSError` with its errno
    (a full disk is ``ENOSPC`` here, not at some later close)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` writes the content to ``tmp``, a temporary name beside ``path`` (same file system, unique to this
    call); it is then renamed over ``path``. On failure (or an interrupt) the temporary file is removed and ``path``
    is left as it was."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}{ATOMIC_TEMP_MARK}{unique_suffix()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written atomically (temporary file, fsync, rename) to ``path``."""
    atomic_write(path, lambda tmp: write_bytes(tmp, data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) written atomically to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------------ locking


class DirectoryInUse(RuntimeError):
    """Another process (or another open lock of this process) holds the lock of a directory.

    Attributes:
        directory: the locked directory.
        lock_file: the lock file in it.
        holder: what the holder wrote into the lock file (``"pid 1234 on host"``), or None when unreadable.
    """

    def __init__(self, directory: pathlib.Path, lock_file: pathlib.Path, holder: str | None) -> None:
        self.directory, self.lock_file, self.holder = directory, lock_file, holder
        by = f" ({holder})" if holder else ""
        super().__init__(f"{directory} is locked by another process{by}: {lock_file}")

    @property
    def holder_pid(self) -> int | None:
        """The holder's process id, when the lock file names one."""
        if self.holder and self.holder.startswith("pid "):
            word = self.holder.split()[1]
            return int(word) if word.isdigit() else None
        return None


def _try_lock(f: IO[str]) -> bool:
    """Take an exclusive lock on the open file ``f`` without waiting; False when someone else holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    if msvcrt is not None:  # pragma: no cover - Windows: a lock on the first byte, released when the handle closes
        f.seek(0)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    return True  # pragma: no cover - neither: no locking (documented)


def _unlock(f: IO[str]) -> None:
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    elif msvcrt is not None:  # pragma: no cover - Windows
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


class DirectoryLock:
    """An exclusive, advisory lock on a directory: the lock file ``name`` inside it, locked with ``flock`` (POSIX) or
    ``msvcrt.locking`` (Windows).

    The operating system drops the lock when the holder's file is closed, which includes the holder being killed
    (SIGKILL, OOM; on a network file system, as far as it supports locks), so a crashed holder never leaves a stale
    lock: the lock is the OS's, not the file's. While held, the lock file names its holder (``pid <pid> on <host>``);
    on release it is removed, while still locked (POSIX), and :meth:`acquire` checks that the file it locked is still
    the one at the path (else it locks the new one), so a removal never lets two holders lock two different files. A
    killed holder's file stays behind, harmless. On Windows the file is emptied instead of removed.

    ``acquire()`` never waits: it raises :class:`DirectoryInUse` when another holder has the lock, and the
    :class:`OSError` of creating the directory or the lock file (permission denied, read-only file system) as is. A lock
    is also exclusive between two ``DirectoryLock`` objects of one process. Usable as a context manager."""

    def __init__(self, directory: str | os.PathLike, name: str = ".lock") -> None:
        self.directory = pathlib.Path(directory)
        self.path = self.directory / name
        self._file: IO[str] | None = None
        self._created: list[pathlib.Path] = []  # directories acquire() created, outermost first

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> DirectoryLock:
        """Create the directory (and parents) if needed and lock it; returns ``self``."""
        if self._file is not None:
            return self
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()][::-1]
        try:
            f = self._lock_file()
            try:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            except BaseException:
                f.close()
                raise
        except BaseException:
            _remove_empty(missing)
            raise
        self._file, self._created = f, missing
        return self

    def _lock_file(self) -> IO[str]:
        for _ in range(100):  # a retry per lock file removed (or directory removed) under our feet: bounded in practice
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory was removed between mkdir and open: make it again
                continue
            f = os.fdopen(fd, "r+", encoding="utf-8")
            try:
                if not _try_lock(f):
                    raise DirectoryInUse(self.directory, self.path, _read_holder(f))
                if _is_current(f, self.path):
                    return f
            except BaseException:
                f.close()
                raise
            f.close()  # its holder removed it on release after we opened it: lock the file now at the path
        raise OSError(errno.EAGAIN, f"the lock file kept being replaced while locking it: {self.path}")

    def release(self, remove_created: bool = False) -> None:
        """Release the lock (nothing when not held), removing the lock file; with ``remove_created``, also the
        directories :meth:`acquire` created, as far as they are empty (a run that failed before writing anything
        leaves no trace)."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if fcntl is not None:
                self.path.unlink(missing_ok=True)  # while still locked: see acquire
            else:  # pragma: no cover - Windows: an open file cannot be removed
                f.seek(0)
                f.truncate()
                f.flush()
        except OSError:
            pass  # a read-only or full disk: a stale lock file is harmless, the lock goes with the close
        try:
            _unlock(f)
        finally:
            f.close()
        created, self._created = self._created, []
        if remove_created:
            _remove_empty(created)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:  # an object dropped while holding the lock releases it (the close would, too)
        if getattr(self, "_file", None) is not None:
            try:
                self.release()
            except Exception:
                pass


def _is_current(f: IO[str], path: pathlib.Path) -> bool:
    """The open file ``f`` is (still) the file at ``path``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _remove_empty(directories: list[pathlib.Path]) -> None:
    """Remove ``directories`` (outermost first) from the innermost out, stopping at the first that is not empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def _read_holder(f: IO[str]) -> str | None:
    try:
        f.seek(0)
        text = f.read(200).strip()
    except OSError:  # Windows: the holder's locked byte cannot be read
        return None
    return text or None


__all__ = [
    "ATOMIC_TEMP_MARK",
    "DirectoryInUse",
    "DirectoryLock",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "os_error_text",
    "unique_suffix",
    "write_bytes",
]
