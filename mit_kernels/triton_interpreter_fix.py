"""Two corrections for Triton's CPU interpreter, each applied only where the interpreter has what it corrects.

**Comparison dtype.**
Triton 3.9's interpreter gives a comparison's result the dtype of its *operands* (``int32`` for ``offs < L``) while
its values are numpy bools. Used directly that goes unnoticed, but a scalar comparison broadcast to a block
(``(offs_m < Lq) & (first < Lk)``) is splatted through that dtype: the block becomes ``int32``, ``&`` with it gives
``int32``, and ``tl.store(..., mask=)`` refuses it ("mask has unsupported dtype"). Compiled for a GPU the same code is
correct (comparisons are ``i1``), so the kernels stay as they are and the interpreter is corrected instead: every
integer / float comparison returns a handle of dtype ``int1``, as compiled code has.

:func:`apply` probes the defect (one comparison of two ``int32`` handles) and patches nothing when the interpreter
already answers ``int1``, so a fixed Triton release runs untouched. It changes only comparisons' result dtype, which
Triton's own semantics define as ``int1``; values are not touched.

**Device-function calls.** Every call of a ``@triton.jit`` helper from a running kernel patches ``triton.language``
again (Triton 3.6-3.9: ``InterpretedFunction.__call__`` runs ``_patch_lang``, an ``inspect.getmembers`` scan of the
language modules), although the kernel's launch already patched them and keeps them patched until it returns; the
second pass finds nothing left to patch. The kernels here are written as small helpers (tile loads, the gate, the
infusion), so that scan was about a third of an interpreted launch. :func:`apply` makes ``_patch_lang`` return at
once, with an empty scope, when every language module the function sees is already patched (``load`` is no longer
Triton's builtin); the launch's own call, which finds them unpatched, runs Triton's code unchanged.
"""

from __future__ import annotations

import functools

import numpy as np

_COMPARISONS = tuple(
    f"create_{kind}cmp{op}"
    for kind, ops in (
        ("i", ("EQ", "NE", "SLT", "SLE", "SGT", "SGE", "ULT", "ULE", "UGT", "UGE")),
        ("f", ("OEQ", "ONE", "OLT", "OLE", "OGT", "OGE", "UEQ", "UNE", "ULT", "ULE", "UGT", "UGE")),
    )
    for op in ops
)


def comparison_dtype_is_wrong() -> bool:
    """True when the interpreter gives ``int32 < int32`` a dtype other than ``int1`` (Triton 3.9)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    a = TensorHandle(np.array([1], dtype=np.int32), tl.int32)
    b = TensorHandle(np.array([2], dtype=np.int32), tl.int32)
    return InterpreterBuilder().create_icmpSLT(a, b).dtype != tl.int1


def _as_int1(method):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    @functools.wraps(method)
    def comparison(self, lhs, rhs):
        result = method(self, lhs, rhs)
        return TensorHandle(result.data.astype(np.bool_, copy=False), tl.int1)

    comparison.mit_kernels_int1 = True
    return comparison


def _languages(fn) -> list:
    import triton.language as tl

    return [value for value in fn.__globals__.values() if value is tl or value is tl.core]


def _skip_when_patched(patch_lang, scope_type):
    import triton.language as tl

    @functools.wraps(patch_lang)
    def patch_once(fn):
        languages = _languages(fn)
        if languages and not any(tl.core.is_builtin(getattr(lang, "load", None)) for lang in languages):
            return scope_type()  # the running launch patched them; it restores them when it returns
        return patch_lang(fn)

    patch_once.mit_kernels_once = True
    return patch_once


@functools.cache
def apply() -> tuple[str, ...]:
    """Apply the corrections this Triton's interpreter needs; the names of those applied. Idempotent."""
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpreterBuilder

    applied = []
    if comparison_dtype_is_wrong():
        for name in _COMPARISONS:
            method = getattr(InterpreterBuilder, name, None)
            if method is not None and not getattr(method, "mit_kernels_int1", False):
                setattr(InterpreterBuilder, name, _as_int1(method))
        applied.append("comparison_dtype")
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is not None and scope_type is not None and not getattr(patch_lang, "mit_kernels_once", False):
        interpreter._patch_lang = _skip_when_patched(patch_lang, scope_type)
        applied.append("patch_lang_once")
    return tuple(applied)
