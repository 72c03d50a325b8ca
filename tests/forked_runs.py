"""Runs of test workers and scripts in processes forked from one warm interpreter, for tests that start many.

A subprocess of its own pays ~4-5 s (2 cores) to import torch, transformers and mit before it does anything; the
kill/resume tests start fifteen, the benchmark tests one per script. :class:`ForkServer` starts one interpreter that
imports the heavy modules once and then forks a child per run: each child is a real process of its own (its own pid,
signals, exit status, stdout and stderr), forked from an interpreter that has imported modules and run nothing else
(the server refuses to fork once a thread other than its own runs: forking is safe). A run is therefore what
``python script.py args...`` (or the worker function's ``python worker.py args...``) would be, minus the imports; the
environment is the server's, so a run that needs other environment variables than the tests' (ones read at import,
such as TRITON_INTERPRET) is a plain subprocess, and modules the server imported are not imported again (a ``-m`` run
uses the installed package, as the console script does, even from a source checkout's root).

Forking is used on Linux only (macOS forks badly once system frameworks are loaded; Windows has no fork) and unless
MIT_TESTS_NO_FORK=1: elsewhere every run is a plain ``python script args...`` subprocess, with the same interface.

Protocol (one JSON object per line): the test sends ``{"start": [args...], "script": path or null, "cwd": path or
null, "stdout": path, "stderr": path}`` and gets ``{"pid": N}``, or ``{"poll": N}`` and gets ``{"returncode": R}``
(None while running; minus the signal number when a signal ended it, as ``subprocess`` reports it).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback

FORKING = sys.platform.startswith("linux") and hasattr(os, "fork") and os.environ.get("MIT_TESTS_NO_FORK") != "1"


class ForkedProcess:
    """One forked run: ``pid``, :meth:`poll`, :meth:`wait`, :meth:`kill`, and its output once it has ended."""

    def __init__(self, server: ForkServer, pid: int, stdout: pathlib.Path, stderr: pathlib.Path, popen=None) -> None:
        self.server, self.pid, self.returncode, self.popen = server, pid, None, popen
        self._stdout, self._stderr = stdout, stderr

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.popen is not None:  # a plain subprocess (no fork here)
                self.returncode = self.popen.poll()
            else:
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
            if self.popen is not None:
                self.popen.kill()
            else:
                os.kill(self.pid, signal.SIGKILL)
            self.wait(30)

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()


class ForkServer:
    """An interpreter, started with ``env``, that has imported the modules ``preload`` (each run then runs a script:
    :meth:`start` with ``script``) or the worker module at ``worker`` (each run calls its ``function`` with the run's
    arguments); the runs' output files go to ``folder``."""

    def __init__(
        self,
        env: dict[str, str],
        folder: pathlib.Path,
        *,
        preload: tuple[str, ...] = (),
        worker: pathlib.Path | None = None,
        function: str = "main",
    ) -> None:
        self.folder, self.runs, self.worker, self.env = folder, 0, worker, env
        self.process = None
        if not FORKING:
            return
        command = [sys.executable, __file__, str(worker or ""), function, ",".join(preload)]
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
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the fork server refused: {reply['error']}")
        return reply

    def start(self, args: list[str], script: str | os.PathLike | None = None, cwd: str | None = None) -> ForkedProcess:
        """Start a run with ``args`` (strings, as on a command line): of ``script`` (as ``python script args...``,
        in ``cwd``; ``"-m module"``: as ``python -m module args...``), or of the worker function."""
        self.runs += 1
        stdout, stderr = (self.folder / f"run{self.runs}.{name}" for name in ("out", "err"))
        if not FORKING:
            target = str(self.worker) if script is None else str(script)
            command = [sys.executable, *(["-m", target[3:]] if target.startswith("-m ") else [target]), *map(str, args)]
            with stdout.open("w") as out, stderr.open("w") as err:
                popen = subprocess.Popen(command, env=self.env, cwd=cwd, stdout=out, stderr=err)
            return ForkedProcess(self, popen.pid, stdout, stderr, popen)
        message = {"start": [str(a) for a in args], "script": None if script is None else str(script),
                   "cwd": None if cwd is None else str(cwd), "stdout": str(stdout), "stderr": str(stderr)}  # fmt: skip
        return ForkedProcess(self, self._request(message)["pid"], stdout, stderr)

    def run(
        self, args: list[str], timeout: float, script: str | os.PathLike | None = None, cwd: str | None = None
    ) -> subprocess.CompletedProcess:
        """A run to its end: its exit status, stdout and stderr, as ``subprocess.run(..., capture_output=True,
        text=True)`` gives them."""
        child = self.start(args, script, cwd)
        child.wait(timeout)
        return subprocess.CompletedProcess(args, child.returncode, child.stdout, child.stderr)

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


# --------------------------------------------------------------------------------------------------------------------
# The server (this file run as a script)
# --------------------------------------------------------------------------------------------------------------------


def _child(function, message: dict) -> None:
    """In the forked child: output to the run's files, then the worker function or the script; never returns."""
    code = 0
    try:
        for fd, path in ((1, message["stdout"]), (2, message["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if message["cwd"]:
            os.chdir(message["cwd"])
        args, script = message["start"], message["script"]
        if script is None:
            sys.argv = [sys.argv[1], *args]
            function(*args)
        elif script.startswith("-m "):  # as `python -m module args...`: the current directory first on the path
            sys.argv = [script, *args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
        else:  # as `python script args...`: the script's directory first on the path, run as __main__
            sys.argv = [script, *args]
            sys.path.insert(0, str(pathlib.Path(script).resolve().parent))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:  # as the interpreter ends: an int is the status, anything else is printed (status 1)
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _serve(worker: str, function_name: str, preload: str) -> None:
    function = None
    if worker:
        sys.path.insert(0, str(pathlib.Path(worker).parent))
        function = getattr(importlib.import_module(pathlib.Path(worker).stem), function_name)
    for name in filter(None, preload.split(",")):
        importlib.import_module(name)
    replies = os.fdopen(os.dup(1), "w")  # the reply channel: fd 1 becomes each child's own stdout file
    os.dup2(2, 1)  # and, in the server, its stderr: nothing the imports print can reach the replies
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    ended: dict[int, int] = {}
    for line in sys.stdin:
        message = json.loads(line)
        if "start" in message:
            if threading.active_count() > 1:  # a fork would copy locks those threads may hold
                reply = {"error": f"threads running in the server: {[t.name for t in threading.enumerate()]}"}
            else:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()  # (nothing buffered is written twice, by the server and the child)
                pid = os.fork()
                if pid == 0:
                    replies.close()
                    _child(function, message)
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
    _serve(*sys.argv[1:4])
