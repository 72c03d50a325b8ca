"""The model-surgery floor every method stands on (MiT in :mod:`mit.integrations`, neural tuning in :mod:`mit.neural`).

- :mod:`.families`: the supported decoder families (one table entry per ``model_type``);
- :mod:`.classes`: a method's subclasses of a model's own classes, made on demand and rebuilt on unpickling by the
  mixin's module path;
- :mod:`.method_model`: what every method's top-level class adds (``save_pretrained`` / ``from_pretrained`` refused
  with a pointer to the adapter functions, ``print_trainable_parameters``);
- :mod:`.decoder`: ``decoder_of``, padding-aware positions, parameter counts;
- :mod:`.signature`: a method's ``forward``: the base signature with the method's keyword-only inputs;
- :mod:`.parameters`: the dtype of a method's trainable parameters;
- :mod:`.reversible`: freezing and its undo, hook removal by owner, ``disable_adapter()`` nesting;
- :mod:`.adapter_files` / :mod:`.directory_swap`: the adapter directory (one reader, validator and writer; each
  method declares its :class:`~mit.hf.adapter_files.AdapterSchema`) written and read as one unit.

Nothing here imports a method: the methods import this package, and :mod:`mit.lifecycle` sits above both.
"""

from __future__ import annotations

from .adapter_files import AdapterSchema, read_adapter, write_adapter
from .classes import Rebuildable, method_subclass
from .decoder import count_parameters, decoder_of, padding_aware_position_ids
from .families import FAMILIES, FamilySpec, family_of
from .method_model import MethodModelMixin, RefusesPretrained
from .signature import splice_keyword_inputs

__all__ = [
    "FAMILIES",
    "AdapterSchema",
    "FamilySpec",
    "MethodModelMixin",
    "Rebuildable",
    "RefusesPretrained",
    "count_parameters",
    "decoder_of",
    "family_of",
    "method_subclass",
    "padding_aware_position_ids",
    "read_adapter",
    "splice_keyword_inputs",
    "write_adapter",
]
