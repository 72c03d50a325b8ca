"""What every method's top-level model class adds to a transformers model, whatever the method: transformers'
``save_pretrained`` / ``from_pretrained`` refused with a pointer to the method's adapter functions, and peft's
``print_trainable_parameters``."""

from __future__ import annotations

import os

from .decoder import count_parameters


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


class MethodModelMixin(RefusesPretrained):
    """Mixin part of a method's top-level model class (``MiT<Model>``, ``NT<Model>``)."""

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
        trainable, total = count_parameters(self)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )
