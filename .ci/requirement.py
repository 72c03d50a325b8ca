"""Print a dependency's requirement from pyproject.toml (``transformers>=5.17,<6``), or with --lowest its lower bound
as a pin (``transformers==5.17``): one source of truth for the CI steps that test both ends of the supported range."""

from __future__ import annotations

import pathlib
import re
import sys

name, lowest = sys.argv[1], "--lowest" in sys.argv
text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
match = re.search(rf'"({re.escape(name)}(?:[<>=!~]=?[^",;]+)(?:,[<>=!~]=?[^",;]+)*)', text)
if match is None:
    sys.exit(f"{name} has no version requirement in pyproject.toml")
requirement = match.group(1)
if lowest:
    bound = re.search(r">=\s*([\w.]+)", requirement)
    if bound is None:
        sys.exit(f"{requirement} has no lower bound")
    requirement = f"{name}=={bound.group(1)}"
print(requirement)
