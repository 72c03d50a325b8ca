"""mit_kernels.triton_interpreter_fix: comparisons typed int1 (a scalar comparison broadcast into a store mask works),
device-function calls that do not re-patch triton.language, and nothing left patched after a launch."""

from __future__ import annotations

import pytest
import torch

from mit_kernels.dispatch import triton_interpreter_active

pytestmark = pytest.mark.skipif(
    not triton_interpreter_active(), reason="corrects Triton's CPU interpreter; compiled kernels do not use it"
)


if triton_interpreter_active():  # the jit functions must be module globals to call one another
    import triton
    import triton.language as tl

    from mit_kernels import triton_common  # noqa: F401  (applies the corrections, as the kernel modules do)

    @triton.jit
    def _row_limit(offs, first, L):
        return (offs < L) & (first < L)  # a (BLOCK,) block & a scalar comparison, broadcast

    @triton.jit
    def _masked_fill(out, first_ptr, L, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        first = tl.load(first_ptr)
        tl.store(out + offs, offs.to(tl.float32) + 1.0, mask=_row_limit(offs, first, L))


@pytest.fixture(scope="module")
def kernels():
    return _masked_fill


def test_the_corrections_needed_here_are_applied_and_the_defect_is_gone():
    from mit_kernels import triton_common  # noqa: F401
    from mit_kernels import triton_interpreter_fix as fix

    applied = fix.apply()
    assert set(applied) <= {"comparison_dtype", "patch_lang_once"}
    assert not fix.comparison_dtype_is_wrong()
    assert fix.apply() == applied  # idempotent


@pytest.mark.parametrize("length, first, expected_filled", [(5, 0, 5), (5, 7, 0), (16, 3, 16), (1, 0, 1)])
def test_a_scalar_comparison_broadcast_into_a_store_mask(kernels, length, first, expected_filled):
    out = torch.zeros(16)
    kernels[(1,)](out, torch.tensor([first], dtype=torch.int32), length, BLOCK=16)
    expected = torch.zeros(16)
    expected[:expected_filled] = torch.arange(1, expected_filled + 1, dtype=torch.float32)
    assert torch.equal(out, expected)


def test_a_launch_leaves_triton_language_as_it_found_it(kernels):
    import triton.language as tl

    load, where = tl.load, tl.where
    kernels[(2,)](torch.zeros(16), torch.tensor([0], dtype=torch.int32), 4, BLOCK=16)
    assert tl.load is load and tl.where is where
    assert tl.core.is_builtin(tl.load)
