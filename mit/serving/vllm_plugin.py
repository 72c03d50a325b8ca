"""The ``vllm.general_plugins`` entry point of the ``mit`` package (vLLM calls :func:`register` in every process).

It always installs the two request-handling hooks (:mod:`mit.serving.vllm_internals`): a request carrying an MiT
embedding to a server without an adapter is then an HTTP 400, not silently the frozen base. When
``MIT_VLLM_ADAPTER`` names an adapter, the served families' architectures (``LlamaForCausalLM``) are registered to
:class:`~mit.serving.vllm_llama.MiTLlamaForCausalLM`, so ``MIT_VLLM_ADAPTER=dir vllm serve <base> --enforce-eager``
serves base + adapter with no other flag. ``MiTLlamaForCausalLM`` is registered under its own name too (for
``--hf-overrides '{"architectures": ["MiTLlamaForCausalLM"]}'``).
"""

from __future__ import annotations

import logging
import os

from . import ADAPTER_ENV

MODEL = "mit.serving.vllm_llama:MiTLlamaForCausalLM"
logger = logging.getLogger(__name__)


def register() -> None:
    from vllm import ModelRegistry

    from .vllm_internals import (
        MIT_ARCHITECTURES,
        SERVED_ARCHITECTURES,
        check_vllm_internals,
        install_request_hook,
        install_runner_hook,
    )

    problems = check_vllm_internals()
    if problems:
        logger.warning("mit: this vLLM differs from the supported releases: %s", "; ".join(problems))
    install_request_hook()
    install_runner_hook()
    for architecture in MIT_ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL)
    if os.environ.get(ADAPTER_ENV):
        for architecture in SERVED_ARCHITECTURES:
            ModelRegistry.register_model(architecture, MODEL)
