"""SIGTERM during training: raise inside the main thread so that ``finally`` blocks clean up (the incomplete
checkpoint, the run's lock), then end the process as SIGTERM's default action would."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM arrived inside :func:`sigterm_raises` (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread, so that ``finally`` blocks run (the
    incomplete checkpoint is removed). Only when SIGTERM has its default action and this is the main thread (where
    Python runs signal handlers); otherwise nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def die_of_sigterm() -> None:
    """End the process as SIGTERM's default action would (the parent sees "killed by SIGTERM")."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM)  # not reached: the signal is delivered before kill() returns


__all__ = ["Terminated", "die_of_sigterm", "sigterm_raises"]
