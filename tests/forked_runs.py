"""Runs of a test worker in processes forked from one warm interpreter, for tests that start the same worker many times.

A subprocess of its own pays ~4-5 s (2 cores) to import torch, transformers and mit before the worker does anything;
tests that kill a run and resume it start a dozen. :class:`ForkServer` starts one interpreter that imports the
worker's module once and then forks a child per run: each child is a real process of its own (its own pid, signals,
exit status, stdout and stderr), started from an interpreter that has imported the modules and run nothing else (no
thread is started, so forking is safe). A run is therefore what ``python worker.py args...`` would be, minus the
imports; a worker whose module reads the environment at import must be given that environment when the server starts.

Protocol (one JSON object per line): the test sends ``{"start": [args...], "stdout": path, "stderr": path}`` and gets
``{"pid": N}``, or ``{"poll": N}`` and gets ``{"returncode": R}`` (None while running; minus the signal number when
a signal ended it, as ``subprocess`` reports it).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback


class ForkedProcess:
    """One forked run: ``pid``, :meth:`poll`, :meth:`wait`, :meth:`kill`, and its output once it has ended."""

    def __init__(self, server: ForkServer, pid: int, stdout: pathlib.Path, stderr: pathlib.Path) -> None:
        self.server, self.pid, self.returncode = server, pid, None
        self._stdout, self._stderr = stdout, stderr

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._request({"poll": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(f"forked run {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(30)

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()


class ForkServer:
    """An interpreter that has imported ``module`` (with ``env``) and forks a child per :meth:`start`, which calls
    ``module.<function>(*args)`` (the worker's ``main``) and exits as ``python module.py args...`` would."""

    def __init__(self, module_path: pathlib.Path, function: str, env: dict[str, str], folder: pathlib.Path) -> None:
        self.folder, self.runs = folder, 0
        command = [sys.executable, __file__, str(module_path), function]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the fork server did not start (exit status {self.process.wait()})")

    def _request(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (exit status {self.process.wait()})")
        return json.loads(line)

    def start(self, args: list[str]) -> ForkedProcess:
        """Start a run of the worker with ``args`` (strings, as on a command line)."""
        self.runs += 1
        stdout, stderr = (self.folder / f"run{self.runs}.{name}" for name in ("out", "err"))
        pid = self._request({"start": list(args), "stdout": str(stdout), "stderr": str(stderr)})["pid"]
        return ForkedProcess(self, pid, stdout, stderr)

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run the worker with ``args`` to its end: its exit status, stdout and stderr, as ``subprocess.run`` gives."""
        child = self.start(args)
        child.wait(timeout)
        return subprocess.CompletedProcess(args, child.returncode, child.stdout, child.stderr)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


# --------------------------------------------------------------------------------------------------------------------
# The server (this file run as a script)
# --------------------------------------------------------------------------------------------------------------------


def _child(function, args: list[str], stdout: str, stderr: str) -> None:
    """In the forked child: output to the run's files, then the worker; never returns."""
    code = 0
    try:
        for fd, path in ((1, stdout), (2, stderr)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [sys.argv[1], *args]
        function(*args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _serve(module_path: str, function_name: str) -> None:
    sys.path.insert(0, str(pathlib.Path(module_path).parent))
    function = getattr(importlib.import_module(pathlib.Path(module_path).stem), function_name)
    replies = os.fdopen(os.dup(1), "w")  # the reply channel: fd 1 becomes each child's own stdout file
    os.dup2(2, 1)  # and, in the server, its stderr: nothing the imports print can reach the replies
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    ended: dict[int, int] = {}
    for line in sys.stdin:
        message = json.loads(line)
        if "start" in message:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # (nothing buffered is written twice, by the server and the child)
            pid = os.fork()
            if pid == 0:
                replies.close()
                _child(function, message["start"], message["stdout"], message["stderr"])
            reply = {"pid": pid}
        else:
            pid = message["poll"]
            if pid not in ended:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    ended[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            reply = {"returncode": ended.get(pid)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
