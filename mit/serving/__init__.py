"""Serving MiT models with vLLM: an MiT adapter on a frozen base, one modality embedding per request.

``pip install "mit[serve]"`` (GPU) or ``"mit[serve-cpu]"`` (vLLM's CPU build), each in an environment of its own, then::

    MIT_VLLM_ADAPTER=path/to/adapter vllm serve path/to/base

and a request carries its embedding as ``vllm_xargs: {"mit_embedding": [...]}`` (OpenAI-compatible server) or
``SamplingParams(extra_args={"mit_embedding": [...]})`` (offline ``vllm.LLM``); a request without one is served by the
frozen base. The pieces:

- :mod:`mit.serving.request_embedding`: reading and validating a request's embedding (no vLLM import).
- :mod:`mit.serving.served_adapter`: an adapter saved by :func:`mit.save_adapter`, checked against the served base's
  config, and the per-request infusion vectors it gives (no vLLM import).
- :mod:`mit.serving.vllm_llama`: the vLLM model (vLLM's Llama with the infusion applied to the keys and values written
  to the paged cache and to the MLP's down-projection input, per token, for that token's request).
- :mod:`mit.serving.vllm_internals`: the two places where the plugin relies on vLLM internals, isolated and checked.
- :mod:`mit.serving.vllm_plugin`: the ``vllm.general_plugins`` entry point.

docs/serving.md describes the design, the supported vLLM versions and what was measured.
"""

ADAPTER_ENV = "MIT_VLLM_ADAPTER"  # the adapter directory a vLLM server (all its processes) serves

__all__ = ["ADAPTER_ENV"]
