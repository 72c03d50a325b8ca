"""The C++ kernels' direct entries, which decoding steps call (``mit_kernels.cpu_backend.decoding_attention`` /
``decoding_ffn_gate``): the same operators as ``torch.ops.mit_kernels.*``, reached without torch/_ops.py and the
dispatcher when the dispatcher would add nothing. They must compute what the torch.ops call computes, bit for bit,
and hand every call the dispatcher (or Python) would treat specially to the torch.ops path: a graph to record, a
dispatch mode (fake tensors, FLOP counting), a ``__torch_function__`` mode or subclass; the profiler must still see
each call under the operator's name."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from attention_cases import make_attention_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from mit_kernels.dispatch import cpu_backend_available

pytestmark = pytest.mark.skipif(
    not cpu_backend_available(), reason="the C++ CPU kernels cannot be built here (no compiler?)"
)


@pytest.fixture(scope="module")
def cpu_backend():
    from mit_kernels import cpu_backend

    assert cpu_backend.available(), cpu_backend.unavailable_reason()
    return cpu_backend


def _attention_args(lq: int, dtype: torch.dtype, masked: bool, batch: int = 2):
    """Inputs as a decoding step passes them: q a transposed view of the projection (B, Lq, Hq, D) -> (B, Hq, Lq, D),
    the cache's K / V, a key padding mask that hides the first keys of sample 0."""
    q, k, v, *vectors, head_logit = make_attention_inputs(batch, 6, 2, lq, 37, 32, dtype, device=torch.device("cpu"))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    mask = None
    if masked:
        mask = torch.ones(batch, 37, dtype=torch.bool)
        mask[0, :5] = False
    return (q, k, v, *vectors, head_logit), dict(causal=True, scale=None, kv_mask=mask, rescale=True)


