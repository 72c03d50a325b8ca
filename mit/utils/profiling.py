"""Peak memory of a function, on CPU or CUDA (used by benchmarks/ and the demos).

CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the call.

CPU (no allocator statistics exist): a ``TorchDispatchMode`` that sees every tensor an operator returns, adds its
storage's bytes when the storage is first seen and subtracts them when the storage is freed (``weakref.finalize``).
An output that shares its storage with one of the operator's inputs (a view such as a weight's ``.t()``, an
in-place result) is not an allocation and is not counted, so tensors that existed before the call (weights, inputs)
never are, whatever views of them the call takes. The peak of that running total above the start is exact for every
tensor visible to the dispatcher, i.e. every operator output. Scratch memory that a single operator allocates and
frees internally (inside ATen's CPU flash attention, or inside one of our C++ kernels) is not seen; it is O(tile) for
the flash-style kernels compared here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """Tracks the bytes of live storages created under the mode and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs aliasing an input (views, in-place ops) are not new allocations: skip them, or a view of a tensor
        # that existed before the mode (e.g. ``weight.t()`` in every nn.Linear) would be counted as allocated.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or key in inputs or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it (outputs dropped afterwards)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = LiveTensorMemory()
    with tracker:
        fn()
    return tracker.peak
