"""mit: Multimodal Infusion Tuning for large language models.

The fused operations live in :mod:`mit_kernels` (attention with key/value infusion, the FFN infusion gate); this
package is where the Hugging Face integration and the tuning framework are built on top of them.
"""

from __future__ import annotations

from mit_kernels import __version__, mit_attention, mit_ffn_gate

__all__ = ["__version__", "mit_attention", "mit_ffn_gate"]
