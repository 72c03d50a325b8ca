"""Progress bars in a log file: no flood of redraws, no escape codes from nested bars; unchanged in a terminal."""

from __future__ import annotations

import io
import time

from mit.utils.progress import LOG_INTERVAL_S, is_terminal, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_nested(stream: io.StringIO, outer: int = 3, inner: int = 200) -> str:
    for _ in progress_bar(range(outer), desc="runs", file=stream):
        for _ in progress_bar(range(inner), desc="steps", leave=False, nested=True, file=stream, mininterval=0):
            time.sleep(0.0005)
    return stream.getvalue()


def test_a_log_gets_the_outer_bar_only_without_escape_codes():
    log = io.StringIO()
    assert not is_terminal(log)
    text = _run_nested(log)
    assert "steps" not in text and "\x1b[" not in text  # the nested bar is not drawn, nothing moves the cursor
    assert "runs" in text and "3/3" in text  # the outer bar's final state is there
    assert text.count("\r") <= 3  # its start, at most one redraw per LOG_INTERVAL_S (the run is far shorter), close
    assert LOG_INTERVAL_S >= 10


def test_a_terminal_gets_both_bars_redrawn_as_usual():
    text = _run_nested(_Terminal())
    assert "steps" in text and "runs" in text
    assert text.count("\r") > 20  # the inner bar redraws as tqdm always does (mininterval=0 here)
