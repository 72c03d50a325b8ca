"""Progress bars that read well in a terminal and in a log file.

In a terminal tqdm redraws bars in place; writing to a file or pipe (``mit train ... > log``) it cannot, and every
redraw becomes another line (``\\r``-separated), nested bars adding cursor-movement escape codes. So, when the stream
is not a terminal: an inner (``nested``) bar is not drawn at all, and an outer bar is redrawn at most every
``LOG_INTERVAL_S`` seconds. In a terminal nothing changes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0  # an outer bar's redraws in a log file: at most one per this many seconds


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm writes) is an interactive terminal, or the bars go to a
    notebook (a Jupyter kernel: tqdm.auto draws widgets there)."""
    if stream is None and "ipykernel" in sys.modules:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable | None = None, *, nested: bool = False, file: TextIO | None = None, **kwargs: Any):
    """A ``tqdm`` bar (same arguments) that stays readable in a log: ``nested=True`` for a bar inside another (shown
    only in a terminal); an outer bar in a log redraws at most every :data:`LOG_INTERVAL_S` seconds."""
    from tqdm.auto import tqdm

    if not is_terminal(file):
        if nested:
            kwargs["disable"] = True
        else:
            kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_INTERVAL_S)
            kwargs.setdefault("ascii", True)  # no block characters in a log file
    return tqdm(iterable, file=file, **kwargs)


__all__ = ["LOG_INTERVAL_S", "is_terminal", "progress_bar"]
