"""Directories written and read as one unit: a reader sees the old content or the new one, never a mix, and a crash
at any moment leaves one of them complete. Adapters (:mod:`mit.hf.adapter_files`) are saved and read
through it.

Writing, :func:`write_directory` (``target`` = ``<parent>/<name>``), one writer at a time:

1. every file is written into a fresh sibling ``<parent>/.<name>.tmp-<pid>-<random>`` and fsynced, then the
   directory itself; ``target`` is untouched. A failure here (disk full, an exception from a writer) removes the
   temporary directory and leaves ``target`` as it was; a crash leaves it behind, never read, safe to delete.
2. the new directory takes ``target``'s place:

   - ``target`` absent: one ``rename``;
   - on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two directories in one atomic step (``target`` never stops
     existing), then the old content, now at the temporary name, is deleted;
   - elsewhere (or on a file system without it): ``target`` is renamed aside to ``<parent>/.<name>.old-<pid>-<random>``,
     the new directory is renamed to ``target``, and the aside is deleted. Between the two renames ``target`` does not
     exist: a reader then reads the aside (the old content, complete), see below; if the second rename fails the
     aside is renamed back. A crash between the two leaves the aside, which readers keep reading until the next
     successful write removes it.

3. the parent directory is fsynced (the renames are durable), and asides that interrupted writes left are removed.

Reading, :func:`read_directory`: the directory is opened once and every file is opened relative to that handle
(``dir_fd``), so all files come from the same directory even if a write swaps ``target`` meanwhile. A file that
vanishes because the directory was swapped out and is being deleted makes the read start again on the new one. When
``target`` is missing and exactly one aside exists (a write between its two renames, or one that crashed there), the
aside is read: it is the last complete content. Systems without ``dir_fd`` support read the files by path (no
snapshot guarantee across files).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Collection, Mapping, Sequence

TMP_MARK = ".tmp-"  # <parent>/.<name>.tmp-<pid>-<random>: a directory being written
ASIDE_MARK = ".old-"  # <parent>/.<name>.old-<pid>-<random>: the previous content, between the two renames
ATTEMPTS = 5  # reads started again when the directory is swapped while being read


def _sibling(target: pathlib.Path, mark: str) -> pathlib.Path:
    return target.with_name(f".{target.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: pathlib.Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; directories are skipped where they cannot be
    opened (Windows)."""
    if directory and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange(first: pathlib.Path, second: pathlib.Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``) and return True;
    False, with nothing changed, where the system or the file system cannot; OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, some musl builds)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _asides(target: pathlib.Path) -> list[pathlib.Path]:
    """The asides that writes of ``target`` left (see the module's docstring), sorted by name."""
    prefix = f".{target.name}{ASIDE_MARK}"
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return []
    return sorted(target.parent / e for e in entries if e.startswith(prefix) and (target.parent / e).is_dir())


