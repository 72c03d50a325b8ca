"""MiT subclasses of a model's own classes, made on demand, so that ``apply_mit`` serves every family of the table.

``apply_mit`` switches an instance's ``__class__`` to ``MiT<Base>`` (a subclass of the mixin and the instance's own
class): the instance keeps its parameters, buffers, hooks and state-dict keys. The classes are cached and published in
this module's namespace under their name so that pickling a model (``torch.save(model)``) finds them again.
"""

from __future__ import annotations

import sys

_CACHE: dict[tuple[type, type], type] = {}


def mit_subclass(mixin: type, base: type, namespace: dict | None = None) -> type:
    """The class ``MiT<base.__name__>(mixin, base)`` with extra attributes ``namespace`` (created once per pair)."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CACHE:
        module = sys.modules[__name__]
        name = f"MiT{base.__name__}"
        while getattr(module, name, None) is not None:  # another family's class of the same name
            name += "_"
        attributes = {"__module__": __name__, "__qualname__": name, **(namespace or {})}
        cls = type(name, (mixin, base), attributes)
        setattr(module, name, cls)
        _CACHE[key] = cls
    return _CACHE[key]
