"""What the Triton kernels share: whether they run in Triton's CPU interpreter, and the dtype maps.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` functions are defined; the probe below is defined when this
module is first imported (by the kernel modules, which mit_kernels imports only on first use), so it tells how the
kernels were (or will be) defined.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import triton_interpreter_fix
from .reference import accumulator_dtype

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _probe():
    pass


def interpreter_active() -> bool:
    """True when the kernels are defined under TRITON_INTERPRET=1 (they then run on CPU tensors, in numpy)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


if interpreter_active():  # comparisons typed int1, as compiled code has them (Triton 3.9's interpreter: int32)
    triton_interpreter_fix.apply()


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return _TL_DTYPES[dtype]


def tl_accumulator(dtype: torch.dtype):
    """The Triton accumulator dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return tl_dtype(accumulator_dtype(dtype))


@dataclasses.dataclass
class Launch:
    """One kernel launch, built without launching: ``kernel[grid](*args, **kwargs)``. ``name`` names the pass and
    ``config`` its tile; ``python -m mit_kernels compile-check`` compiles exactly these for real GPU targets."""

    name: str
    kernel: object
    grid: tuple[int]
    args: tuple
    kwargs: dict
    config: object = None

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)