def _swap_in(new: pathlib.Path, target: pathlib.Path) -> None:
    """Put the complete directory ``new`` at ``target`` (steps 2 of the module's docstring)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old content
        return
    aside = _sibling(target, ASIDE_MARK)
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_directory(
    target: str | os.PathLike,
    files: Mapping[str, Callable[[pathlib.Path], None]],
    replaceable: Callable[[str], bool],
    what: str,
) -> None:
    """Write ``target`` as one unit: ``files`` maps each file name to ``write(path)``, which writes that file's
    content to ``path``; the files are written into a new directory that then takes ``target``'s place (see the
    module's docstring).

    ``target`` may be missing or a directory whose entries all satisfy ``replaceable`` (its previous content, which
    is replaced as a whole); anything else is a ValueError naming ``target``, ``what`` it should hold and the entries
    in the way, before anything is written. A symbolic link is followed: the directory it points to is replaced.
    A failure while writing raises it and leaves ``target`` as it was, with no temporary directory left."""
    given = pathlib.Path(target)
    target = pathlib.Path(os.path.realpath(given))
    mode = None
    if os.path.lexists(target):
        if not target.is_dir():
            raise ValueError(
                f"{given}: exists and is not a directory; expected a directory for the {what}, or no entry"
            )
        foreign = sorted(e for e in os.listdir(target) if not replaceable(e))
        if foreign:
            raise ValueError(
                f"{given}: holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''} besides the {what}; saving replaces "
                f"the directory as a whole, so it must be empty or hold only a previous {what}: save into a directory "
                "of its own"
            )
        mode = stat.S_IMODE(os.stat(target).st_mode)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = _sibling(target, TMP_MARK)
    os.mkdir(new)  # the process umask applies, as for a directory made by mkdir
    try:
        if mode is not None:
            os.chmod(new, mode)
        for name, write in files.items():
            write(new / name)
            _fsync(new / name)
        _fsync(new, directory=True)
        _swap_in(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync(target.parent, directory=True)
    for aside in _asides(target):  # left by an interrupted write: older than what was just written
        shutil.rmtree(aside, ignore_errors=True)


class _Swapped(Exception):
    """The directory being read was swapped out (and is being deleted): read again."""


def _stale(source: pathlib.Path, target: pathlib.Path, dir_fd: int) -> bool:
    """True when ``dir_fd`` (opened at ``source``) is no longer the current content of ``target``."""
    if source != target and os.path.lexists(target):
        return True  # an aside, and the new content is in place
    try:
        now = os.stat(source)
    except FileNotFoundError:
        return True
    opened = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _read_all(fd: int, path: pathlib.Path) -> bytes:
    try:
        with open(fd, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None


def _read_snapshot(source: pathlib.Path, target: pathlib.Path, names: Sequence[str]) -> dict[str, bytes | None]:
    if os.open not in os.supports_dir_fd:
        contents: dict[str, bytes | None] = {}
        for name in names:
            try:
                fd = os.open(source / name, os.O_RDONLY)
            except FileNotFoundError:
                contents[name] = None
                continue
            except OSError as error:
                raise ValueError(f"{source / name}: cannot be read ({error})") from None
            contents[name] = _read_all(fd, source / name)
        return contents
    try:
        dir_fd = os.open(source, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise _Swapped from None
    except OSError as error:
        raise ValueError(f"{source}: cannot be read ({error})") from None
    try:
        contents = {}
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                if _stale(source, target, dir_fd):
                    raise _Swapped from None
                contents[name] = None
                continue
            except OSError as error:
                raise ValueError(f"{source / name}: cannot be read ({error})") from None
            contents[name] = _read_all(fd, source / name)
        return contents
    finally:
        os.close(dir_fd)


def read_directory(
    target: str | os.PathLike, names: Collection[str], what: str
) -> tuple[pathlib.Path, dict[str, bytes | None]]:
    """Read the files ``names`` of the directory ``target`` as one snapshot (see the module's docstring) and return
    the directory they came from (``target``, or the aside of an interrupted write) and each file's bytes (None for a
    file the directory does not hold).

    ValueError, naming ``target`` and ``what`` it should hold, when it is not a directory, when several asides make
    the last complete content ambiguous, or when it keeps being swapped while it is read."""
    target = pathlib.Path(target)
    names = list(names)
    for _ in range(ATTEMPTS):
        source = target
        if not target.is_dir():
            if os.path.lexists(target):
                raise ValueError(f"no {what} at {target}: not a directory")
            asides = _asides(target)
            if not asides:
                raise ValueError(f"no {what} at {target}: no such directory (missing {', '.join(names)})")
            if len(asides) > 1:
                raise ValueError(
                    f"no {what} at {target}, and interrupted saves left several previous ones beside it "
                    f"({[a.name for a in asides]}): rename the one to keep to {target.name}"
                )
            source = asides[0]
        try:
            return source, _read_snapshot(source, target, names)
        except _Swapped:
            continue
    raise ValueError(
        f"{target}: the {what} was replaced {ATTEMPTS} times while it was being read (is another process saving it "
        "in a loop?); read it again"
    )
