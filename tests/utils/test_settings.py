"""mit.utils.settings: strict typed validation, composition of sections, flat / nested mappings, differences."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mit.utils.settings import (
    differences,
    flat_fields,
    flatten,
    from_mapping,
    parse_text,
    setting,
    to_flat,
    validate,
)


@dataclasses.dataclass
class Inner:
    size: int = setting(4, help="a size", low=1)
    rate: float = setting(0.5, help="a rate", low=0, high=1, high_open=True, resume_safe=True)
    flag: bool = setting(False, help="a switch")
    ids: list[int] | None = setting(None, help="some ids", low=0, nonempty=True)
    mode: str = setting("a", help="a mode", choices=lambda: ["a", "b"])
    root: str | None = setting(None, help="where", flag="path")

    def __post_init__(self) -> None:
        validate(self)


@dataclasses.dataclass
class Outer:
    name: str = setting(help="required")
    inner: Inner = setting(default_factory=Inner)

    def __post_init__(self) -> None:
        validate(self)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("size", True, "size: expected an integer >= 1, got True"),
        ("size", 2.0, "size: expected an integer >= 1, got 2.0"),
        ("size", 0, "size: expected an integer >= 1, got 0"),
        ("rate", 1.0, "rate: expected a finite number >= 0 and < 1, got 1.0"),
        ("rate", math.nan, "rate: expected a finite number >= 0 and < 1, got nan"),
        ("rate", "0.1", "rate: expected a finite number >= 0 and < 1, got '0.1'"),
        ("flag", "false", "flag: expected a bool (true or false), got 'false'"),
        ("flag", 0, "flag: expected a bool (true or false), got 0"),
        ("ids", [], "ids: expected None or a non-empty list of integers each >= 0, got []"),
        ("ids", 3, "ids: expected None or a non-empty list of integers each >= 0, got 3"),
        ("mode", "c", "mode: expected one of ['a', 'b'], got 'c'"),
        ("root", "", "path: expected None or a non-empty string, got ''"),
    ],
)
def test_strict_types_and_ranges(field, value, message):
    with pytest.raises(ValueError) as error:
        Inner(**{field: value})
    assert str(error.value) == message


def test_normalisation():
    inner = Inner(rate=0, ids=(3, 1))
    assert isinstance(inner.rate, float) and inner.ids == [3, 1]


def test_flat_and_nested_mappings_build_the_same_configuration():
    nested = from_mapping(Outer, {"name": "x", "inner": {"size": 7, "path": "/d"}})
    flat = from_mapping(Outer, {"name": "x", "size": 7, "path": "/d"})
    assert nested == flat == Outer("x", Inner(size=7, root="/d"))
    assert [leaf.flag for leaf in flat_fields(Outer)] == ["name", "size", "rate", "flag", "ids", "mode", "path"]
    assert to_flat(flat)["path"] == "/d"
    assert flatten(Outer, {"inner": {"size": 1}, "path": "p"}) == {"size": 1, "path": "p"}
    with pytest.raises(ValueError, match=r"where: unknown setting 'sise'; expected one of \["):
        from_mapping(Outer, {"name": "x", "sise": 7}, "where")
    with pytest.raises(ValueError, match=r"where: unknown setting inner.sise; expected one of"):
        from_mapping(Outer, {"name": "x", "inner": {"sise": 7}}, "where")
    with pytest.raises(ValueError, match=r"where: missing required setting 'name'"):
        from_mapping(Outer, {"size": 7}, "where")
    with pytest.raises(ValueError, match=r"flag: expected a bool"):
        from_mapping(Outer, {"name": "x", "flag": "false"})


@pytest.mark.parametrize(
    "data,message",
    [
        ({"size": 1, "inner": {"size": 2}}, "where: setting 'size' is given twice, as 'size' and as inner.size"),
        ({"inner": {"size": 2}, "size": 1}, "where: setting 'size' is given twice, as inner.size and as 'size'"),
        (
            {"inner": {"root": "/a", "path": "/b"}},
            "where: setting 'path' is given twice, as inner.root and as inner.path",
        ),
        ({"flag": True, "inner": {"flag": True}}, "where: setting 'flag' is given twice, as 'flag' and as inner.flag"),
    ],
)
def test_a_setting_given_twice_is_refused_naming_both_spellings(data, message):
    """Even with equal values: one of the two would otherwise be dropped without a word."""
    with pytest.raises(ValueError) as error:
        flatten(Outer, data, "where")
    assert str(error.value) == message + "; give it once"


def test_dashes_and_underscores_are_one_spelling_given_twice():
    @dataclasses.dataclass
    class Dashed:
        batch_size: int = setting(1, help="n", low=1)

        def __post_init__(self) -> None:
            validate(self)

    assert flatten(Dashed, {"batch-size": 2}) == {"batch_size": 2}
    with pytest.raises(ValueError, match=r"'batch_size' is given twice, as 'batch-size' and as 'batch_size'"):
        flatten(Dashed, {"batch-size": 2, "batch_size": 3})


def test_differences_ignore_resume_safe_fields():
    a = from_mapping(Outer, {"name": "x"})
    b = from_mapping(Outer, {"name": "x", "size": 5, "rate": 0.25})
    assert differences(a, b) == [("size", 4, 5), ("rate", 0.5, 0.25)]
    assert differences(a, b, ignore=lambda leaf: leaf.info.resume_safe) == [("size", 4, 5)]


def test_command_line_text():
    kinds = {leaf.flag: leaf.kind for leaf in flat_fields(Inner)}
    assert parse_text(kinds["ids"], "3, 1,") == [3, 1]
    assert parse_text(kinds["rate"], "1e-3") == 1e-3
    for kind, text in ((kinds["rate"], "inf"), (kinds["rate"], "x"), (kinds["size"], "1.5"), (kinds["ids"], "1,x")):
        with pytest.raises(ValueError, match="expected"):
            parse_text(kind, text)
