"""A method's ``forward``: the base class's signature with the method's keyword-only inputs spliced in before its
``**kwargs`` (so ``generate()``, which inspects the signature, accepts and routes them), and the route they take to
the layers: transformers' ``**kwargs``."""

from __future__ import annotations

import dataclasses
import inspect

import torch


@dataclasses.dataclass(frozen=True)
class SplicedSignature:
    """``base.forward``'s signature (``base``), the one with the method's inputs (``spliced``), and the name of its
    ``**kwargs`` parameter (``var_keyword``: where the method's per-call values travel to the layers)."""

    base: inspect.Signature
    spliced: inspect.Signature
    var_keyword: str


def keyword_input(name: str) -> inspect.Parameter:
    """A keyword-only ``name: torch.Tensor | None = None`` parameter."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.Tensor | None)


def splice_keyword_inputs(base: type, names: tuple[str, ...], method: str) -> SplicedSignature:
    """``base.forward``'s signature with keyword-only tensor inputs ``names`` before its ``**kwargs``; ValueError
    naming ``base`` when its forward takes no ``**kwargs`` (``method``'s values could not reach the layers)."""
    signature = inspect.signature(base.forward)
    parameters = list(signature.parameters.values())
    var_keyword = next((p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        raise ValueError(f"{base.__name__}.forward takes no **kwargs: the {method} inputs cannot reach its layers")
    where = parameters.index(var_keyword)
    extra = [keyword_input(name) for name in names]
    spliced = signature.replace(parameters=[*parameters[:where], *extra, *parameters[where:]])
    return SplicedSignature(signature, spliced, var_keyword.name)
