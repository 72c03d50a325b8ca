"""The ``vllm.general_plugins`` entry point of the ``mit`` package (vLLM calls :func:`register` in every process).

It always installs the front end's request hook (:mod:`mit.serving.vllm_internals`): a request carrying an MiT
embedding to a server without an adapter is then an HTTP 400, not silently the frozen base. When
``MIT_VLLM_ADAPTER`` names an adapter, the served families' architectures (``LlamaForCausalLM``) are registered to
:class:`~mit.serving.vllm_llama.MiTLlamaForCausalLM`, so ``MIT_VLLM_ADAPTER=dir vllm serve <base> --enforce-eager``
serves base + adapter with no other flag. ``MiTLlamaForCausalLM`` is registered under its own name too (for
``--hf-overrides '{"architectures": ["MiTLlamaForCausalLM"]}'``). With an adapter it also sets
``VLLM_USE_V2_MODEL_RUNNER=0`` unless it is set: the plugin hooks the V1 model runner.
"""

from __future__ import annotations

import os

from . import ADAPTER_ENV

MODEL = "mit.serving.vllm_llama:MiTLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from .vllm_internals import MIT_ARCHITECTURES, SERVED_ARCHITECTURES, install_request_hook

    # (the model runner's hook is installed by the MiT model itself, in the process that runs it: importing vLLM's
    # GPU model runner here, in every process of a server, could touch CUDA in its front end)
    install_request_hook()
    for architecture in MIT_ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL)
    if os.environ.get(ADAPTER_ENV):
        # the plugin hooks vLLM's V1 model runner; where vLLM would pick its V2 runner (CUDA, with Triton), ask for V1
        # unless the user chose (the model refuses V2 at start-up, saying so)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        for architecture in SERVED_ARCHITECTURES:
            ModelRegistry.register_model(architecture, MODEL)
