"""Typed settings: dataclass fields that carry their help text, choices and range, validated by type.

A configuration dataclass declares each field with :func:`setting`; ``validate(obj)`` (called from ``__post_init__``)
checks every field against its annotation and metadata and raises ``ValueError("<name>: expected <what>, got
<value>")``. The checks are strict where a lenient reading would change results: a bool is only ``True`` / ``False``
(a YAML string ``"false"`` is refused, not read as "on"), an integer is not a bool or a float, a float is finite.

Dataclasses whose fields are themselves such dataclasses (*sections*) compose a larger configuration:
:func:`flat_fields` lists every leaf with its flag name (unique across sections), :func:`from_mapping` builds the
configuration from nested sections or from flat flag names, and :func:`to_flat` / :func:`differences` compare two of
them. The ``mit`` command line is generated from the same fields (:mod:`mit.cli`).

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``list[int]``, ``list[str]``, each optionally
``| None``, and section
dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

_METADATA_KEY = "mit_setting"


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """What a field accepts and how it is shown.

    Attributes:
        help: one line for ``--help``.
        metavar: the placeholder ``--help`` shows for the value.
        choices: allowed values, or a callable returning them (read when validating, e.g. a registry).
        low / high: inclusive bounds; ``low_open`` / ``high_open`` make them exclusive.
        nonempty: a list must have at least one element.
        flag: the command-line / flat-config name (default: the field name).
        resume_safe: may differ between a checkpoint's run and the run that resumes it.
    """

    help: str = ""
    metavar: str | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nonempty: bool = False
    flag: str | None = None
    resume_safe: bool = False

    def allowed(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **info: Any) -> Any:
    """A dataclass field with :class:`SettingInfo` metadata (``help``, ``choices``, ``low``, ...)."""
    metadata = {_METADATA_KEY: SettingInfo(**info)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def info_of(field: dataclasses.Field) -> SettingInfo:
    return field.metadata.get(_METADATA_KEY, SettingInfo())


@dataclasses.dataclass(frozen=True)
class Kind:
    """A field's type, reduced to what validation needs: ``base`` in bool/int/float/str/list[int]/section."""

    base: Any  # bool, int, float, str, "list[int]" or a section dataclass
    optional: bool


def kind_of(cls: type, field: dataclasses.Field) -> Kind:
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"{cls.__name__}.{field.name}: unsupported annotation {hint}")
        hint = rest[0]
    if typing.get_origin(hint) is list and typing.get_args(hint) in ((int,), (str,)):
        return Kind(f"list[{typing.get_args(hint)[0].__name__}]", optional)
    if hint in (bool, int, float, str) or dataclasses.is_dataclass(hint):
        return Kind(hint, optional)
    raise TypeError(f"{cls.__name__}.{field.name}: unsupported annotation {hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range_text(info: SettingInfo) -> str:
    parts = []
    if info.low is not None:
        parts.append(f"{'>' if info.low_open else '>='} {info.low:g}")
    if info.high is not None:
        parts.append(f"{'<' if info.high_open else '<='} {info.high:g}")
    return " and ".join(parts)


def expected_text(kind: Kind, info: SettingInfo) -> str:
    """What a field accepts, in words: ``"an integer >= 1"``, ``"None or a finite number > 0"``, ..."""
    allowed = info.allowed()
    if allowed is not None:
        text = f"one of {allowed}"
    elif kind.base is bool:
        text = "a bool (true or false)"
    elif kind.base is int:
        text = "an integer"
    elif kind.base is float:
        text = "a finite number"
    elif kind.base is str:
        text = "a non-empty string"
    elif kind.base in ("list[int]", "list[str]"):
        what = "integers" if kind.base == "list[int]" else "non-empty strings"
        text = f"a non-empty list of {what}" if info.nonempty else f"a list of {what}"
    else:
        text = f"a {kind.base.__name__} mapping"
    bounds = _range_text(info)
    if bounds:
        text += (" each " if kind.base == "list[int]" else " ") + bounds
    return f"None or {text}" if kind.optional else text


def _in_range(value: float, info: SettingInfo) -> bool:
    if info.low is not None and (value <= info.low if info.low_open else value < info.low):
        return False
    return not (info.high is not None and (value >= info.high if info.high_open else value > info.high))


def check_value(kind: Kind, info: SettingInfo, value: Any) -> Any:
    """``value`` as the field stores it (ints accepted for floats, tuples for lists), or ValueError's reason."""
    if value is None:
        if kind.optional:
            return None
        raise _Invalid
    base = kind.base
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = _is_int(value) and _in_range(value, info)
    elif base is float:
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and _in_range(value, info)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str) and value != ""
    elif base == "list[int]":
        ok = (
            isinstance(value, (list, tuple))
            and all(_is_int(v) and _in_range(v, info) for v in value)
            and (len(value) > 0 or not info.nonempty)
        )
        value = list(value) if ok else value
    elif base == "list[str]":
        ok = (
            isinstance(value, (list, tuple))
            and all(isinstance(v, str) and v for v in value)
            and (len(value) > 0 or not info.nonempty)
        )
        value = list(value) if ok else value
    else:
        ok = isinstance(value, base)
    allowed = info.allowed()
    if ok and allowed is not None:
        ok = value in allowed
    if not ok:
        raise _Invalid
    return value


