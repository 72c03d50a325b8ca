"""A method's subclasses of a model's own classes, made on demand, so that one method serves every family of the table.

Applying a method switches an instance's ``__class__`` to ``<prefix><Base>`` (a subclass of the method's mixin and
the instance's own class, e.g. ``MiTLlamaForCausalLM``, ``NTLlamaModel``): the instance keeps its parameters,
buffers, hooks and state-dict keys, and the method's undo gives the base class back (``instance._mit_base``).

The classes are cached per (mixin, base) and published in this module's namespace under their name. Pickling
(``torch.save(model)``, ``copy.deepcopy``) records the mixin by its module path and qualified name plus the base class,
and :func:`rebuild` imports the mixin's module by that path and makes the subclass again, in any process: no registry
and no name-prefix lookup, so this module imports no method.
"""

from __future__ import annotations

import importlib
import sys


class Rebuildable:
    """Mixin part of every method subclass: pickles as (mixin, base class, state), see :func:`rebuild`.

    Class attributes a method's mixin sets: ``_mit_prefix`` (the prefix of its classes' names: ``"MiT"``, ``"NT"``).
    A mixin whose subclasses need attributes built from the base class (a ``forward`` with the base signature plus
    the method's keyword-only inputs) overrides :meth:`subclass_attributes`."""

    _mit_prefix: str = "MiT"
    _mit_base: type

    @classmethod
    def subclass_attributes(cls, base: type) -> dict:
        """Attributes of ``<prefix><base>`` beyond the mixin's own (none by default)."""
        return {}

    def __reduce_ex__(self, protocol):
        mixin = method_mixin_of(type(self))
        return rebuild, (mixin.__module__, mixin.__qualname__, self._mit_base), self.__dict__.copy()


_CACHE: dict[tuple[type, type], type] = {}


def method_mixin_of(cls: type) -> type:
    """The method mixin ``cls`` was made from (``cls`` itself when it is a mixin)."""
    if "_mit_base" not in cls.__dict__:
        return cls
    return next(b for b in cls.__bases__ if issubclass(b, Rebuildable))


def method_subclass(mixin: type, base: type) -> type:
    """The class ``<mixin._mit_prefix><base.__name__>(mixin, base)``, created once per pair; ``base`` itself when it
    is already one."""
    if not (isinstance(mixin, type) and issubclass(mixin, Rebuildable)):
        raise ValueError(f"mixin must be a subclass of mit.hf.classes.Rebuildable, got {mixin!r}")
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CACHE:
        module = sys.modules[__name__]
        name = f"{mixin._mit_prefix}{base.__name__}"
        while getattr(module, name, None) is not None:  # another family's class of the same name
            name += "_"
        attributes = {"__module__": __name__, "__qualname__": name, "_mit_base": base}
        attributes.update(mixin.subclass_attributes(base))
        cls = type(name, (mixin, base), attributes)
        setattr(module, name, cls)
        _CACHE[key] = cls
    return _CACHE[key]


def rebuild(mixin_module: str, mixin_name: str, base: type):
    """Unpickling: an uninitialised instance of the subclass of ``base`` for the mixin ``mixin_module.mixin_name``,
    imported by that path (only modules of this package are accepted)."""
    if not (mixin_module == "mit" or mixin_module.startswith("mit.")):
        raise ValueError(f"mixin_module: expected a module of the mit package, got {mixin_module!r}")
    mixin = importlib.import_module(mixin_module)
    for part in mixin_name.split("."):
        mixin = getattr(mixin, part)
    cls = method_subclass(mixin, base)
    return cls.__new__(cls)
