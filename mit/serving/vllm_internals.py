"""Where the MiT plugin relies on vLLM internals, all in this module (supported: vLLM 0.32, V1 model runner).

vLLM has public extension points for an out-of-tree model (``ModelRegistry``) and per-request arguments
(``SamplingParams.extra_args`` / ``vllm_xargs``), but none that tells a model which request each token of a batch
belongs to, which MiT needs in every decoding step (vLLM's issues ask for the same for control vectors and
per-request model arguments). Two internals are used, each wrapped around one method and checked by
:func:`check_vllm_internals` (tests/serving fails loudly when a vLLM release changes them):

1. ``GPUModelRunner._model_forward`` (documented as the method subclasses override to run the model; vLLM's CPU runner
   inherits it): around the model call, the runner's persistent batch (``input_batch.req_ids``, ``requests[id].
   sampling_params``) and ``query_start_loc`` give each token's request; the model binds them for that forward.
2. ``InputProcessor.process_inputs`` (the front end's request → engine request step): a request's embedding is
   validated there (a ValueError there is an HTTP 400 and the request never reaches the engine), and its
   ``cache_salt`` is extended with a digest of the embedding, so the prefix cache shares key/value blocks only between
   requests whose embeddings are identical (the cached keys and values are infused).
"""

from __future__ import annotations

import functools
import inspect
import os

from . import ADAPTER_ENV
from .request_embedding import FIELD, embedding_salt, has_embedding, parse_embedding

SUPPORTED_VLLM = ("0.32",)  # the releases (major.minor) whose internals below were checked
SERVED_ARCHITECTURES = ("LlamaForCausalLM",)  # the base families the plugin serves an adapter on
MIT_ARCHITECTURES = ("MiTLlamaForCausalLM",)  # the plugin's model, by its own name (--hf-overrides architectures)
_WRAPPED = "_mit_wrapped"


def check_vllm_internals() -> list[str]:
    """What this module needs from vLLM and did not find (empty when everything is in place)."""
    problems: list[str] = []
    import vllm

    if not vllm.__version__.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        problems.append(f"vLLM {vllm.__version__} is not a supported release ({', '.join(SUPPORTED_VLLM)})")
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    forward = inspect.signature(_unwrapped(GPUModelRunner._model_forward)).parameters
    for name in ("input_ids", "positions", "intermediate_tensors", "inputs_embeds", "model_kwargs"):
        if name not in forward:
            problems.append(f"GPUModelRunner._model_forward has no parameter {name!r}")
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for runner in (CPUModelRunner,):  # a runner with its own _model_forward would bypass the hook (no infusion)
        if "_model_forward" in vars(runner):
            problems.append(f"{runner.__name__} overrides _model_forward")
    source = inspect.getsource(GPUModelRunner)
    for needle in ("self._model_forward(", "self.query_start_loc.np[1 : num_reqs + 1]", "self.input_batch.req_ids"):
        if needle not in source:
            problems.append(f"GPUModelRunner no longer contains {needle!r}")
    process = inspect.signature(_unwrapped(InputProcessor.process_inputs)).parameters
    if list(process)[:4] != ["self", "request_id", "prompt", "params"]:
        problems.append(f"InputProcessor.process_inputs(self, request_id, prompt, params, ...) is now {list(process)}")
    if "cache_salt" not in EngineCoreRequest.__struct_fields__:
        problems.append("EngineCoreRequest has no field 'cache_salt'")
    return problems


def _unwrapped(function):
    return getattr(function, "__wrapped__", function)


def check_serving_config(vllm_config) -> None:
    """ValueError naming the setting unless the engine runs the way the plugin's hooks are exact for: eager (no
    torch.compile, no CUDA graphs: the hooks decide per step in Python), the V1 model runner, one device, no
    speculative decoding."""
    from vllm.config import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        raise ValueError(
            "MiT serving runs the model eagerly: start vLLM with --enforce-eager (LLM(..., enforce_eager=True)); got "
            f"compilation mode {compilation.mode.name}, CUDA graph mode {compilation.cudagraph_mode.name}"
        )
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError("MiT serving needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ValueError(
            "MiT serving supports one device (tensor_parallel_size = pipeline_parallel_size = 1), got "
            f"{parallel.tensor_parallel_size} / {parallel.pipeline_parallel_size}"
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("MiT serving does not support speculative decoding (the draft model is not infused)")


def install_runner_hook() -> None:
    """Wrap ``GPUModelRunner._model_forward``: an MiT model gets its batch's requests bound for the forward."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        bind = getattr(self.get_model(), "mit_bind_step", None)
        if bind is None:
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        extra_args = []
        for req_id in req_ids:
            params = self.requests[req_id].sampling_params
            extra_args.append(None if params is None else params.extra_args)
        query_start_loc = self.query_start_loc.np[: num_reqs + 1]
        num_tokens = (positions if positions is not None else input_ids).shape[-1]
        with bind(req_ids, extra_args, query_start_loc, num_tokens):
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)

    setattr(_model_forward, _WRAPPED, True)
    GPUModelRunner._model_forward = _model_forward


@functools.lru_cache(maxsize=4)
def _served_modality_dim(directory: str, mtime: float) -> int:
    from ..hf.adapter_files import read_adapter
    from ..integrations.adapter import MIT_SCHEMA

    return int(read_adapter(directory, MIT_SCHEMA).config.modality_dim)


def served_modality_dim(architectures) -> int | None:
    """The modality_dim of the adapter this server serves, None without one; ValueError when one is configured but
    the base's family is not one the plugin serves (its requests would silently get the frozen base)."""
    directory = os.environ.get(ADAPTER_ENV)
    if not directory:
        return None
    unsupported = [a for a in architectures or () if a not in SERVED_ARCHITECTURES + MIT_ARCHITECTURES]
    if unsupported or not architectures:
        raise ValueError(
            f"{FIELD}: the served base is {architectures}, and the MiT vLLM plugin serves adapters on "
            f"{', '.join(SERVED_ARCHITECTURES)} only"
        )
    try:
        mtime = os.stat(os.path.join(directory, "mit_config.json")).st_mtime
    except OSError:
        mtime = 0.0
    return _served_modality_dim(directory, mtime)


def install_request_hook() -> None:
    """Wrap ``InputProcessor.process_inputs``: validate a request's embedding and salt its prefix-cache blocks."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra_args = getattr(params, "extra_args", None)
        if not has_embedding(extra_args):
            return original(self, request_id, prompt, params, *args, **kwargs)
        try:
            embedding = parse_embedding(extra_args, served_modality_dim(self.model_config.architectures))
        except ValueError as error:
            raise VLLMValidationError(str(error), parameter=FIELD) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        salt = embedding_salt(embedding)
        request.cache_salt = salt if request.cache_salt is None else f"{salt}/{request.cache_salt}"
        return request

    setattr(process_inputs, _WRAPPED, True)
    InputProcessor.process_inputs = process_inputs
