"""MiT subclasses of a model's own classes, made on demand, so that ``apply_mit`` serves every family of the table.

``apply_mit`` switches an instance's ``__class__`` to ``MiT<Base>`` (a subclass of a mixin and the instance's own
class): the instance keeps its parameters, buffers, hooks and state-dict keys. The classes are cached per (mixin,
base) and published in this module's namespace under their name. Pickling (``torch.save(model)``, ``copy.deepcopy``)
records the mixin's kind and the base class, and :func:`rebuild` makes the subclass again on loading, in any process.
The top-level classes also refuse transformers' ``save_pretrained`` / ``from_pretrained``
(:class:`RefusesPretrained`): the method's adapter functions save and load them.
"""

from __future__ import annotations

import os
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


class RefusesPretrained:
    """Mixin of the MiT / neural-tuning classes of transformers models (``PreTrainedModel`` subclasses): their
    ``save_pretrained`` and ``from_pretrained`` are refused.

    transformers' ``save_pretrained`` would write the base model with the method's parameters as extra keys, which
    ``from_pretrained`` drops as unexpected ("can be ignored"): the model would come back plain, and a
    ``modality_embedding`` given to it would be ignored. The base model's own directory and the method's adapter
    (``_pretrained_hint``: the functions that save and load it) round-trip exactly instead."""

    _method: str  # "MiT", "neural tuning"
    _pretrained_hint: tuple[str, str]  # ("mit.save_adapter", "mit.load_adapter")

    def save_pretrained(self, save_directory: str | os.PathLike | None = None, *args, **kwargs) -> None:
        """Refused (see the class docstring): ValueError pointing to the adapter functions."""
        save, load = self._pretrained_hint
        raise ValueError(
            f"{type(self).__name__}.save_pretrained({str(save_directory)!r}): transformers would save the base model "
            f"with the {self._method} parameters as keys that from_pretrained drops, so the model would come back "
            f"without {self._method}. Save the {self._method} adapter with {save}(model, directory) instead, and "
            f"load it into the base model (from its own directory) with {load}(base_model, directory)"
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Refused (see the class docstring): ValueError pointing to the base class and the adapter loader."""
        base = getattr(cls, "_mit_base", None)
        base_name = base.__name__ if base is not None else "the base model class"
        raise ValueError(
            f"{cls.__name__}.from_pretrained: a model with {cls._method} is not loaded from a Hugging Face directory; "
            f"load the base model with {base_name}.from_pretrained(...) (or an Auto class), then its {cls._method} "
            f"adapter with {cls._pretrained_hint[1]}(model, adapter_directory)"
        )
