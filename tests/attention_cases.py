"""Input builders and the low-precision tolerance rule shared by the attention tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mit_kernels import mit_attention
from mit_kernels.reference import infuse, infusion_gate, masked_softmax_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The absolute floor of the tolerance rule, in units of roundoff of the dtype at the magnitude of the computation.
FLOOR_ULPS = 4

INPUT_NAMES = ("q", "k", "v", "k_mul", "k_add", "v_mul", "v_add", "head_logit")


def make_attention_inputs(
    batch: int,
    hq: int,
    hkv: int,
    lq: int,
    lk: int,
    d: int,
    dtype: torch.dtype,
    *,
    zero_infusion: bool = False,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> list[torch.Tensor]:
    """Random MiT attention inputs [q, k, v, k_mul, k_add, v_mul, v_add, head_logit].

    The infusion vectors are O(0.5) so the infusion changes the output visibly; head_logit is fp32 for low-precision
    dtypes (a trainable parameter kept in fp32 under mixed precision) and in ``dtype`` otherwise."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    q, k, v = rand(batch, hq, lq, d), rand(batch, hkv, lk, d), rand(batch, hkv, lk, d)
    vec_scale = 0.0 if zero_infusion else 0.5
    vectors = [rand(batch, hkv, d, scale=vec_scale) for _ in range(4)]
    hl_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    head_logit = rand(hkv, dt=hl_dtype)
    return [q, k, v, *vectors, head_logit]


