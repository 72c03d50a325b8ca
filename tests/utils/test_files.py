"""mit.utils.files: the directory lock (exclusive, released by the OS when its holder dies), unique temporary names,
atomic and durable writes whose failures keep their errno."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mit.utils import files
from mit.utils.files import DirectoryInUse, DirectoryLock, atomic_write_text, os_error_text, unique_suffix


def test_a_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    directory = tmp_path / "a" / "b"
    with DirectoryLock(directory, ".lock") as lock:
        assert directory.is_dir() and lock.held
        assert (directory / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(DirectoryInUse) as error:  # a second lock, even in the same process
            DirectoryLock(directory, ".lock").acquire()
        assert error.value.holder_pid == os.getpid() and error.value.lock_file == directory / ".lock"
    assert not lock.held and not (directory / ".lock").exists()  # removed on release (while still locked)
    DirectoryLock(directory, ".lock").acquire().release()


def test_a_lock_file_removed_by_its_last_holder_is_not_locked_twice(tmp_path, monkeypatch):
    """B opens the lock file, A (holding it) releases and removes it, B's flock then succeeds on the removed file: B
    must notice and lock the file now at the path, else B and a later C would both hold "the" lock."""
    first = DirectoryLock(tmp_path, ".lock").acquire()
    real_try_lock, calls = files._try_lock, []

    def release_first_then_lock(f):
        calls.append(1)
        if len(calls) == 1:
            first.release()  # between B's open and B's flock
        return real_try_lock(f)

    monkeypatch.setattr(files, "_try_lock", release_first_then_lock)
    second = DirectoryLock(tmp_path, ".lock").acquire()
    assert len(calls) == 2  # the first (removed) file was let go, the new one locked
    monkeypatch.undo()
    with pytest.raises(DirectoryInUse):
        DirectoryLock(tmp_path, ".lock").acquire()
    second.release()


def test_release_can_remove_the_directories_acquire_created(tmp_path):
    lock = DirectoryLock(tmp_path / "a" / "b" / "c", ".lock").acquire()
    lock.release(remove_created=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "other").write_text("x")
    lock = DirectoryLock(tmp_path / "a" / "b", ".lock").acquire()
    lock.release(remove_created=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["other"]


def test_a_killed_holder_releases_the_lock(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from mit.utils.files import DirectoryLock
        lock = DirectoryLock({str(tmp_path)!r}, ".lock").acquire()
        print("locked", flush=True)
        sys.stdin.read()
    """)  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUse) as error:
            DirectoryLock(tmp_path, ".lock").acquire()
        assert error.value.holder_pid == holder.pid
        holder_text = f"pid {holder.pid} on {socket.gethostname()}"
        assert str(error.value) == f"{tmp_path} is locked by another process ({holder_text}): {tmp_path / '.lock'}"
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert (tmp_path / ".lock").read_text().startswith(f"pid {holder.pid} ")  # its file is still there ...
    DirectoryLock(tmp_path, ".lock").acquire().release()  # ... but the lock went with the process


def test_lock_errors_of_the_file_system_are_raised_as_they_are(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError):
        DirectoryLock(a_file / "run").acquire()


def test_temporary_names_are_unique_and_atomic_writes_leave_nothing_behind(tmp_path, monkeypatch):
    assert len({unique_suffix() for _ in range(1000)}) == 1000
    assert unique_suffix().startswith(f"{os.getpid()}-")
    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")

    def full_disk(path, data):
        with open(path, "wb") as f:
            f.write(data[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files, "write_bytes", full_disk)
    with pytest.raises(OSError) as error:
        atomic_write_text(target, "new")
    assert error.value.errno == errno.ENOSPC and os_error_text(error.value) == "No space left on device"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_os_error_text():
    assert os_error_text(PermissionError(errno.EACCES, "Permission denied", "/x")) == "Permission denied"
    assert os_error_text(OSError("a message\nof two lines")) == "a message of two lines"
