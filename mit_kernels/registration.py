"""The one way MiT's operators are registered with ``torch.library``: a forward / backward op pair per backend.

Every fused operator is a pair ``<name>_fwd`` / ``<name>_bwd`` whose shape rule and FLOP formulas come from its
:class:`mit_kernels.op_kinds.OpKind`. Two helpers register a pair:

- :func:`define_op_pair` for ops implemented in Python (the Triton kernels' launchers, the reference's opaque softmax
  attention): defines both custom ops from their implementations (the schema is read from the type hints), and
  registers their fake kernels, the forward's autograd (the backward op is its derivative) and their FLOP formulas;
- :func:`register_fake_and_flops` for ops defined elsewhere with their own autograd (the C++ kernels, which register
  their schemas and autograd in ``csrc/ops.cpp``): their fake kernels and FLOP formulas.

The fake kernels let torch.compile trace through the ops without a graph break (``fullgraph=True`` holds) and let
``FlopCounterMode`` count them on the meta device; the FLOP formulas make ``FlopCounterMode`` count them at all.

The autograd of :func:`define_op_pair` saves the tensors that get a gradient (and the forward's outputs when the kind
says so), refuses double backward (the backward ops have no derivative: a second-order gradient would be silently
wrong), and, when the forward was called with ``fallback=True`` and the backward kernel fails in a way the backend's
:class:`Fallback` recognises, records the failure and computes the gradients through the fallback path instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

from .op_kinds import OpKind
from .validation import refuse_double_backward


@dataclass(frozen=True)
class Fallback:
    """What a backward does when its kernel cannot run and the forward was called with ``fallback=True`` (its last
    argument; ``backend="auto"`` sets it).

    Attributes:
        is_failure: whether an exception from the backward op means the kernel could not be compiled or launched on
            this device (else it propagates).
        record: ``record(device, exc)`` notes the failure (and warns once).
        forward: the exact path to differentiate instead, with the forward op's arguments (fallback flag excluded);
            its forward is recomputed from the saved inputs.
    """

    is_failure: Callable[[BaseException], bool]
    record: Callable[[torch.device, BaseException], None]
    forward: Callable[..., torch.Tensor]


def _op_packet(qualname: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.<namespace>.<name>`` for ``"<namespace>::<name>"``."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def _register_flop_formulas(name: str, kind: OpKind) -> None:
    """``FlopCounterMode`` formulas of ``<name>_fwd`` and ``<name>_bwd`` from ``kind``."""

    def forward_flops(*shapes: object, out_shape: object = None, **kwargs: object) -> int:
        return kind.flops(*shapes)

    def backward_flops(grad_out_shape: object, *shapes: object, out_shape: object = None, **kwargs: object) -> int:
        return kind.backward_flops(*shapes)

    register_flop_formula(_op_packet(f"{name}_fwd"))(forward_flops)
    register_flop_formula(_op_packet(f"{name}_bwd"))(backward_flops)


def register_fake_and_flops(name: str, kind: OpKind) -> None:
    """Fake kernels and FLOP formulas of the already defined ops ``<name>_fwd`` and ``<name>_bwd`` (e.g.
    ``"mit_kernels::attention_cpu"``, whose schema and autograd the C++ extension registers)."""
    torch.library.register_fake(f"{name}_fwd")(kind.outputs)
    torch.library.register_fake(f"{name}_bwd")(kind.gradient_outputs)
    _register_flop_formulas(name, kind)


def recomputed_gradients(
    forward: Callable[..., torch.Tensor],
    grad_out: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    arguments: tuple,
) -> tuple[torch.Tensor, ...]:
    """The gradients of ``forward(*inputs, *arguments)`` w.r.t. ``inputs`` for the upstream gradient ``grad_out`` (the
    output's shape), its forward recomputed on detached copies; zeros where it does not depend on an input (as a fused
    backward gives, e.g. lambda without rescale)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    with torch.enable_grad():
        out = forward(*leaves, *arguments)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))


def define_op_pair(
    name: str,
    kind: OpKind,
    forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    backward: Callable[..., tuple[torch.Tensor, ...]],
    *,
    backend: str,
    fallback: Fallback | None = None,
) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Define the custom ops ``<name>_fwd`` (implemented by ``forward``) and ``<name>_bwd`` (``backward``), with fake
    kernels, autograd and FLOP formulas from ``kind``; returns them (callable like the functions).

    Args:
        name: ``"<namespace>::<op>"``, e.g. ``"mit_kernels::attention_triton"``.
        kind: the operator's argument layout, shape rule and FLOP formulas.
        forward: the forward's implementation, with type hints (they give the schema) and the layout of ``kind``;
            with a ``fallback``, its last argument is ``fallback: bool = False``.
        backward: the backward's implementation (layout of ``kind``): the gradients of the tensors that get one.
        backend: how the backend is named when double backward is refused (e.g. ``"triton"``).
        fallback: what the backward does when its kernel cannot run and the forward was called with
            ``fallback=True``; None: every error propagates.
    """
    forward_op = torch.library.custom_op(f"{name}_fwd", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"{name}_bwd", backward, mutates_args=())
    forward_op.register_fake(kind.outputs)
    backward_op.register_fake(kind.gradient_outputs)
    split = kind.tensors - kind.gradients  # the tensors without a gradient come first in ctx.arguments

    def setup_context(ctx, inputs: tuple, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*inputs[: kind.gradients], *(outputs if kind.saves_outputs else ()))
        ctx.num_inputs = len(inputs)
        ctx.fallback = fallback is not None and bool(inputs[-1])
        ctx.arguments = inputs[kind.gradients : len(inputs) - (fallback is not None)]
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])

    def differentiate(ctx, grad_out: torch.Tensor, *unused_grads: torch.Tensor | None) -> tuple:
        saved = ctx.saved_tensors
        refuse_double_backward(f"{name}_fwd", backend, (*saved, grad_out))
        inputs, outputs = saved[: kind.gradients], saved[kind.gradients :]
        arguments = ctx.arguments
        try:
            grads = backward_op(grad_out, *inputs, *arguments[:split], *outputs, *arguments[split:])
        except Exception as exc:
            if not (ctx.fallback and fallback.is_failure(exc)):
                raise
            fallback.record(inputs[0].device, exc)
            grads = recomputed_gradients(fallback.forward, grad_out, inputs, arguments)
        return (*grads, *([None] * (ctx.num_inputs - kind.gradients)))

    forward_op.register_autograd(differentiate, setup_context=setup_context)
    _register_flop_formulas(name, kind)
    return forward_op, backward_op