def _gate_args(lq: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(lq)
    return [(torch.randn(2, lq, 300, generator=gen, dtype=torch.float64) * s).to(dtype) for s in (2.0, 1.0)] + [
        (torch.randn(2, 300, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lq", [1, 40])  # the decode kernel and the blocked one
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_direct_entries_compute_what_the_torch_ops_call_computes(cpu_backend, dtype, lq, masked, context):
    args, options = _attention_args(lq, dtype, masked)
    gate_args = _gate_args(lq, dtype)
    with context():
        expected = cpu_backend.loaded_attention(*args, **options)
        got = cpu_backend.decoding_attention(*args, **options)
        expected_gate = cpu_backend.loaded_ffn_gate(*gate_args)
        got_gate = cpu_backend.decoding_ffn_gate(*gate_args)
    assert got.dtype == dtype and got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected) and torch.equal(got_gate, expected_gate)
    assert not got.requires_grad and not got_gate.requires_grad


def test_a_call_that_records_a_graph_goes_through_autograd(cpu_backend):
    """With grad on and an input requiring grad, the direct entry takes the dispatcher's path: the autograd kernel
    records the graph, and its gradient is the torch.ops call's."""
    args, options = _attention_args(1, torch.float32, True)
    leaves = [x.detach().clone().requires_grad_() for x in args]
    out = cpu_backend.decoding_attention(*leaves, **options)
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves_ops = [x.detach().clone().requires_grad_() for x in args]
    expected = torch.autograd.grad(cpu_backend.loaded_attention(*leaves_ops, **options).sum(), leaves_ops)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)
    gate_args = [x.requires_grad_() for x in _gate_args(1, torch.float32)]
    assert cpu_backend.decoding_ffn_gate(*gate_args).grad_fn is not None


class _RecordingMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_operator(cpu_backend):
    """Under a dispatch mode (what FlopCounterMode and FakeTensorMode are) the call goes through the dispatcher: the
    mode sees the operator, by name, and the result is unchanged."""
    args, options = _attention_args(1, torch.float32, False)
    gate_args = _gate_args(1, torch.float32)
    with torch.no_grad():
        expected = cpu_backend.loaded_attention(*args, **options)
        with _RecordingMode() as mode:
            out = cpu_backend.decoding_attention(*args, **options)
            gate = cpu_backend.decoding_ffn_gate(*gate_args)
    assert "mit_kernels.attention_cpu_fwd.default" in mode.ops and "mit_kernels.ffn_gate_cpu_fwd.default" in mode.ops
    assert torch.equal(out, expected) and torch.equal(gate, cpu_backend.loaded_ffn_gate(*gate_args))


def test_flop_counting_and_fake_tensors_work_through_the_direct_entries(cpu_backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    args, options = _attention_args(1, torch.float32, True)
    with torch.no_grad():
        with FlopCounterMode(display=False) as by_ops:
            cpu_backend.loaded_attention(*args, **options)
        with FlopCounterMode(display=False) as direct:
            cpu_backend.decoding_attention(*args, **options)
    assert direct.get_total_flops() == by_ops.get_total_flops() > 0
    with FakeTensorMode() as fake_mode, torch.no_grad():
        fake_args = [fake_mode.from_tensor(x) for x in args]
        fake_options = dict(options, kv_mask=fake_mode.from_tensor(options["kv_mask"]))
        out = cpu_backend.decoding_attention(*fake_args, **fake_options)
        gate = cpu_backend.decoding_ffn_gate(*[fake_mode.from_tensor(x) for x in _gate_args(3, torch.float32)])
    assert type(out).__name__ == "FakeTensor" and out.shape == args[0].shape
    assert type(gate).__name__ == "FakeTensor" and gate.shape == (2, 3, 300)


class _SeenTensor(torch.Tensor):
    """A ``__torch_function__`` subclass (no dispatch key of its own): only Python sees it."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_modes_and_subclasses_take_the_torch_ops_call(cpu_backend):
    args, options = _attention_args(1, torch.float32, False)
    with torch.no_grad():
        expected = cpu_backend.loaded_attention(*args, **options)
        _SeenTensor.seen.clear()
        out = cpu_backend.decoding_attention(args[0].as_subclass(_SeenTensor), *args[1:], **options)
        assert any("attention_cpu_fwd" in name for name in _SeenTensor.seen), _SeenTensor.seen
        assert torch.equal(out.as_subclass(torch.Tensor), expected)
        with torch.device("cpu"):  # a TorchFunctionMode
            assert torch.equal(cpu_backend.decoding_attention(*args, **options), expected)


def test_the_profiler_sees_each_call_by_the_operators_name(cpu_backend):
    args, options = _attention_args(1, torch.float32, True)
    gate_args = _gate_args(1, torch.float32)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            cpu_backend.decoding_attention(*args, **options)
            cpu_backend.decoding_ffn_gate(*gate_args)
    counts = {event.key: event.count for event in prof.key_averages()}
    assert counts.get("mit_kernels::attention_cpu_fwd") == 3 and counts.get("mit_kernels::ffn_gate_cpu_fwd") == 3


def test_direct_entries_validate_their_inputs(cpu_backend):
    """The CPU kernels' own checks run on the direct path too: a wrong shape is an error, never a wrong answer."""
    args, options = _attention_args(1, torch.float32, False)
    bad = list(args)
    bad[3] = bad[3][:, :1]  # k_mul with one KV head too few
    with torch.no_grad(), pytest.raises(RuntimeError, match="infusion vectors must be"):
        cpu_backend.decoding_attention(*bad, **options)


def test_the_decode_kernels_kept_workspace_carries_nothing_between_calls(cpu_backend):
    """The decode kernel's partials and scratch come from a buffer each thread keeps between calls (above 1 MiB, a
    buffer of the call's own): calls of other shapes and dtypes in between, a request too large to keep, and two
    threads decoding at once (the direct entry releases the GIL) leave every result what a lone call gives."""
    import threading

    from mit_kernels.reference import mit_attention_reference

    small, options = _attention_args(1, torch.float32, True)
    other, other_options = _attention_args(1, torch.float64, False, batch=3)
    # 64 x 8 KV heads x 32 stacked query rows x (64 + 2): ~4.3 MB of partials, more than the kept buffer
    large = make_attention_inputs(64, 32, 8, 1, 16, 64, torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        first = cpu_backend.decoding_attention(*small, **options)
        other_out = cpu_backend.decoding_attention(*other, **other_options)
        large_out = cpu_backend.decoding_attention(*large, causal=True, scale=None, kv_mask=None, rescale=True)
        assert torch.equal(cpu_backend.decoding_attention(*small, **options), first)
        assert torch.equal(cpu_backend.decoding_attention(*other, **other_options), other_out)
    torch.testing.assert_close(large_out, mit_attention_reference(*large), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        other_out, mit_attention_reference(*other, **{k: v for k, v in other_options.items() if k != "kv_mask"}),
        rtol=1e-10, atol=1e-10,
    )  # fmt: skip

    results: dict[str, list[bool]] = {"small": [], "other": []}

    def decode(name, args, kwargs, expected):
        with torch.no_grad():
            for _ in range(50):
                results[name].append(torch.equal(cpu_backend.decoding_attention(*args, **kwargs), expected))

    threads = [
        threading.Thread(target=decode, args=("small", small, options, first)),
        threading.Thread(target=decode, args=("other", other, other_options, other_out)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"small": [True] * 50, "other": [True] * 50}
