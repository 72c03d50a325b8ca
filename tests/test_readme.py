"""The README's quickstart runs as written (against the installed package) and prints what it says it prints."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert stdout.getvalue().startswith("torch.Size([2, 9, 128, 64]) tensor([")
