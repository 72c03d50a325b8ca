"""Sharded training on accelerate: FSDP2 (also on CPU processes over gloo) and DeepSpeed ZeRO-3.

The trainer prepares the task model with ``accelerator.prepare`` as usual; this module holds what changes when the
frozen base is sharded, as functions of the accelerator and the prepared model:

- :func:`enable_cpu_fsdp`: accelerate 1.15 switches to FSDP only on accelerator devices. ``AcceleratorState.__init__``
  (accelerate/state.py) sets ``DistributedType.FSDP`` in the branch taken for ``MULTI_GPU``, ``MULTI_XPU``, ... but
  never for ``MULTI_CPU``, so ``ACCELERATE_USE_FSDP=true`` on CPU processes silently trains with DDP. With that
  variable set on CPU processes, this switches the shared state to FSDP with the plugin read from the ``FSDP_*``
  environment (as accelerate does on GPUs); torch's FSDP2 (``fully_shard``) runs on a CPU device mesh over gloo.
- :func:`check_supported`: the trainer supports FSDP through FSDP2 (``FSDP_VERSION=2``) only.
- :func:`trainable_state_dict_full`, :func:`load_trainable`: trainable parameters only, as FULL (unsharded) tensors
  named as in a single-process run, so a checkpoint loads in any number of processes.
- :func:`pad_batches`: evaluation runs as many forwards on every process (each one is a collective).
- :func:`optimizer_state`, :func:`load_optimizer_state`: the optimizer state, full (FQN-keyed) under FSDP,
  per-rank partitions under DeepSpeed, ``optimizer.state_dict()`` otherwise (single process, DDP: unchanged). The
  DeepSpeed partitions are written as tensors, numbers, strings and containers only and read back with
  ``torch.load(weights_only=True)``: a checkpoint file never runs code when it is loaded (see :func:`optimizer_state`).

The checkpoint functions and :func:`pad_batches` are collectives under FSDP / DeepSpeed: all processes call them, in
the same order. The DeepSpeed paths have not run (deepspeed is not installed where this project is tested).
"""

from __future__ import annotations

import copy
import enum
import os
import pathlib
import pickle
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..utils.safe_pickle import weights_only_reason
from ..utils.tensors import check_tensors_match
from .errors import CheckpointError

if TYPE_CHECKING:
    from accelerate import Accelerator


def _distributed_type(accelerator: Accelerator) -> tuple[Any, Any]:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type, DistributedType


