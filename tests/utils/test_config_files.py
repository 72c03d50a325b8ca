"""mit.utils.config_files: YAML and JSON read as PyYAML / json read them, except that a key given twice is an error
naming it."""

from __future__ import annotations

import json

import pytest
import yaml

from mit.utils.config_files import DuplicateKeyError, load_json, load_yaml

DOCUMENT = """
task: msa
optim: {lr: 1.0e-3, epochs: 2}
layers: [1, 2]
base: &base {a: 1, b: 2}
merged:
  <<: *base
  b: 3
again: *base
"""


def test_documents_read_as_before():
    assert load_yaml(DOCUMENT) == yaml.safe_load(DOCUMENT)
    assert load_yaml(DOCUMENT)["merged"] == {"a": 1, "b": 3}  # a merge key's values may be overridden, as in YAML
    assert load_yaml("") is None and load_yaml("- 1\n- 2") == [1, 2]
    text = '{"task": "msa", "optim": {"lr": 0.001}, "rows": [{"a": 1}, {"a": 2}]}'
    assert load_json(text) == json.loads(text)


@pytest.mark.parametrize(
    "text,key,where",
    [
        ("lr: 1\nepochs: 2\nlr: 2\n", "lr", " (lines 1 and 3)"),
        ("optim:\n  lr: 1\n  lr: 2\n", "optim.lr", " (lines 2 and 3)"),
        ("rows:\n  - {a: 1}\n  - {a: 1, a: 2}\n", "rows[1].a", " (lines 3 and 3)"),
        ("1: x\n0x1: y\n", "1", " (lines 1 and 2)"),  # equal once read (both the integer 1)
        ("base: &b {a: 1, a: 2}\nother: *b\n", "base.a", " (lines 1 and 1)"),
    ],
)
def test_yaml_duplicates_are_named(text, key, where):
    with pytest.raises(DuplicateKeyError) as error:
        load_yaml(text)
    assert error.value.key == key
    assert str(error.value) == f"duplicate key {key!r}{where}; give each setting once"
    assert yaml.safe_load(text) is not None  # PyYAML alone keeps one of them without a word


def test_yaml_keys_that_differ_once_read_are_not_duplicates():
    assert load_yaml("1: x\n'1': y\n") == {1: "x", "1": "y"}


@pytest.mark.parametrize(
    "text,key",
    [
        ('{"lr": 1, "lr": 2}', "lr"),
        ('{"optim": {"lr": 1, "lr": 2}}', "optim.lr"),
        ('[{"a": 1}, {"a": 1, "a": 2}]', "[1].a"),
    ],
)
def test_json_duplicates_are_named(text, key):
    with pytest.raises(DuplicateKeyError) as error:
        load_json(text)
    assert error.value.key == key and str(error.value) == f"duplicate key {key!r}; give each setting once"
    json.loads(text)  # json alone keeps the last one


def test_other_errors_are_the_parsers_own():
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [unclosed")
    with pytest.raises(json.JSONDecodeError):
        load_json("{")
