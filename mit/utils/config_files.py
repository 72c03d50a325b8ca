"""Reading YAML and JSON settings files strictly: a key given twice in one mapping, at any depth, is an error naming it.

``yaml.safe_load`` and ``json.loads`` keep the last of two equal keys without a word, so a config file with ``lr``
twice trains with one of them silently; :func:`load_yaml` and :func:`load_json` parse the same documents but raise
:class:`DuplicateKeyError` (``"duplicate key 'optim.lr' (lines 3 and 7)"``) instead. YAML merge keys (``<<: *base``)
keep their meaning: a key written beside a merge overrides the merged one, as in YAML.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A mapping of a settings file gives one key twice.

    Attributes:
        key: the dotted path of the key (``"optim.lr"``; list items as ``[i]``).
    """

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"duplicate key {key!r}{where}; give each setting once")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ---------------------------------------------------------------------------------------------------------- YAML


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice in a mapping (:class:`DuplicateKeyError`, naming the key's
    path and both lines). Other YAML errors are PyYAML's own (``yaml.YAMLError``)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_node(loader: Any, node: Any, path: str, seen: set[int]) -> None:
    """Walk the composed node tree (before construction, so both occurrences are still there) and compare the keys of
    every mapping by their constructed values (``1`` and ``0x1`` are one key, ``"1"`` another). Aliased nodes are
    walked once."""
    import yaml

    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                _check_yaml_node(loader, value_node, path, seen)
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                key = repr(key)  # PyYAML refuses unhashable keys itself, with its own message
            line = key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKeyError(_join(path, key), f" (lines {lines[key]} and {line})")
            lines[key] = line
            _check_yaml_node(loader, value_node, _join(path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_yaml_node(loader, item, f"{path}[{i}]", seen)


# ---------------------------------------------------------------------------------------------------------- JSON


class _Pairs(list):
    """The key-value pairs of one JSON object, in order (json's object_pairs_hook), turned into a dict once the whole
    document is read, so that a duplicate can be named by its full path."""


def load_json(text: str) -> Any:
    """``json.loads(text)``, refusing a key given twice in an object (:class:`DuplicateKeyError`, naming the key's
    path). Other JSON errors are :class:`json.JSONDecodeError`."""
    return _to_dicts(json.loads(text, object_pairs_hook=_Pairs), "")


def _to_dicts(value: Any, path: str) -> Any:
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for key, item in value:
            if key in out:
                raise DuplicateKeyError(_join(path, key))
            out[key] = _to_dicts(item, _join(path, key))
        return out
    if isinstance(value, list):
        return [_to_dicts(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


__all__ = ["DuplicateKeyError", "load_json", "load_yaml"]
