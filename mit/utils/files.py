"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never a part."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` writes the content to ``tmp``, a temporary name beside ``path`` (same file system); it is then
    renamed over ``path``. On failure the temporary file is removed and ``path`` is left as it was."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
