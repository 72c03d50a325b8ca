"""The reference implementation against values computed by hand, and its own gradients (gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from attention_cases import make_attention_inputs, make_kv_mask

from mit_kernels import mit_attention
from mit_kernels.reference import infuse, infusion_gate, mit_attention_reference


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_case():
    """B = H = 1, D = 2, Lk = 2, lambda = 0.25; every quantity below is worked out with plain Python floats."""
    q = [[1.0, 2.0], [-1.0, 0.5], [0.5, 0.5]]
    k = [[1.0, 0.0], [0.0, 1.0]]
    v = [[3.0, 4.0], [1.0, 0.0]]
    k_mul, k_add, v_mul, v_add = [1.0, -1.0], [0.0, 1.0], [0.5, 0.0], [1.0, 0.0]
    lam = 0.25
    # cosine(v_t, v_add): v_0 = (3, 4) has norm 5, v_add = (1, 0) has norm 1.
    cos = [3.0 / 5.0, 1.0 / 1.0]
    gate = [_sigmoid(lam + c) for c in cos]
    k_inf = [[k[t][i] + gate[t] * (k[t][i] * k_mul[i] + k_add[i]) for i in range(2)] for t in range(2)]
    v_inf = [[v[t][i] + gate[t] * (v[t][i] * v_mul[i] + v_add[i]) for i in range(2)] for t in range(2)]
    tensors = [torch.tensor(x, dtype=torch.float64) for x in (q, k, v, k_mul, k_add, v_mul, v_add, [lam])]
    q_t, k_t, v_t = (x[None, None] for x in tensors[:3])
    vectors = [x[None, None] for x in tensors[3:7]]
    return (q_t, k_t, v_t, *vectors, tensors[7]), q, k_inf, v_inf


def _attend(q_row, keys, values, scale):
    scores = [scale * sum(a * b for a, b in zip(q_row, key)) for key in keys]
    weights = [math.exp(s - max(scores)) for s in scores]
    total = sum(weights)
    return [sum(w * val[i] for w, val in zip(weights, values)) / total for i in range(2)]


def test_hand_computed_non_causal():
    inputs, q, k_inf, v_inf = _hand_case()
    out = mit_attention_reference(*inputs, causal=False)
    scale = 1.0 / math.sqrt(2.0)
    expected = [_attend(row, k_inf, v_inf, scale) for row in q]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_hand_computed_causal_bottom_right():
    """Lq = 3 > Lk = 2, causal: query 0 sees no key (output 0), query 1 sees key 0 only, query 2 sees both."""
    inputs, q, k_inf, v_inf = _hand_case()
    out = mit_attention_reference(*inputs, causal=True, scale=0.7)
    expected = [[0.0, 0.0], list(v_inf[0]), _attend(q[2], k_inf, v_inf, 0.7)]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_hand_computed_without_rescale():
    inputs, q, _, _ = _hand_case()
    _, k, v, k_mul, k_add, v_mul, v_add, _ = inputs
    out = mit_attention_reference(*inputs, causal=False, rescale=False)
    keys = (k + k * k_mul + k_add)[0, 0].tolist()  # g = 1
    values = (v + v * v_mul + v_add)[0, 0].tolist()
    expected = [_attend(row, keys, values, 1 / math.sqrt(2)) for row in q]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_gate_is_torch_cosine_similarity():
    _q, _k, v, _k_mul, _k_add, _v_mul, v_add, head_logit = make_attention_inputs(2, 4, 2, 5, 9, 16, torch.float32)
    gate = infusion_gate(v, v_add, head_logit)
    expected = torch.sigmoid(head_logit[None, :, None] + F.cosine_similarity(v, v_add[:, :, None], dim=-1, eps=1e-8))
    assert gate.dtype == torch.float32
    torch.testing.assert_close(gate[..., 0], expected, rtol=0, atol=0)


def test_zero_infusion_leaves_keys_and_values_bitwise_unchanged():
    _q, k, v, _, _, _, _, head_logit = make_attention_inputs(2, 4, 2, 5, 9, 16, torch.bfloat16)
    zeros = torch.zeros(2, 2, 16, dtype=torch.bfloat16)
    gate = infusion_gate(v, zeros, head_logit * 7)
    assert torch.equal(infuse(k, zeros, zeros, gate), k)
    assert torch.equal(infuse(v, zeros, zeros, gate), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "left_pad"])
def test_reference_gradcheck(causal, mask_kind):
    inputs = make_attention_inputs(2, 4, 2, 5, 7, 8, torch.float64, device=torch.device("cpu"))
    inputs = [x.requires_grad_() for x in inputs]
    kv_mask = make_kv_mask(2, 7, mask_kind, device=torch.device("cpu"))

    def fn(*xs):
        return mit_attention(*xs, causal=causal, kv_mask=kv_mask, backend="reference")

    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_fully_masked_rows_are_zero_with_zero_gradient():
    inputs = [x.requires_grad_() for x in make_attention_inputs(2, 2, 1, 4, 4, 8, torch.float64)]
    kv_mask = torch.tensor([[False, False, True, True], [False] * 4])
    out = mit_attention_reference(*inputs, causal=True, kv_mask=kv_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # sample 1 sees nothing
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))  # queries 0, 1 see only padded keys
    out.sum().backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all()
    assert torch.equal(inputs[0].grad[1], torch.zeros_like(inputs[0].grad[1]))
    assert torch.equal(inputs[0].grad[0, :, :2], torch.zeros_like(inputs[0].grad[0, :, :2]))
