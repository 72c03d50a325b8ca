"""A copy of a model's modules that shares the original's weight tensors: for side-by-side timing of two models.

A ratio of two models' speeds measures one model's extra cost only when both read the same weight memory. A plain
``copy.deepcopy`` gives the copy new, freshly allocated tensors, and where the original's were not (a checkpoint
memory-mapped from a safetensors file, whose tensors need not be 64-byte aligned) a step that streams every weight
can run a few percent faster on the copy than on the original, whatever else differs.
"""

from __future__ import annotations

import copy

from torch import nn


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original's tensors (the same objects), while
    every module is new: changing the copy's structure (``mit.apply_mit``) leaves ``model`` as it was, and an in-place
    change of a shared weight shows in both."""
    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, shared)