def make_kv_mask(batch: int, lk: int, kind: str, seed: int = 0, device: torch.device = DEVICE) -> torch.Tensor | None:
    """Key padding masks. "none": None. "left_pad": sample b has b * 3 leading padded keys (the last sample fully
    masked when batch > 1), so with causal attention the first queries see no key. "random": ~30% of keys masked."""
    if kind == "none":
        return None
    if kind == "left_pad":
        mask = torch.ones(batch, lk, dtype=torch.bool)
        for b in range(batch):
            mask[b, : b * 3] = False
        if batch > 1:
            mask[-1] = False
        return mask.to(device)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed + 1)
        return (torch.rand(batch, lk, generator=gen) > 0.3).to(device)
    raise ValueError(kind)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_low_precision_rule(
    name: str,
    got: torch.Tensor,
    ref_low: torch.Tensor,
    ref64: torch.Tensor,
    magnitude: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """flash-attention's tolerance rule: ``|got - ref64| <= 2 |ref_low - ref64| + floor``, where ref_low is the
    reference run in the same (low) precision as ``got``. The floor is one unit of roundoff of the dtype at
    ``magnitude``, the largest value in the computation under test: it covers results that the reference gets exactly
    by cancellation (e.g. dq = 0 when a query sees a single key) but a flash kernel gets from the rounded output.
    ``compute_dtype`` is the precision of the computation when it differs from got's dtype (an fp32 gradient of an
    fp32 parameter used in a bf16 computation)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_abs_err(got, ref64)
    ref_err = max_abs_err(ref_low, ref64)
    floor = FLOOR_ULPS * torch.finfo(compute_dtype or got.dtype).eps * max(1.0, magnitude, ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {floor:.1e}"


def reduction_magnitudes(inputs64: list[torch.Tensor], grad_out64: torch.Tensor, **kwargs) -> list[float]:
    """Condition magnitudes of the gradients that are sums over tokens: for dk_mul, dk_add, dv_mul, dv_add (sums over
    t) and dhead_logit (sum over b and t), ``max over entries of sum |per-token term|``.

    Such a sum can cancel to a small result whose rounding error is set by the size of its terms, not by its own size;
    this is the honest scale for its error floor. Computed in fp64 with a per-token copy of each vector, written
    independently of the reference (same equations). Returns [0, 0, 0, m_k_mul, m_k_add, m_v_mul, m_v_add, m_lambda]
    (q, k, v are not reductions)."""
    q, k, v, k_mul, k_add, v_mul, v_add, head_logit = (x.detach() for x in inputs64)
    b, h, lk, d = k.shape
    per_token = [x[:, :, None, :].expand(b, h, lk, d).clone().requires_grad_() for x in (k_mul, k_add, v_mul, v_add)]
    km, ka, vm, va = per_token
    lam = head_logit[None, :, None].expand(b, h, lk).clone().requires_grad_()
    if kwargs.get("rescale", True):
        gate = torch.sigmoid(lam + F.cosine_similarity(v, va, dim=-1, eps=1e-8))[..., None]
    else:
        gate = torch.ones(b, h, lk, 1, dtype=k.dtype, device=k.device) + 0 * lam[..., None]
    k_inf = k + gate * (k * km + ka)
    v_inf = v + gate * (v * vm + va)
    out = masked_softmax_attention(
        q, k_inf, v_inf, causal=kwargs.get("causal", True), scale=kwargs.get("scale"), kv_mask=kwargs.get("kv_mask")
    )
    out.backward(grad_out64)
    vector_mags = [x.grad.abs().sum(dim=2).max().item() for x in per_token]
    return [0.0, 0.0, 0.0, *vector_mags, lam.grad.abs().sum(dim=(0, 2)).max().item()]


def run_attention(inputs, grad_out, backend, **kwargs):
    """Output and the eight gradients of mit_attention (zeros where autograd gives none, e.g. lambda without
    rescale), on fresh leaf copies of ``inputs``."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = mit_attention(*leaves, backend=backend, **kwargs)
    out.backward(grad_out)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return out.detach(), grads


def max_abs_score(inputs64: list[torch.Tensor], scale: float | None = None, rescale: bool = True, **_) -> float:
    """``max |s_ij|``, the largest scaled score ``scale q_i . K'_j`` (fp64, every pair, masks ignored)."""
    q, k, v, k_mul, k_add, _, v_add, head_logit = (x.detach().double() for x in inputs64)
    k_inf = infuse(k, k_mul, k_add, infusion_gate(v, v_add, head_logit, rescale))
    k_inf = k_inf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (torch.matmul(q, k_inf.transpose(-1, -2)) * scale).abs().max().item()


def check_parity(inputs, dtype, backend, flash_rounding: bool = False, **kwargs):
    """``backend`` in ``dtype`` vs the reference in ``dtype`` and in fp64, by the low-precision tolerance rule.

    With ``flash_rounding``, the rule accounts for the roundoff every flash backward has (docs/semantics.md,
    Precision): it recomputes ``p = exp(s - lse)`` from scores rounded at ``|s|`` and ``delta`` from the output as
    stored, so the magnitude of the computation includes ``max |s|`` (one key: the reference's dq = dk = 0 exactly,
    the kernel's a few roundoffs of ``|s|``), and an fp32 gradient of a low-precision computation (dλ) carries the
    input dtype's roundoff, as for Triton. Used by the property tests, whose random scales, head dims and sizes reach
    those corners (the fixed matrices above do not)."""
    gen = torch.Generator().manual_seed(1)
    device = inputs[0].device
    # Every run sees the same values: the fp64 reference gets the low-precision inputs and grad_out upcast.
    grad_out = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    out64, grads64 = run_attention([x.double() for x in inputs], grad_out.double(), "reference", **kwargs)
    out_low, grads_low = run_attention(inputs, grad_out, "reference", **kwargs)
    out, grads = run_attention(inputs, grad_out, backend, **kwargs)
    assert out.dtype == dtype and out.shape == inputs[0].shape and out.is_contiguous()
    magnitude = max(x.abs().max().item() for x in (out64, *grads64))
    if flash_rounding:
        magnitude *= max(1.0, max_abs_score(inputs, **kwargs))
    sums = reduction_magnitudes([x.double() for x in inputs], grad_out.double(), **kwargs)
    assert_within_low_precision_rule("out", out, out_low, out64, magnitude)
    # Triton's and torch SDPA's dot products take low-precision operands (and SDPA's backward returns dK', dV' in the
    # input dtype): their fp32 lambda gradient carries the input dtype's roundoff.
    compute = dtype if backend in ("triton", "sdpa") or flash_rounding else None
    for name, got, low, ref, sum_mag in zip(INPUT_NAMES, grads, grads_low, grads64, sums):
        assert got.dtype == low.dtype and got.shape == low.shape, name
        assert_within_low_precision_rule(f"d{name}", got, low, ref, max(magnitude, sum_mag), compute_dtype=compute)