def enable_cpu_fsdp(accelerator: Accelerator) -> bool:
    """Make ``ACCELERATE_USE_FSDP=true`` take effect on CPU processes (see the module docstring); True if it did.

    A no-op (False) unless the variable is set and accelerate chose ``MULTI_CPU``. Must run before
    ``accelerator.prepare``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... as accelerate does
    if accelerator.state.mixed_precision != "no":  # as AcceleratorState.__init__ does for FSDP on GPUs
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # both shared states: a later AcceleratorState() (accelerate makes them) copies PartialState's over its own
    for state in (accelerator.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    return True


def make_accelerator(precision: str, report_to: str = "none", project_dir: str | None = None) -> Accelerator:
    """The run's Accelerator: ``precision`` is accelerate's mixed precision; several processes without GPUs
    (torchrun / accelerate launch on CPU) get ``cpu=True`` (gloo), ``ACCELERATE_USE_FSDP`` takes effect there too
    (:func:`enable_cpu_fsdp`), and unsupported sharding is refused (:func:`check_supported`). ``report_to``: an
    accelerate tracker (``"tensorboard"``, ``"wandb"``) writing under ``project_dir``, or ``"none"``. In a single
    process accelerate's global state is reset first: a second run in the same process (tests, notebooks) may ask for
    another precision."""
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    trackers = {} if report_to == "none" else {"log_with": report_to, "project_dir": project_dir}
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available() and world > 1, **trackers)
    enable_cpu_fsdp(accelerator)
    check_supported(accelerator)
    return accelerator


def check_supported(accelerator: Accelerator) -> None:
    """Raise a ``ValueError`` for a sharding setup the trainer cannot checkpoint correctly (FSDP1)."""
    kind, types = _distributed_type(accelerator)
    if kind == types.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP_VERSION (fsdp_version): expected 2 (FSDP2, fully_shard: frozen and trainable parameters in one "
            f"module, full trainable checkpoints), got {accelerator.state.fsdp_plugin.fsdp_version}"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    """True under FSDP or DeepSpeed: parameters and optimizer state are partitioned over processes."""
    kind, types = _distributed_type(accelerator)
    return kind in (types.FSDP, types.DEEPSPEED)


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters: a forward without backward (evaluation) leaves the groups with
    ``reshard_after_forward=False`` (the root, accelerate's final-norm group) unsharded, and then ``named_parameters``
    yields plain tensors instead of the sharded ``DTensor`` parameters the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()  # all-gather: every process calls it
    return tensor.detach().cpu().contiguous()


def trainable_state_dict_full(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a prepared ``model``, full (unsharded), detached, on the CPU, named as in the
    unwrapped single-process model; complete on the main process (others may get an empty dict).

    FSDP2: each trainable ``DTensor`` is all-gathered (the frozen base is not). DeepSpeed: the parameters are gathered
    with ``deepspeed.zero.GatheredParameters`` (untested here: deepspeed is not installed on the test machine)."""
    from .tasks import trainable_state_dict

    kind, types = _distributed_type(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if kind == types.FSDP:
        reshard(model)
        return {n: _full(p) for n, p in unwrapped.named_parameters() if p.requires_grad}
    if kind == types.DEEPSPEED:
        import deepspeed

        params = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            out = {n: p.detach().cpu().clone() for n, p in params}
        return out if accelerator.is_main_process else {}
    return trainable_state_dict(unwrapped) if accelerator.is_main_process else {}


def load_trainable(
    accelerator: Accelerator, model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy full tensors into the trainable parameters of a prepared ``model`` (each process keeps its shard).

    ``tensors`` must hold exactly the trainable parameters' names with their full shapes, else a ``ValueError``
    names ``source`` (the file) and the mismatch."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kind, types = _distributed_type(accelerator)
    if kind == types.FSDP:
        reshard(model)
    params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    # a sharded parameter's full shape: ds_shape under ZeRO-3, the DTensor's (global) shape under FSDP2
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
    check_tensors_match(tensors, shapes, f"checkpoint {source}", hint=" (same --task, --dataset and model settings?)")
    with torch.no_grad():
        if kind == types.DEEPSPEED:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                for n, p in params.items():
                    p.copy_(tensors[n])
            return
        for n, p in params.items():
            source_tensor = tensors[n].to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                # every process holds the full tensor: each keeps its own chunk, no communication
                source_tensor = distribute_tensor(source_tensor, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(source_tensor)


def pad_batches(accelerator: Accelerator, batches: list[list[int]]) -> list[list[int]]:
    """``batches`` (lists of dataset indices), extended with ``[0]`` batches to the largest count over processes when
    the model is sharded: every forward is a collective there, so every process must run as many (the caller drops
    the padding batches' outputs). Unchanged otherwise."""
    if not is_sharded(accelerator) or accelerator.num_processes == 1:
        return batches
    from accelerate.utils import gather_object

    most = max(gather_object([len(batches)]))
    return batches + [[0]] * (most - len(batches))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _partition_file(directory: str | os.PathLike, rank: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"optimizer_rank_{rank}.pt"


_ATTRIBUTES_OF = "mit.attributes_of"
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _plain(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors (detached, so parameters become plain
    tensors), numbers, strings, dtypes, devices and dicts / lists / tuples of them; an enum becomes its value. Any
    other object is a ``TypeError`` naming ``where``."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, dict):
        return {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where}: cannot write a {_type_name(value)} into a DeepSpeed optimizer partition; expected tensors, "
        "numbers, strings, dtypes, devices, enums and dicts / lists / tuples of them (what torch.load(weights_only="
        "True) reads back), or an object directly under the state dict (saved as its attributes)"
    )


def _plain_partition(state: dict[str, Any], path: str) -> dict[str, Any]:
    """A ZeRO optimizer's ``state_dict()`` as plain data (see :func:`optimizer_state`)."""
    out = {}
    for key, value in state.items():
        if type(value) not in _PLAIN_TYPES and not isinstance(value, (torch.Tensor, enum.Enum, dict, list, tuple)):
            if not hasattr(value, "__dict__"):
                _plain(value, f"{path}[{key!r}]")  # raises the TypeError
            value = {_ATTRIBUTES_OF: _type_name(value), "attributes": _plain(vars(value), f"{path}[{key!r}]")}
        out[_plain(key, f"{path} key {key!r}")] = _plain(value, f"{path}[{key!r}]")
    return out


def _read_partition(path: pathlib.Path, optimizer: Any) -> dict[str, Any]:
    """One partition written by :func:`optimizer_state`, read with ``torch.load(weights_only=True)``; the top-level
    objects saved as attributes are set on copies of ``optimizer``'s attributes of the same names."""
    try:
        partition = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path.parent}: missing the DeepSpeed optimizer partition {path.name}"
        ) from None
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: {weights_only_reason(error)}, which torch.load(weights_only=True) does not "
            "admit; DeepSpeed optimizer partitions hold tensors, numbers, strings and containers only (partitions "
            "written before this format held DeepSpeed objects and cannot be read safely; resume from a newer "
            "checkpoint)"
        ) from None
    except Exception as error:  # truncated zip, ...
        raise CheckpointError(f"checkpoint {path}: unreadable DeepSpeed optimizer partition ({error})") from None
    if not isinstance(partition, dict):
        raise CheckpointError(f"{path}: expected a DeepSpeed optimizer state dict, got {type(partition).__name__}")
    for key, value in partition.items():
        if isinstance(value, dict) and _ATTRIBUTES_OF in value:
            live = getattr(optimizer, key, None) if isinstance(key, str) else None
            if (
                live is None
                or _type_name(live) != value[_ATTRIBUTES_OF]
                or not isinstance(value.get("attributes"), dict)
            ):
                raise CheckpointError(
                    f"{path}: {key!r} holds the attributes of a {value[_ATTRIBUTES_OF]}, but the optimizer's {key!r} "
                    f"is {_type_name(live) if live is not None else 'missing'}; expected the DeepSpeed version and "
                    "settings of the run that wrote the checkpoint"
                )
            restored = copy.copy(live)
            restored.__dict__.update(value["attributes"])
            partition[key] = restored
    return partition


def optimizer_state(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike
) -> Any:
    """What the checkpoint's ``trainer_state.pt`` stores for ``optimizer`` (complete on the main process).

    FSDP: the full optimizer state keyed by parameter names (``get_optimizer_state_dict`` with ``full_state_dict``,
    gathered to the main process). DeepSpeed: each process writes its own partition to
    ``directory/optimizer_rank_<rank>.pt`` (as DeepSpeed's own checkpoints do) and the value only records how many.
    Otherwise (one process, DDP): ``optimizer.state_dict()``.

    A ZeRO optimizer's ``state_dict()`` also holds Python objects (the ``loss_scaler``, a ``ZeroStageEnum``) that only
    a full unpickler reads back. The partition is written as plain data instead: enums as their values, and an object
    at the top level as its attributes (``{"mit.attributes_of": "<module>.<class>", "attributes": {...}}``), which
    :func:`load_optimizer_state` sets on a copy of the optimizer's own attribute of that name. Any other object is a
    ``TypeError`` here, when the checkpoint is written, rather than a partition that cannot be read back safely."""
    kind, types = _distributed_type(accelerator)
    if kind == types.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        reshard(model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, _inner(optimizer), options=options)
    if kind == types.DEEPSPEED:
        path = _partition_file(directory, accelerator.process_index)
        torch.save(_plain_partition(_inner(optimizer).state_dict(), str(path)), path)
        return {"deepspeed_partitions": accelerator.num_processes}
    return optimizer.state_dict()


def load_optimizer_state(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Any,
    directory: str | os.PathLike,
) -> None:
    """Restore what :func:`optimizer_state` returned (every process passes the checkpoint's value and directory).

    DeepSpeed: ZeRO's ``load_state_dict`` takes every partition and picks its own; the fp32 master weights come
    from the saved partitions (``load_from_fp32_weights``). Each partition is read with
    ``torch.load(weights_only=True)``; a file that needs anything else (one written before partitions were plain
    data, or a crafted one) is a ``CheckpointError`` naming it, and nothing in it runs."""
    kind, types = _distributed_type(accelerator)
    if kind == types.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        reshard(model)
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state, options=options)
    elif kind == types.DEEPSPEED:
        count = state["deepspeed_partitions"]
        inner = _inner(optimizer)
        partitions = [_read_partition(_partition_file(directory, r), inner) for r in range(count)]
        inner.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)


__all__ = [
    "check_supported",
    "enable_cpu_fsdp",
    "is_sharded",
    "load_optimizer_state",
    "load_trainable",
    "optimizer_state",
    "pad_batches",
    "reshard",
    "trainable_state_dict_full",
]