class _Invalid(Exception):
    pass


def validate(obj: Any, prefix: str = "") -> None:
    """Check (and normalise: int -> float, tuple -> list) every field of the dataclass ``obj``; sections are validated
    by their own ``__post_init__``. ValueError ``"<prefix><name>: expected <what>, got <value>"``."""
    cls = type(obj)
    for field in dataclasses.fields(cls):
        kind, info = kind_of(cls, field), info_of(field)
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(kind.base):
            if not isinstance(value, kind.base):
                raise ValueError(f"{prefix}{field.name}: expected a {kind.base.__name__}, got {value!r}")
            continue
        try:
            object.__setattr__(obj, field.name, check_value(kind, info, value))
        except _Invalid:
            raise ValueError(
                f"{prefix}{info.flag or field.name}: expected {expected_text(kind, info)}, got {value!r}"
            ) from None


# --------------------------------------------------------------------------------------------------- composition


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf setting of a composed configuration: its path (section, field), flag name, kind and metadata."""

    path: tuple[str, ...]
    flag: str
    kind: Kind
    info: SettingInfo
    section: type


def flat_fields(cls: type) -> Iterator[Leaf]:
    """Every leaf field of a composed configuration class, sections expanded in declaration order."""
    for field in dataclasses.fields(cls):
        kind = kind_of(cls, field)
        if dataclasses.is_dataclass(kind.base):
            for leaf in flat_fields(kind.base):
                yield dataclasses.replace(leaf, path=(field.name, *leaf.path))
        else:
            info = info_of(field)
            yield Leaf((field.name,), info.flag or field.name, kind, info, cls)


def leaves_by_flag(cls: type) -> dict[str, Leaf]:
    leaves: dict[str, Leaf] = {}
    for leaf in flat_fields(cls):
        if leaf.flag in leaves:
            raise TypeError(f"{cls.__name__}: flag {leaf.flag!r} is declared twice")
        leaves[leaf.flag] = leaf
    return leaves


def _section_default(cls: type, field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def flatten(cls: type, data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """``{flag: value}`` from nested sections (``{"optim": {"lr": 1e-3}}``), flat flag names (``{"lr": 1e-3}``) or a
    mix; ``-`` in names is read as ``_``. Unknown names are a ValueError naming them, and so is a setting given twice
    under two spellings (``lr`` beside ``optim.lr``, ``batch-size`` beside ``batch_size``, a section's field name
    beside its flag name): one of the two would be dropped silently."""
    leaves = leaves_by_flag(cls)
    flat: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # flag -> how data spelled it

    def put(flag: str, spelling: str, value: Any) -> None:
        if flag in flat:
            raise ValueError(
                f"{where}: setting {flag!r} is given twice, as {_spelling_text(spelled[flag])} and as "
                f"{_spelling_text(spelling)}; give it once"
            )
        flat[flag], spelled[flag] = value, spelling

    sections = {f.name: f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(kind_of(cls, f).base)}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in sections and isinstance(value, Mapping):
            section_type = kind_of(cls, sections[key]).base
            # inside a section: field names (as dataclasses.asdict writes them) or flag names
            own = {}
            for leaf in flat_fields(section_type):
                if len(leaf.path) == 1:
                    own[leaf.path[-1]] = own[leaf.flag] = leaf.flag
            for raw_name, item in value.items():
                name = str(raw_name).replace("-", "_")
                if name not in own:
                    raise ValueError(
                        f"{where}: unknown setting {key}.{raw_name}; expected one of {sorted(own)} in section {key!r}"
                    )
                put(own[name], f"{raw_key}.{raw_name}", item)
        elif key in leaves:
            put(key, str(raw_key), value)
        else:
            raise ValueError(f"{where}: unknown setting {raw_key!r}; expected one of {sorted(leaves)}")
    return flat


def _spelling_text(spelling: str) -> str:
    """How :func:`flatten` names a key in its messages: ``optim.lr`` as is, a flat key quoted (``'lr'``)."""
    return spelling if "." in spelling else repr(spelling)


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build the composed configuration ``cls`` from ``data`` (see :func:`flatten`); missing required settings are a
    ValueError naming them, every value is validated by its section."""
    return _build(cls, flatten(cls, data, where), where)


