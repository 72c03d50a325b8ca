"""The adapter directory, for MiT and neural-tuning adapters alike: one reader, one validator and one writer.

An adapter is a directory holding exactly two files, read as one snapshot and written as one unit
(:mod:`mit.hf.directory_swap`: a reader sees the previous adapter or the new one, never a mix):

- ``adapter_model.safetensors``: a readable safetensors file whose metadata ``format``, when present, is ``"pt"``, and
  whose tensors are all real floating point (no integer, bool or complex tensor). Which names and shapes it must hold
  depends on the model: the loaders check them against the parameters the config gives that model.
- the JSON file of its kind (:class:`AdapterSchema`, which each method declares): ``mit_config.json``
  (``mit.integrations.adapter.MIT_SCHEMA``) or ``neural_config.json`` (``mit.neural.adapter.NEURAL_SCHEMA``), an
  object with exactly these fields:

  - ``format``: the format this release writes (``"mit-adapter-v2"``, ``"mit-neural-adapter-v1"``) or an older one it
    still reads (``"mit-adapter-v1"``, release 0.1.0);
  - the method's config (``mit_config``: :class:`~mit.MiTConfig`'s fields, ``neural_config``:
    :class:`~mit.NeuralTuningConfig`'s), every field checked by type and range by the config class itself;
  - ``base_model``: the base model's shape, positive ints ``num_hidden_layers``, ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, and the ``model_type``
    string (``mit-adapter-v1`` adapters came from Llama models and have none);
  - the kind's other fields (neural tuning: ``new_token_ids``, one non-negative int per new token, contiguous).

Every problem found reading is a ValueError naming the file and the field. Writing (:func:`write_adapter`) runs the
same validation on exactly what it is about to write, before anything is written: an adapter that this module would
refuse to read is never saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from ..utils.tensors import check_tensors_match
from .decoder import decoder_of
from .directory_swap import read_directory, write_directory

WEIGHTS_NAME = "adapter_model.safetensors"
SHAPE_KEYS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON ``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LegacyFormat:
    """An older adapter format this release still reads.

    Attributes:
        model_type: its ``base_model`` has no ``model_type``: this one is implied (None: required, as now).
        rename: converts its tensor names to this release's, ``rename(tensors, source)`` (``source`` names the file
            in errors); None: the names are this release's.
    """

    model_type: str | None = None
    rename: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]] | None = None


@dataclasses.dataclass(frozen=True)
class AdapterSchema:
    """What one kind of adapter's JSON file holds (the module's docstring).

    Attributes:
        kind: the method, named in messages (``"MiT"``, ``"neural-tuning"``).
        config_name: the JSON file's name.
        format: the format this release writes.
        config_field: the JSON field holding the method's config.
        config_class: its class: ``config_class.from_dict(fields)`` validates every field (ValueError naming it) and
            ``to_dict()`` gives them back.
        extra_fields: the kind's other fields: name -> ``check(value, config)``, which returns the value to use or
            raises ValueError saying what was expected.
        legacy: older formats still read: name -> :class:`LegacyFormat`.
    """

    kind: str
    config_name: str
    format: str
    config_field: str
    config_class: type
    extra_fields: Mapping[str, Callable[[Any, Any], Any]] = dataclasses.field(default_factory=dict)
    legacy: Mapping[str, LegacyFormat] = dataclasses.field(default_factory=dict)

    @property
    def formats(self) -> tuple[str, ...]:
        return (self.format, *self.legacy)

    @property
    def fields(self) -> set[str]:
        return {"format", self.config_field, "base_model", *self.extra_fields}

    def file_names(self) -> tuple[str, str]:
        return self.config_name, WEIGHTS_NAME

    def replaceable(self, entry: str) -> bool:
        """True for the entries of a previous adapter of this kind that a save may replace: its two files, and the
        temporary files that releases writing them one by one left after a crash."""
        return entry in self.file_names() or any(entry.startswith(f".{name}.tmp-") for name in self.file_names())

    def revalidate(self, config: object, where: str) -> Any:
        """``config`` checked again by its class (it may have been changed since it was built): a fresh, validated
        copy, or a ValueError naming ``where`` and the field."""
        if not isinstance(config, self.config_class):
            raise ValueError(f"{where} must be a {self.config_class.__name__}, got {type(config).__name__}")
        try:
            return self.config_class.from_dict(config.to_dict())
        except ValueError as error:
            raise ValueError(f"{where} is no longer valid (changed after it was built?): {error}") from None


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """The validated content of an adapter directory.

    ``directory`` is where it was read (the given one, or the aside an interrupted save left); ``tensors`` maps this
    release's parameter names (legacy names already converted) to CPU tensors; ``base_model`` is the saved shape,
    with a legacy format's implied ``model_type``; ``extra`` holds the kind's other fields, validated."""

    directory: pathlib.Path
    schema: AdapterSchema
    format: str
    config: Any
    base_model: dict[str, int | str]
    extra: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> pathlib.Path:
        return self.directory / WEIGHTS_NAME

    @property
    def config_path(self) -> pathlib.Path:
        return self.directory / self.schema.config_name


def validate_meta(
    path: pathlib.Path, meta: object, schema: AdapterSchema
) -> tuple[str, Any, dict[str, int | str], dict[str, Any]]:
    """(format, config, base_model, extra fields) of the JSON object ``meta`` read from ``path``, each field checked
    (module docstring); ValueError naming ``path`` and the field otherwise."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    expected = schema.fields
    if set(meta) != expected:
        raise ValueError(
            f"{path}: expected exactly the fields {sorted(expected)}, got {sorted(meta)} (missing "
            f"{sorted(expected - set(meta))}, unknown {sorted(set(meta) - expected)})"
        )
    file_format = meta["format"]
    if not isinstance(file_format, str) or file_format not in schema.formats:
        raise ValueError(
            f"{path}: unknown adapter format {file_format!r}; expected {' or '.join(map(repr, schema.formats))}"
        )

    fields = meta[schema.config_field]
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: {schema.config_field} must be a JSON object, got {type(fields).__name__}")
    try:  # every field checked by type and range by the config class itself (mit.utils.settings)
        config = schema.config_class.from_dict(fields)
    except ValueError as error:
        raise ValueError(f"{path}: invalid {schema.config_field}: {error}") from None

    base = meta["base_model"]
    if not isinstance(base, dict):
        raise ValueError(f"{path}: base_model must be a JSON object, got {type(base).__name__}")
    legacy = schema.legacy.get(file_format)
    implied_type = legacy.model_type if legacy is not None else None
    keys = set(SHAPE_KEYS) | {"model_type"}
    required = set(SHAPE_KEYS) if implied_type is not None else keys
    if not required <= set(base) <= keys:
        raise ValueError(
            f"{path}: base_model of a {file_format} adapter must hold {sorted(required)} (and nothing but "
            f"{sorted(keys)}), got {sorted(base)}"
        )
    for key in SHAPE_KEYS:
        if not (is_int(base[key]) and base[key] >= 1):
            raise ValueError(f"{path}: base_model.{key} must be a positive int, got {base[key]!r}")
    base = dict(base)
    if implied_type is not None:
        base.setdefault("model_type", implied_type)
    if not (isinstance(base["model_type"], str) and base["model_type"]):
        raise ValueError(f"{path}: base_model.model_type must be a non-empty string, got {base['model_type']!r}")

    extra = {}
    for name, check in schema.extra_fields.items():
        try:
            extra[name] = check(meta[name], config)
        except ValueError as error:
            raise ValueError(f"{path}: {name}: {error}") from None
    return file_format, config, base, extra


