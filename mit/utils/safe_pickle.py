"""Reading the pickled dataset files (MMSA's MOSI / MOSEI features, refer's ``refs(*).p``, MMUD) without running code.

The threat: a pickle is a small program for a stack machine. Its ``GLOBAL`` / ``STACK_GLOBAL`` opcodes import any
``module.name`` and ``REDUCE`` calls it with arguments from the file, so ``pickle.load`` of a file that somebody else
wrote can run anything (``os.system``, ``builtins.exec``, ...) with the user's rights, before the caller sees a value.
The published dataset files are pickles downloaded from mirrors and shared drives, and ``--data`` /
``--feature-file`` accept any path, so every one of them is read with :class:`RestrictedUnpickler`, which resolves
globals from a fixed table and refuses every other name (:class:`UnsafePickleError`, naming the file and the global).

What the table admits (what the formats contain, nothing that can reach other code):

- Python's own containers and scalars (``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``,
  ``bytes``): pickle builds them with dedicated opcodes and needs no globals, except that protocols 0-2 write
  ``bytes`` as ``_codecs.encode(text, "latin1")`` (admitted with exactly that encoding) or ``builtins.bytes()`` /
  ``__builtin__.bytes()`` (admitted without arguments only);
- numpy arrays, dtypes and scalars: ``numpy.ndarray``, ``numpy.dtype``, and ``_reconstruct`` / ``scalar`` of
  ``numpy._core.multiarray`` and ``_frombuffer`` of ``numpy._core.numeric`` (protocol 5), each also under the
  ``numpy.core`` names that numpy 1.x writes. These only build an array or a scalar of a dtype from bytes or from
  already unpickled objects;
- torch tensors, only when the caller asks for them (``tensors=True``; MMUD's CLIP embeddings are pickled tensors):
  ``collections.OrderedDict`` (the empty backward-hook dict a tensor pickles with), ``torch._utils._rebuild_tensor_v2``
  (checked: a storage, no hooks, no metadata) and ``torch.storage._load_from_bytes``, replaced by a function that reads
  the embedded storage with ``torch.load(weights_only=True, map_location="cpu")``, torch's own restricted unpickler
  (the original calls ``torch.load(weights_only=False)``).

Persistent ids (a ``torch.save`` file is not a plain pickle) are refused too. A genuine file that this refuses holds
some other Python object; load it once where its origin is trusted and re-save its data as containers and arrays.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

import numpy as np

ADMITTED = "Python containers, strings and numbers and numpy arrays"
ADMITTED_WITH_TENSORS = "Python containers, strings and numbers, numpy arrays and torch tensors"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside :mod:`mit.utils.safe_pickle`'s table; the message names the file and it."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2 names the package numpy.core
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy._core", "numpy.core"):  # numpy 2 writes numpy._core, numpy 1 numpy.core
        table[f"{package}.multiarray", "_reconstruct"] = multiarray._reconstruct
        table[f"{package}.multiarray", "scalar"] = multiarray.scalar
        table[f"{package}.numeric", "_frombuffer"] = numeric._frombuffer
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only the table of this module's docstring.

    ``source`` names the file in error messages; ``tensors`` admits torch tensors; ``encoding`` is passed on (refer's
    Python 2 pickles need ``"latin1"``)."""

    def __init__(self, file: IO[bytes], *, source: str, tensors: bool = False, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.source, self.tensors = source, tensors
        self._globals: dict[tuple[str, str], Any] = {
            **_numpy_globals(),
            ("_codecs", "encode"): self._latin1_bytes,
            ("builtins", "bytes"): self._empty_bytes,
            ("__builtin__", "bytes"): self._empty_bytes,  # Python 3 writes builtins as __builtin__ at protocols 0-2
        }
        if tensors:
            import torch._utils

            self._rebuild = torch._utils._rebuild_tensor_v2
            self._globals.update(
                {
                    ("collections", "OrderedDict"): OrderedDict,
                    ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                    ("torch.storage", "_load_from_bytes"): self._storage_from_bytes,
                }
            )

    def _refuse(self, what: str) -> UnsafePickleError:
        admitted = ADMITTED_WITH_TENSORS if self.tensors else ADMITTED
        return UnsafePickleError(
            f"refusing to load {what} from {self.source}: dataset pickles may only hold {admitted} (see "
            "mit.utils.safe_pickle); unpickling would import and may call it, which can run any code. If the file is "
            "genuine, load it once where its origin is trusted and re-save its data as containers and arrays"
        )

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        try:
            return self._globals[module, name]
        except KeyError:
            raise self._refuse(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse(f"a persistent id ({str(pid)[:60]})")

    def _latin1_bytes(self, text: Any, encoding: Any = "utf-8", *errors: Any) -> bytes:
        # protocols 0-2 write bytes as _codecs.encode(str(data, "latin1"), "latin1")
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors:
            raise self._refuse(f"_codecs.encode with {type(text).__name__}, {encoding!r} (only str, 'latin1')")
        return text.encode("latin1")

    def _empty_bytes(self, *args: Any) -> bytes:
        # protocols 0-2 write b"" as builtins.bytes()
        if args:
            raise self._refuse(f"builtins.bytes with arguments {str(args)[:60]} (only bytes())")
        return b""

    def _storage_from_bytes(self, data: Any) -> Any:
        import torch

        if not isinstance(data, bytes):
            raise self._refuse(f"torch.storage._load_from_bytes of {type(data).__name__} (only bytes)")
        try:
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise self._refuse(
                f"a torch storage that torch.load(weights_only=True) refuses ({weights_only_reason(error)})"
            ) from None
        if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
            raise self._refuse(f"torch.storage._load_from_bytes giving {type(storage).__name__} (only a storage)")
        return storage

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
        import torch

        requires_grad, hooks, metadata = (*rest, None, None, None)[:3]
        if (
            not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage))
            or not isinstance(requires_grad, (bool, type(None)))
            or not (hooks is None or (isinstance(hooks, dict) and not hooks))
            or not (metadata is None or (isinstance(metadata, dict) and not metadata))
            or len(rest) > 3
        ):
            raise self._refuse("torch._utils._rebuild_tensor_v2 with other arguments than a storage and no hooks")
        return self._rebuild(storage, offset, size, stride, bool(requires_grad), OrderedDict())


def weights_only_reason(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its error (whose first lines are generic advice)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y was not ...", "... GLOBAL x.y whose"
    if found:
        return f"it references the global {found.group(1).rstrip('.')}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return detail or type(error).__name__


def load_pickle(path: str | os.PathLike, *, tensors: bool = False, encoding: str = "ASCII") -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler` (``tensors`` admits torch tensors).

    Raises :class:`UnsafePickleError` (naming ``path`` and the refused global) for anything outside the table; other
    errors (truncated or corrupt files) propagate as ``pickle`` raises them."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=str(path), tensors=tensors, encoding=encoding).load()


__all__ = [
    "ADMITTED",
    "ADMITTED_WITH_TENSORS",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "load_pickle",
    "weights_only_reason",
]