def _build(cls: type, flat: dict[str, Any], where: str) -> Any:
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = kind_of(cls, field)
        if dataclasses.is_dataclass(kind.base):
            section_flags = {leaf.flag for leaf in flat_fields(kind.base)}
            given = {k: v for k, v in flat.items() if k in section_flags}
            default = _section_default(cls, field)
            if default is not dataclasses.MISSING and not given:
                kwargs[field.name] = default
                continue
            if default is not dataclasses.MISSING:
                base = to_flat(default)
                given = {**base, **given}
            kwargs[field.name] = _build(kind.base, given, where)
        else:
            flag = info_of(field).flag or field.name
            if flag in flat:
                kwargs[field.name] = flat[flag]
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing required setting {flag!r}")
    return cls(**kwargs)


def to_flat(obj: Any) -> dict[str, Any]:
    """``{flag: value}`` of every leaf of a composed configuration."""
    out = {}
    for leaf in flat_fields(type(obj)):
        value = obj
        for name in leaf.path:
            value = getattr(value, name)
        out[leaf.flag] = value
    return out


def differences(old: Any, new: Any, ignore: Callable[[Leaf], bool] = lambda leaf: False) -> list[tuple[str, Any, Any]]:
    """``(flag, old value, new value)`` of every leaf that differs (and is not ignored)."""
    before, after = to_flat(old), to_flat(new)
    return [
        (leaf.flag, before[leaf.flag], after[leaf.flag])
        for leaf in flat_fields(type(new))
        if not ignore(leaf) and before[leaf.flag] != after[leaf.flag]
    ]


def parse_text(kind: Kind, text: str) -> Any:
    """A command-line string as the field's type (ValueError with the reason): ints, finite floats, comma lists."""
    if kind.base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if kind.base is float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    if kind.base == "list[str]":
        return [x.strip() for x in text.split(",") if x.strip()]
    if kind.base == "list[int]":
        try:
            return [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"expected comma-separated integers such as 12,16,20, got {text!r}") from None
    return text


__all__ = [
    "Kind",
    "Leaf",
    "SettingInfo",
    "check_value",
    "differences",
    "expected_text",
    "flat_fields",
    "flatten",
    "from_mapping",
    "info_of",
    "kind_of",
    "leaves_by_flag",
    "parse_text",
    "setting",
    "to_flat",
    "validate",
]
