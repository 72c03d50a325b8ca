"""MiT subclasses of a model's own classes, made on demand, so that ``apply_mit`` serves every family of the table.

``apply_mit`` switches an instance's ``__class__`` to ``MiT<Base>`` (a subclass of a mixin and the instance's own
class): the instance keeps its parameters, buffers, hooks and state-dict keys. The classes are cached per (mixin,
base) and published in this module's namespace under their name. Pickling (``torch.save(model)``, ``copy.deepcopy``)
records the mixin's kind and the base class, and :func:`rebuild` makes the subclass again on loading, in any process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

_CACHE: dict[tuple[type, type], type] = {}
_KINDS: dict[str, tuple[type, Callable[[type], dict] | None]] = {}


def register_kind(kind: str, mixin: type, namespace: Callable[[type], dict] | None = None, prefix: str = "MiT") -> None:
    """Declare a mixin (and how to build its class namespace for a base class) under a name used by pickling; its
    classes are named ``prefix + base.__name__`` (``"MiT"``; neural tuning uses ``"NT"``)."""
    mixin._mit_kind = kind
    mixin._mit_prefix = prefix
    _KINDS[kind] = (mixin, namespace)


def mit_subclass(mixin: type, base: type) -> type:
    """The class ``<prefix><base.__name__>(mixin, base)`` (created once per pair; prefix ``"MiT"`` by default)."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CACHE:
        make_namespace = _KINDS[mixin._mit_kind][1]
        module = sys.modules[__name__]
        name = f"{mixin._mit_prefix}{base.__name__}"
        while getattr(module, name, None) is not None:  # another family's class of the same name
            name += "_"
        attributes = {"__module__": __name__, "__qualname__": name, "_mit_base": base}
        attributes.update(make_namespace(base) if make_namespace is not None else {})
        cls = type(name, (mixin, base), attributes)
        setattr(module, name, cls)
        _CACHE[key] = cls
    return _CACHE[key]


def rebuild(kind: str, base: type):
    """Unpickling: an uninitialised instance of the MiT subclass of ``base`` for the mixin registered as ``kind``."""
    import mit.integrations  # registers the MiT kinds

    if kind not in _KINDS and kind.startswith("nt_"):
        import mit.neural  # noqa: F401  (registers neural tuning's kinds)

    cls = mit_subclass(_KINDS[kind][0], base)
    return cls.__new__(cls)


class Rebuildable:
    """Mixin part of every MiT subclass: pickles as (kind, base class, state), see :func:`rebuild`."""

    _mit_kind: str
    _mit_base: type

    def __reduce_ex__(self, protocol):
        return rebuild, (self._mit_kind, self._mit_base), self.__dict__.copy()