def check_tensor_dtypes(path: pathlib.Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming ``path`` and the tensor unless every tensor is real floating point."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():  # False for integer, bool and complex dtypes
            raise ValueError(
                f"{path}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype (float32, float16, "
                "bfloat16 or float64; not integer, bool or complex)"
            )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (the file already parsed, so the header is well formed)."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def read_tensors(path: pathlib.Path, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` whose content is ``data``, checked (module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format", "pt") != "pt":
        raise ValueError(f"{path}: safetensors metadata format is {metadata['format']!r}, expected 'pt' (PyTorch)")
    check_tensor_dtypes(path, tensors)
    return tensors


def _parse_json(path: pathlib.Path, data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None


def read_adapter(directory: str | os.PathLike, schema: AdapterSchema) -> AdapterFiles:
    """Read and validate the adapter of kind ``schema`` in ``directory``, both files from one snapshot (ValueError
    naming the file and the problem); no model is involved, nothing is changed."""
    directory = pathlib.Path(directory)
    what = f"{schema.kind} adapter"
    source, contents = read_directory(directory, schema.file_names(), what)
    config_path, weights_path = source / schema.config_name, source / WEIGHTS_NAME
    for name in schema.file_names():
        if contents[name] is None:
            raise ValueError(f"no {what} at {directory}: {source / name} is missing")
    meta = _parse_json(config_path, contents[schema.config_name])
    file_format, config, base, extra = validate_meta(config_path, meta, schema)
    tensors = read_tensors(weights_path, contents[WEIGHTS_NAME])
    legacy = schema.legacy.get(file_format)
    if legacy is not None and legacy.rename is not None:
        tensors = legacy.rename(tensors, str(weights_path))
    return AdapterFiles(source, schema, file_format, config, base, extra, tensors)


def write_adapter(
    directory: str | os.PathLike, schema: AdapterSchema, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> pathlib.Path:
    """Write an adapter of kind ``schema`` (``meta``: the JSON object, ``tensors``: CPU tensors) to ``directory`` as
    one unit (:func:`mit.hf.directory_swap.write_directory`: a previous adapter there is replaced whole, or
    left whole if the save fails).

    ``meta`` and ``tensors`` are first validated as :func:`read_adapter` will read them (ValueError naming the file
    and the field, nothing written); ``directory`` must be new, empty or hold only a previous adapter of this kind."""
    directory = pathlib.Path(directory)
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    validate_meta(directory / schema.config_name, json.loads(text), schema)
    check_tensor_dtypes(directory / WEIGHTS_NAME, tensors)
    files = {
        WEIGHTS_NAME: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        schema.config_name: lambda path: path.write_bytes(text.encode("utf-8")),
    }
    write_directory(directory, files, schema.replaceable, f"{schema.kind} adapter")
    return directory


def base_shape(model) -> dict[str, int | str]:
    """The shape fields of ``base_model`` for ``model`` (its decoder's config)."""
    return config_shape(decoder_of(model).config)


def config_shape(config) -> dict[str, int | str]:
    """The shape fields of ``base_model`` for a decoder's (transformers) config."""
    shape: dict[str, int | str] = {k: int(getattr(config, k)) for k in SHAPE_KEYS if k != "head_dim"}
    shape["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    shape["model_type"] = config.model_type
    return shape


def check_base_shape(files: AdapterFiles, model) -> None:
    """ValueError naming the JSON file unless ``model`` has the type and shape the adapter was saved from."""
    check_shape(files, base_shape(model))


def check_shape(files: AdapterFiles, shape: Mapping[str, int | str]) -> None:
    """ValueError naming the JSON file unless the base's ``shape`` (:func:`config_shape`) is the saved one."""
    saved = files.base_model
    mismatched = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"{files.config_path}: the adapter at {files.directory} was saved from a model of another shape ({details})"
        )


def check_adapter_tensors(files: AdapterFiles, shapes: Mapping[str, torch.Size], what: str) -> None:
    """ValueError naming the safetensors file unless it holds exactly the names of ``shapes`` with those shapes."""
    check_tensors_match(files.tensors, shapes, str(files.weights_path), what)


def check_saved_tensors(
    function: str, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], where: str
) -> None:
    """At save: ValueError unless the model's parameters ``tensors`` are exactly what its config (``where``) gives it,
    names and shapes, i.e. what a load will check them against."""
    try:
        check_tensors_match(tensors, shapes, f"{function}: the model's parameters", f"the parameters {where} implies")
    except ValueError as error:
        raise ValueError(f"{error} ({where} changed after it was applied?); nothing was written") from None
