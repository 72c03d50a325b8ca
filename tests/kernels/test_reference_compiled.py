"""``backend="reference"`` under ``torch.compile(fullgraph=True)`` keeps eager's non-finite contract: a NaN or an Inf
in a key a row does not see (padding, the causal future) never reaches that row, in the output or in any gradient
(mit_kernels/reference_op.py). Compiled and eager agree exactly, NaN / Inf placement included; the attention runs as
the opaque op ``mit_kernels::reference_attention_fwd`` (one graph, no break), with its backward and FLOP formulas."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_attention_inputs
from torch.utils.flop_counter import FlopCounterMode

from mit_kernels import mit_attention

CPU = torch.device("cpu")
NAMES = ("q", "k", "v", "k_mul", "k_add", "v_mul", "v_add", "head_logit")


def _layer(causal: bool, kv_mask: torch.Tensor | None):
    def layer(*inputs):
        return mit_attention(*inputs, causal=causal, kv_mask=kv_mask, backend="reference")

    return layer


def _poison(inputs: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    """Copies of ``inputs`` (B=2, Lk=6) with non-finite values placed at ``where``."""
    q, k, v, *rest = (x.clone() for x in inputs)
    if where == "padded keys":  # sample 0 pads its last two keys (kv_mask below)
        k[0, :, -1, 3] = float("inf")
        v[0, :, -2, 1] = float("nan")
        v[0, :, -1, 0] = float("-inf")
    elif where == "causal future":  # query row 0 of a 3-row causal block sees keys 0..3 of 6
        k[1, 0, 5, 2] = float("nan")
        v[1, 1, 4, 0] = float("inf")
    elif where == "visible key":
        v[1, 0, 0, 2] = float("inf")
    elif where == "query row":
        q[0, 1, 2, 0] = float("nan")
    return [q, k, v, *rest]


def _run(fn, inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaves, allow_unused=True)
    return out, grads


def _assert_same(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN placement differs"
    assert torch.equal(got.isinf(), expected.isinf()), f"{name}: Inf placement differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(got[got.isinf()], expected[expected.isinf()]), f"{name}: Inf signs differ"


@pytest.mark.parametrize("where", ["padded keys", "causal future", "visible key", "query row", "finite"])
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_reference_keeps_the_nonfinite_contract(where, causal):
    inputs = _poison(make_attention_inputs(2, 4, 2, 3, 6, 8, torch.float32, device=CPU), where)
    kv_mask = torch.ones(2, 6, dtype=torch.bool)
    kv_mask[0, -2:] = False
    layer = _layer(causal, kv_mask)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    expected_out, expected_grads = _run(layer, inputs)
    got_out, got_grads = _run(compiled, inputs)
    _assert_same(got_out, expected_out, "out")
    for name, got, expected in zip(NAMES, got_grads, expected_grads):
        _assert_same(got, expected, f"d{name}")
    if where in ("padded keys", "finite"):
        # what the contract means here: sample 0's padded NaN / Inf keys leave every output and every query's gradient
        # finite, and the gradients of every key but the poisoned ones themselves
        assert torch.isfinite(got_out).all() and torch.isfinite(got_grads[0]).all()
        for grad in got_grads[1:3]:
            assert torch.isfinite(grad[1]).all() and torch.isfinite(grad[0, :, :-2]).all()
    if where == "causal future" and causal:  # query row 0 sees keys 0..3 only
        assert torch.isfinite(got_out[1, :, 0]).all() and torch.isfinite(got_grads[0][1, :, 0]).all()
        assert not torch.isfinite(got_out[1, :, 2]).all()  # row 2 sees both


def test_compiled_reference_matches_eager_with_inductor():
    """The default compiler too (one case: inductor compiles C++ on the fly, which takes seconds)."""
    inputs = _poison(make_attention_inputs(2, 2, 1, 4, 6, 8, torch.float32, device=CPU), "padded keys")
    kv_mask = torch.ones(2, 6, dtype=torch.bool)
    kv_mask[0, -2:] = False
    layer = _layer(True, kv_mask)
    expected_out, expected_grads = _run(layer, inputs)
    got_out, got_grads = _run(torch.compile(layer, fullgraph=True), inputs)
    assert torch.isfinite(got_out).all()
    _assert_same(got_out, expected_out, "out")
    for name, got, expected in zip(NAMES, got_grads, expected_grads):
        _assert_same(got, expected, f"d{name}")


def test_compiled_graph_holds_the_opaque_reference_op():
    inputs = make_attention_inputs(1, 2, 1, 3, 5, 8, torch.float32, device=CPU)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(_layer(True, None), backend=capture, fullgraph=True)(*inputs)
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert any("reference_attention_fwd" in target for target in targets), targets


def test_reference_op_counts_flops():
    """Forward 4 B Hq Lq Lk D, backward 10 B Hq Lq Lk D, like the fused ops; counted on the meta device (its fake
    kernels), as benchmarks/flops.py counts."""
    q, k, v = (x.to("meta") for x in make_attention_inputs(1, 4, 2, 5, 7, 8, torch.float32, device=CPU)[:3])
    ops = torch.ops.mit_kernels
    with FlopCounterMode(display=False) as counter:
        out = ops.reference_attention_fwd(q, k, v, None, False, None)
    assert out.device.type == "meta" and out.shape == q.shape
    assert counter.get_total_flops() == 4 * 1 * 4 * 5 * 7 * 8
    with FlopCounterMode(display=False) as counter:
        grads = ops.reference_attention_bwd(torch.ones_like(out), q, k, v, None, False, None)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert counter.get_total_flops() == 10 * 1 * 4 * 5 * 7 * 8


def test_reference_op_passes_opcheck():
    inputs = [x.requires_grad_() for x in make_attention_inputs(1, 4, 2, 3, 5, 8, torch.float64, device=CPU)]
    kv_mask = torch.tensor([[True, False, True, True, True]])
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.mit_kernels.reference_attention_fwd.default, (*inputs[:3], kv_mask, True, 0.3), test_utils=utils
    )
