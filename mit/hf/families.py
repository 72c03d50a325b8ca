"""The decoder families MiT supports: one table entry per Hugging Face ``model_type``.

Every family listed here routes attention through transformers' ``ALL_ATTENTION_FUNCTIONS`` (so MiT's attention
function sees q, k, v after the projections, q/k norms, rotary and the cache update) and keeps the decoder layers in
``<decoder>.layers`` with ``self_attn`` and ``mlp`` children. What differs is the MLP:

- ``"swiglu"``: ``down_proj(act(gate_proj(x)) * up_proj(x))``. With a SiLU activation the FFN infusion runs fused
  (:func:`mit_kernels.mit_ffn_gate`); with another activation it scales the down projection's input.
- ``"down_proj_input"``: any MLP whose last module is ``down_proj`` (Phi3's fused ``gate_up_proj``, Gemma's GeGLU):
  the FFN infusion multiplies the input of ``down_proj`` by ``(1 + f)``, which is exactly MiT's FFN infusion.

Adding a family that follows these conventions is one entry here, plus its tiny-config case in the tests.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How MiT finds the infusion points of one decoder family.

    Attributes:
        mlp_kind: ``"swiglu"`` (gate_proj / up_proj / down_proj, fused when the activation is SiLU) or
            ``"down_proj_input"`` (the input of ``down_proj`` is scaled).
        activation_field: the config field naming the MLP activation.
    """

    mlp_kind: str
    activation_field: str = "hidden_act"


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("swiglu"),
    "mistral": FamilySpec("swiglu"),
    "qwen2": FamilySpec("swiglu"),
    "qwen3": FamilySpec("swiglu"),
    # GeGLU (gelu_pytorch_tanh): the down projection's input is scaled. Gemma2 soft-caps attention logits, so its
    # attention always runs the exact fallback; Gemma3 falls back on its sliding-window layers once the window bites.
    "gemma2": FamilySpec("down_proj_input", activation_field="hidden_activation"),
    "gemma3_text": FamilySpec("down_proj_input", activation_field="hidden_activation"),
    "phi3": FamilySpec("down_proj_input"),  # fused gate_up_proj
}

SILU_NAMES = ("silu", "swish")


def family_of(config) -> FamilySpec:
    """The :class:`FamilySpec` of a transformers config, or ValueError naming an unsupported ``model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"apply_mit does not support model_type {model_type!r}; supported: {sorted(FAMILIES)} "
            "(see docs/integration.md for how to add a family)"
        )
    return FAMILIES[model_type]


def ffn_is_fused(spec: FamilySpec, config, mlp) -> bool:
    """True when this MLP's infusion can use the fused SwiGLU gate kernel."""
    act = getattr(config, spec.activation_field, None)
    return (
        spec.mlp_kind == "swiglu"
        and act in SILU_NAMES
        and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
    )
