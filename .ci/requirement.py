"""Print a dependency's requirement from pyproject.toml (``transformers>=5.17,<6``), or with --lowest its lower bound
as a pin (``transformers==5.17``): one source of truth for the CI steps that test both ends of the supported range.

``--extra NAME`` prints, one per line, the requirements an extra adds to the base install (extras of ``mit[...]``
expanded), so that CI can install them into an environment that already holds a bare ``pip install .`` without
building the package again."""

from __future__ import annotations

import pathlib
import re
import sys

text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def extra_requirements(name: str) -> list[str]:
    """The requirements of extra ``name``, its ``mit[...]`` entries expanded."""
    import tomllib

    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    if name not in extras:
        sys.exit(f"pyproject.toml has no extra {name!r}; it has {sorted(extras)}")
    out: list[str] = []
    for requirement in extras[name]:
        nested = re.fullmatch(r"mit\[([\w,\s-]+)\]", requirement)
        parts = nested.group(1).split(",") if nested else []
        for item in [x for part in parts for x in extra_requirements(part.strip())] if nested else [requirement]:
            if item not in out:
                out.append(item)
    return out


if sys.argv[1] == "--extra":
    print("\n".join(extra_requirements(sys.argv[2])))
    sys.exit(0)
name, lowest = sys.argv[1], "--lowest" in sys.argv
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
