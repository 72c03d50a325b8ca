"""The package-level adapter life cycle, for both methods: load a trained model in one call
(:func:`from_pretrained`), switch between named adapters (:func:`set_adapter`), compute the base model for a while
(:func:`disable_adapter`), give the base model back (:func:`unload`).

Each function dispatches on the kind of model (MiT: :mod:`mit.integrations.model`; neural tuning:
:mod:`mit.neural.model`) or, for :func:`from_pretrained`, on the adapter directory's config file (``mit_config.json``
or ``neural_config.json``). Neural tuning is imported only when a neural model or adapter is met.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

from torch import nn

from .integrations.adapter import CONFIG_NAME, load_adapter
from .integrations.model import disable_mit_adapter, is_mit_model, unload_mit

NEURAL_CONFIG_NAME = "neural_config.json"  # mit.neural.adapter.CONFIG_NAME (checked by the tests)

__all__ = ["adapter_kind", "disable_adapter", "from_pretrained", "set_adapter", "unload"]


def _neural():
    import mit.neural

    return mit.neural


def _is_neural(model: object) -> bool:
    import sys

    neural = sys.modules.get("mit.neural")  # a neural model exists only once mit.neural was imported
    return neural is not None and neural.is_neural_model(model)


def _neither(model: object, what: str) -> ValueError:
    """The error for a model with neither method, naming ``model``."""
    return ValueError(
        f"model: {what} needs a model returned by mit.apply_mit or mit.apply_neural_tuning (or an adapter loader), "
        f"got {type(model).__name__}"
    )


def unload(model: nn.Module) -> nn.Module:
    """Remove the method (MiT or neural tuning) from ``model``, in place, and return the base model exactly as it was
    before it was applied (classes, parameters and state dict, hooks, attention implementation, ``requires_grad``;
    outputs bit for bit), every named adapter removed. ValueError naming ``model`` for a model with neither method."""
    if is_mit_model(model):
        return unload_mit(model)
    if _is_neural(model):
        return _neural().unload_neural(model)
    raise _neither(model, "unload")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter ``model`` (MiT or neural tuning) computes with: ``model.set_adapter``
    (adapters are added with ``model.add_adapter(config, name)`` or ``mit.load_adapter(model, directory, name)``).
    ValueError naming ``model`` for a model with neither method, or naming ``adapter_name`` when it has no such
    adapter."""
    if is_mit_model(model) or _is_neural(model):
        return model.set_adapter(adapter_name)
    raise _neither(model, "set_adapter")


def disable_adapter(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager: inside it, ``model`` (MiT or neural tuning) computes its base model, bit for bit; the method's
    own inputs (``modality_embedding``; ``image_features`` / ``image_mask``) are accepted and ignored. ValueError
    naming ``model`` for a model with neither method."""
    if is_mit_model(model):
        return disable_mit_adapter(model)
    if _is_neural(model):
        return _neural().disable_neural_adapter(model)
    raise _neither(model, "disable_adapter")


def adapter_kind(adapter_dir: str | os.PathLike) -> str:
    """``"mit"`` or ``"neural"``: which method's adapter ``adapter_dir`` holds, from its config file's name.
    ValueError naming ``adapter_dir`` when it is not a directory or holds neither config file (or both)."""
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise ValueError(f"adapter_dir must be a path, got {type(adapter_dir).__name__}")
    directory = pathlib.Path(adapter_dir)
    if not directory.is_dir():
        raise ValueError(f"adapter_dir {str(directory)!r} is not a directory")
    found = [
        kind for kind, name in (("mit", CONFIG_NAME), ("neural", NEURAL_CONFIG_NAME)) if (directory / name).is_file()
    ]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ValueError(
            f"adapter_dir {str(directory)!r} holds {what} of {CONFIG_NAME} (an MiT adapter, mit.save_adapter) and "
            f"{NEURAL_CONFIG_NAME} (a neural-tuning adapter, mit.save_neural_adapter); expected exactly one"
        )
    return found[0]


def from_pretrained(
    base_or_name: nn.Module | str | os.PathLike, adapter_dir: str | os.PathLike, *, tokenizer=None, **model_kwargs
) -> nn.Module:
    """A trained model in one call: the base model, with the adapter of ``adapter_dir`` loaded into it.

    ``base_or_name``: a plain model instance (changed in place), or a name / directory that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with ``model_kwargs`` (``dtype=...``,
    ``attn_implementation=...``, ...) passed to it by keyword. The adapter's kind comes from its config file
    (:func:`adapter_kind`, checked before the base model is loaded): an MiT adapter goes through
    :func:`mit.load_adapter`, a neural-tuning one through :func:`mit.load_neural_adapter` (with ``tokenizer``, which
    gets the adapter's new tokens). Every check of those loaders applies; any problem is a ValueError naming the
    argument or the file, and a given model instance is then left as it was."""
    kind = adapter_kind(adapter_dir)
    if tokenizer is not None and kind == "mit":
        raise ValueError("tokenizer: an MiT adapter adds no tokens; pass tokenizer only with a neural-tuning adapter")
    if isinstance(base_or_name, nn.Module):
        if model_kwargs:
            raise ValueError(
                f"model_kwargs {sorted(model_kwargs)} are for loading the base model by name; base_or_name is already "
                f"a model ({type(base_or_name).__name__})"
            )
        model = base_or_name
    elif isinstance(base_or_name, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(os.fspath(base_or_name), **model_kwargs)
    else:
        raise ValueError(
            f"base_or_name must be a model or a name / directory for AutoModelForCausalLM.from_pretrained, got "
            f"{type(base_or_name).__name__}"
        )
    if kind == "mit":
        return load_adapter(model, adapter_dir)
    return _neural().load_neural_adapter(model, adapter_dir, tokenizer=tokenizer)
