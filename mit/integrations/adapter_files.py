"""Reading an adapter directory (``mit_config.json`` + ``adapter_model.safetensors``) and validating both files
completely, without any model: every problem is a ValueError naming the file and what is wrong in it.

``mit_config.json`` holds exactly three fields:

- ``format``: ``"mit-adapter-v2"`` (this release) or ``"mit-adapter-v1"`` (release 0.1.0);
- ``mit_config``: :class:`~mit.MiTConfig`'s fields with their types (``modality_dim`` required, the others optional);
- ``base_model``: the base model's shape, positive ints ``num_hidden_layers``, ``hidden_size``,
  ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, and the ``model_type`` string
  (required in v2; v1 adapters came from Llama models and have none).

``adapter_model.safetensors``: a readable safetensors file whose metadata ``format``, when present, is ``"pt"``, and
whose tensors are all floating point. Which names and shapes it must hold depends on the model: ``load_adapter``
checks them against the parameters the config gives that model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from ..config import MiTConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "mit_config.json"
FORMAT = "mit-adapter-v2"
V1_FORMAT = "mit-adapter-v1"
SHAPE_KEYS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """The validated content of an adapter directory.

    ``tensors`` maps this release's parameter names (v1 names already converted) to CPU tensors;
    ``base_model`` is the saved shape, with ``model_type`` ``"llama"`` for v1 adapters."""

    directory: pathlib.Path
    format: str
    config: MiTConfig
    base_model: dict[str, int | str]
    tensors: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> pathlib.Path:
        return self.directory / WEIGHTS_NAME

    @property
    def config_path(self) -> pathlib.Path:
        return self.directory / CONFIG_NAME


def _read_meta(path: pathlib.Path) -> tuple[str, MiTConfig, dict[str, int | str]]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    expected = {"format", "mit_config", "base_model"}
    if set(meta) != expected:
        raise ValueError(
            f"{path}: expected exactly the fields {sorted(expected)}, got {sorted(meta)} (missing "
            f"{sorted(expected - set(meta))}, unknown {sorted(set(meta) - expected)})"
        )
    file_format = meta["format"]
    if file_format not in (FORMAT, V1_FORMAT):
        raise ValueError(f"{path}: unknown adapter format {file_format!r}; expected {FORMAT!r} or {V1_FORMAT!r}")

    fields = meta["mit_config"]
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: mit_config must be a JSON object, got {type(fields).__name__}")
    try:  # every field checked by type and range by MiTConfig itself (mit.utils.settings)
        config = MiTConfig.from_dict(fields)
    except ValueError as error:
        raise ValueError(f"{path}: invalid mit_config: {error}") from None

    base = meta["base_model"]
    if not isinstance(base, dict):
        raise ValueError(f"{path}: base_model must be a JSON object, got {type(base).__name__}")
    keys = set(SHAPE_KEYS) | {"model_type"}
    required = keys if file_format == FORMAT else set(SHAPE_KEYS)
    if not required <= set(base) <= keys:
        raise ValueError(
            f"{path}: base_model of a {file_format} adapter must hold {sorted(required)} (and nothing but "
            f"{sorted(keys)}), got {sorted(base)}"
        )
    for key in SHAPE_KEYS:
        if not (_is_int(base[key]) and base[key] >= 1):
            raise ValueError(f"{path}: base_model.{key} must be a positive int, got {base[key]!r}")
    base = dict(base)
    base.setdefault("model_type", "llama")  # v1 adapters came from Llama models only
    if not (isinstance(base["model_type"], str) and base["model_type"]):
        raise ValueError(f"{path}: base_model.model_type must be a non-empty string, got {base['model_type']!r}")
    return file_format, config, base


def _read_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format", "pt") != "pt":
        raise ValueError(f"{path}: safetensors metadata format is {metadata['format']!r}, expected 'pt' (PyTorch)")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")
    return tensors


def convert_v1_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the tensors of a ``mit-adapter-v1`` file to this release's parameter names (``self_attn.infusion.*`` ->
    ``self_attn.mit_kv_infusion.map.*``, ``self_attn.head_logit`` -> ``self_attn.mit_kv_infusion.head_logit``,
    ``mlp.ffn_infusion.*`` -> ``mlp.mit_ffn_infusion.map.*``)."""
    import re

    renames = (
        (re.compile(r"\.self_attn\.infusion\.(weight|bias)$"), r".self_attn.mit_kv_infusion.map.\1"),
        (re.compile(r"\.self_attn\.head_logit$"), r".self_attn.mit_kv_infusion.head_logit"),
        (re.compile(r"\.mlp\.ffn_infusion\.(weight|bias)$"), r".mlp.mit_ffn_infusion.map.\1"),
    )
    converted = {}
    for name, tensor in tensors.items():
        new = name
        for pattern, replacement in renames:
            new = pattern.sub(replacement, new)
        converted[new] = tensor
    return converted


def read_adapter(directory: str | pathlib.Path) -> AdapterFiles:
    """Read and validate the adapter in ``directory`` (ValueError naming the file and the problem); no model is
    involved, nothing is changed."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"no MiT adapter at {directory}: missing {path.name}")
    file_format, config, base = _read_meta(config_path)
    tensors = _read_tensors(weights_path)
    if file_format == V1_FORMAT:
        tensors = convert_v1_names(tensors)
    return AdapterFiles(directory, file_format, config, base, tensors)
