"""Training MiT on a base quantized with bitsandbytes: a guard against gradients that silently vanish.

bitsandbytes (0.50 at least) speeds up 4-bit inference on CPUs with AVX512-BF16 by repacking a ``Linear4bit``'s
weight the first time it runs in eval mode on an input without gradient (``quant_state.packing_format_for_cpu``), for
good. From then on its matmul runs a kernel with no autograd formula, in train mode too: the gradient that should flow
back through the layer is dropped (torch only warns "an autograd kernel was not registered"), so MiT's maps in every
layer before it would train on a wrong gradient without any error. :func:`check_no_cpu_packed_4bit` refuses that
case instead.
"""

from __future__ import annotations

import sys

from torch import nn


def cpu_packed_4bit_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose bitsandbytes 4-bit weight is held in bitsandbytes' CPU inference packing."""
    names = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            names.append(name)
    return names


def check_no_cpu_packed_4bit(model: nn.Module) -> None:
    """ValueError when a training forward would run through CPU-packed 4-bit layers (module docstring). Free when
    bitsandbytes was never imported (no model of this process can hold its layers)."""
    if "bitsandbytes" not in sys.modules:
        return
    packed = cpu_packed_4bit_layers(model)
    if packed:
        raise ValueError(
            f"{len(packed)} bitsandbytes 4-bit layers (e.g. {packed[0]}) hold their weights in bitsandbytes' CPU "
            "inference packing, made by an eval-mode forward without gradients; bitsandbytes computes no gradient "
            "through them, so the MiT maps before them would not train correctly. Load the quantized model again "
            "for training (and evaluate in train mode, or with gradients enabled, on CPU)"
        )


__all__ = ["check_no_cpu_packed_4bit", "cpu_packed_4bit_layers"]
