"""What makes a method reversible on a model, whatever the method: the base parameters' ``requires_grad`` recorded
before freezing and given back, hooks removed by the bound method that registered them (so removal works after
``copy.deepcopy`` / pickling, where a registration's handle would not), the method's classes switched back, and the
nesting depth of ``disable_adapter()`` contexts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator

from torch import nn


def freeze(model: nn.Module) -> dict[str, bool]:
    """Set ``requires_grad=False`` on every parameter of ``model`` and return what each one had, by name."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    return before


def restore_requires_grad(model: nn.Module, before: dict[str, bool]) -> None:
    """Give every parameter named in ``before`` (from :func:`freeze`) its recorded ``requires_grad``."""
    for name, param in model.named_parameters():
        if name in before:
            param.requires_grad_(before[name])


def remove_hooks(module: nn.Module, owners: Collection[object], methods: Collection[Callable], pre: bool) -> None:
    """Remove from ``module``'s forward (``pre``: forward pre-) hooks those that are a method in ``methods`` bound to
    an object in ``owners``; other hooks keep their place."""
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    owner_ids = {id(owner) for owner in owners}
    for key, hook in list(hooks.items()):
        if id(getattr(hook, "__self__", None)) in owner_ids and getattr(hook, "__func__", None) in methods:
            del hooks[key]
            if pre:
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            else:
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def restore_class(module: nn.Module) -> None:
    """Switch a method subclass instance back to its own class (``_mit_base``)."""
    module.__class__ = module._mit_base


def disabled_depth(model: nn.Module, attribute: str) -> int:
    """How many ``disable_adapter()`` contexts are open on ``model`` (counted in the instance attribute
    ``attribute``)."""
    return model.__dict__.get(attribute, 0)


@contextlib.contextmanager
def disabled(model: nn.Module, attribute: str, on_first: Callable[[], None] | None = None,
             on_last: Callable[[], None] | None = None) -> Iterator[None]:  # fmt: skip
    """One nesting level of a ``disable_adapter()`` context on ``model``; ``on_first`` runs when the outermost one
    opens, ``on_last`` when it closes (also after an exception)."""
    previous = disabled_depth(model, attribute)
    model.__dict__[attribute] = previous + 1
    if not previous and on_first is not None:
        on_first()
    try:
        yield
    finally:
        if previous:
            model.__dict__[attribute] = previous
        else:
            model.__dict__.pop(attribute, None)
            if on_last is not None:
                on_last()
