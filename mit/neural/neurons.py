"""The task neurons of one adapted layer (``self_attn.nt_neurons``) and the per-forward state they share.

Per adapted layer k, with H (B, L, hidden) the attention input (the output of ``input_layernorm``, which is what
``q_proj`` receives):

    Z_k   = W_z H                                              (B, L, r), no bias
    Z^u_k = RMSNorm_r((1 - alpha) Z_k + alpha Z^u_{k-1})       (first adapted layer: RMSNorm_r((1 - alpha) Z_k))
    Z^a_k = ReLU(Z^u_k - tau),  tau = k-th smallest of Z^u_k per token,  k = clamp(floor((1 - rho) r), 1, r)
    [dQ; dK; dV] = Dropout(W_b Z^a_k)                          (dK only with targets "qkv")

and the deltas are added to the outputs of ``q_proj`` / ``k_proj`` / ``v_proj`` (or the slices of a fused
``qkv_proj``), i.e. before q/k norms and rotary. ``r - k`` units stay active per token (ties aside); k is clamped to
at least 1, so even rho = 1 thresholds the smallest unit away, and rho -> 0 leaves none active.

rho is one scalar per layer and forward: ``rho0`` in eval mode (unless ``inference_jitter``), else drawn from
``N(rho0, (jitter rho0)^2)`` with torch's RNG, clamped to (0, 1].

Cross-layer state and gradient checkpointing: the top-level forward puts a fresh :class:`NeuralState` in the
transformers ``**kwargs`` that reach every decoder layer; the decoder layer hands it to its neurons while it runs.
The state records, per layer, the Z^u_{k-1} it received and its rho draw: when gradient checkpointing re-runs the
layer in backward (with the same kwargs, hence the same state), the neurons find their record and use the same
input and the same rho, instead of the last layer's Z^u. Reentrant checkpointing is refused (its recomputation does
not propagate gradients through Z^u_{k-1} to the previous layers).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn

from ..hf.parameters import trainable_dtype

NEURONS_NAME = "nt_neurons"  # attribute of an adapted layer's self_attn


@dataclasses.dataclass
class NeuralState:
    """What the adapted layers of one forward share: the last Z^u (B, L, r) and, per layer index, the
    (Z^u_{k-1} or None, rho) it used (read again by a gradient-checkpointing recomputation)."""

    previous: torch.Tensor | None = None
    records: dict[int, tuple[torch.Tensor | None, float]] = dataclasses.field(default_factory=dict)


def active_count(rank: int, rho: float) -> int:
    """Units left active per token: ``r - k`` with ``k = clamp(floor((1 - rho) r), 1, r)``."""
    return rank - min(max(math.floor((1.0 - rho) * rank), 1), rank)


def sparsify(z_u: torch.Tensor, rho: float) -> torch.Tensor:
    """Z^a = ReLU(Z^u - tau), tau the k-th smallest value of each token's (..., r) vector (see the module doc)."""
    rank = z_u.shape[-1]
    k = rank - active_count(rank, rho)
    tau = z_u.kthvalue(k, dim=-1, keepdim=True).values
    return torch.relu(z_u - tau)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 (as Llama's), in ``weight``'s dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


class NeuralTuningLayer(nn.Module):
    """Task neurons of one adapted layer: ``z_proj`` (hidden -> r, no bias), ``norm_weight`` (r,), ``b_proj``
    (r -> Hq D + [Hkv D] + Hkv D, with bias; zero-initialised with ``zero_init_b``).

    Forward hooks on the attention's projections call :meth:`deltas` with the projection's input H; the result is
    computed once per H tensor (q, k and v projections share it) and dropped when the decoder layer's forward ends."""

    disabled: bool = False  # True (an instance attribute) inside the model's disable_adapter() context

    def __init__(
        self,
        config,
        layer_index: int,
        hidden_size: int,
        q_features: int,
        kv_features: int,
        eps: float,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        self.layer_index, self.eps = layer_index, eps
        self.rank, self.sparsity, self.alpha = config.rank, float(config.sparsity), float(config.alpha)
        self.jitter, self.inference_jitter = float(config.jitter), config.inference_jitter
        self.q_features, self.kv_features = q_features, kv_features
        self.with_k = config.targets == "qkv"
        out = q_features + (2 if self.with_k else 1) * kv_features
        kwargs = {"device": like.device, "dtype": trainable_dtype(like)}
        self.z_proj = nn.Linear(hidden_size, config.rank, bias=False, **kwargs)
        self.norm_weight = nn.Parameter(torch.ones(config.rank, **kwargs))
        self.b_proj = nn.Linear(config.rank, out, **kwargs)
        if config.zero_init_b and like.device.type != "meta":
            nn.init.zeros_(self.b_proj.weight)
            nn.init.zeros_(self.b_proj.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.state: NeuralState | None = None  # set by the decoder layer for one forward
        self._cache: tuple | None = None

    def draw_rho(self) -> float:
        """rho for this forward: rho0, or a N(rho0, (jitter rho0)^2) draw clamped to (0, 1] (training, or eval with
        ``inference_jitter``)."""
        if not (self.training or self.inference_jitter) or self.jitter == 0.0:
            return self.sparsity
        rho = self.sparsity + self.jitter * self.sparsity * float(torch.randn(()))
        return min(max(rho, 1e-6), 1.0)

    def neurons(self, h: torch.Tensor, previous: torch.Tensor | None, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z^u, Z^a), each (B, L, r), from H (B, L, hidden) and the previous adapted layer's Z^u (or None)."""
        z = (1.0 - self.alpha) * self.z_proj(h.to(self.z_proj.weight.dtype))
        if previous is not None:
            z = z + self.alpha * previous
        z_u = rms_norm(z, self.norm_weight, self.eps)
        return z_u, sparsify(z_u, rho)

    def deltas(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(dQ (B, L, Hq D), dK (B, L, Hkv D) or None, dV (B, L, Hkv D)) in H's dtype, for this forward's state."""
        cache = self._cache
        if cache is not None and cache[0]() is h:
            return cache[1]
        state = self.state
        if state is None:
            raise ValueError(
                "the neural-tuning layer ran without its per-forward state: call the model returned by "
                "mit.apply_neural_tuning (or its decoder), not a decoder layer or attention module directly"
            )
        # drawn on recomputation too, so that the RNG stream the dropout below sees (restored by checkpointing) is
        # the same as in the first run; the recorded rho is used
        rho = self.draw_rho()
        record = state.records.get(self.layer_index)
        if record is None:  # first run of this layer in this forward
            record = (state.previous, rho)
            state.records[self.layer_index] = record
            z_u, z_a = self.neurons(h, *record)
            state.previous = z_u
        else:  # gradient-checkpointing recomputation: same input, same rho
            z_u, z_a = self.neurons(h, *record)
        delta = self.dropout(self.b_proj(z_a)).to(h.dtype)
        q, kv = self.q_features, self.kv_features
        dq = delta[..., :q]
        dk = delta[..., q : q + kv] if self.with_k else None
        dv = delta[..., -kv:]
        self._cache = (weakref.ref(h), (dq, dk, dv))
        return dq, dk, dv

    def clear(self) -> None:
        self.state, self._cache = None, None

    # forward hooks of the attention's projections (their inputs are H, their outputs pre-rotary); while the model's
    # disable_adapter() context is open (``disabled``), they return None: the projection's own output
    def add_q(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return None if self.disabled else output + self.deltas(args[0])[0]

    def add_k(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return None if self.disabled else output + self.deltas(args[0])[1]

    def add_v(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return None if self.disabled else output + self.deltas(args[0])[2]

    def add_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.disabled:
            return None
        dq, dk, dv = self.deltas(args[0])
        if dk is None:
            dk = torch.zeros_like(dv)
        return output + torch.cat([dq, dk, dv], dim=-1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"], state["state"] = None, None
        return state

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, rank={self.rank}, sparsity={self.sparsity}, alpha={self.alpha}, "
            f"with_k={self.with_k}"
        )
