"""Files a user downloads never run code when loaded: every pickled dataset format (MMSA's features, refer's refs,
MMUD's records and CLIP embeddings) goes through mit.utils.safe_pickle, DeepSpeed optimizer partitions through
torch.load(weights_only=True). Each loader is given a crafted file whose unpickling would create a marker file; it
must refuse the file, naming it, and the marker must not exist. Genuine files, also as numpy 1.x writes them, load."""

from __future__ import annotations

import enum
import fractions
import io
import os
import pickle
import pickletools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.storage
from accelerate.utils import DistributedType
from tuning_fixtures import make_mmud, make_mosi, make_refcoco

from mit.tuning import distributed
from mit.tuning.data import DatasetError, MMUDDataset, MSADataset, RefCOCODataset
from mit.tuning.trainer import CheckpointError
from mit.utils.safe_pickle import UnsafePickleError, load_pickle


class _Exec:
    """Unpickling it calls ``builtins.exec``, which creates ``marker``."""

    def __init__(self, marker: os.PathLike) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class _System:
    """Unpickling it calls ``os.system`` (``posix.system``), which creates ``marker``."""

    def __init__(self, marker: os.PathLike) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Reduce:
    """Unpickling it calls ``func(*args)``."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _write(path, obj, protocol: int = pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


PAYLOADS = {"exec": (_Exec, "builtins.exec"), "system": (_System, f"{os.system.__module__}.system")}


@pytest.fixture(params=sorted(PAYLOADS))
def payload(request, tmp_path):
    """(an object whose unpickling creates the marker, the marker path, the global the pickle references)."""
    cls, name = PAYLOADS[request.param]
    marker = tmp_path / f"marker-{request.param}"
    return cls(marker), marker, name


def test_the_payloads_run_under_plain_pickle(payload):
    """The crafted objects are live: a plain unpickler creates the marker (so the tests below can fail)."""
    obj, marker, name = payload
    data = pickle.dumps({"train": [obj]})
    assert name.rsplit(".", 1)[1].encode() in data
    pickle.loads(data)
    assert marker.is_file()


def _refused(marker, name: str, path) -> str:
    assert not marker.exists(), "the payload ran"
    module, function = name.rsplit(".", 1)
    module = r"(builtins|__builtin__)" if module == "builtins" else module  # protocols 0-2 write Python 2's name
    return rf"refusing to load {module}\.{function} from .*{re.escape(path.name)}: dataset pickles"


def test_msa_feature_pickle(tmp_path, payload):
    obj, marker, name = payload
    root = make_mosi(tmp_path / "mosi")
    data = pickle.loads((root / "unaligned_50.pkl").read_bytes())
    data["train"]["annotations"] = [obj]
    evil = root / "evil.pkl"  # any path is accepted as --feature-file
    evil.write_bytes(pickle.dumps(data))
    with pytest.raises(DatasetError) as error:
        MSADataset(root, "train", feature_file="evil.pkl")
    assert not marker.exists()
    assert error.match(_refused(marker, name, evil))
    with pytest.raises(DatasetError, match=_refused(marker, name, evil)):
        MSADataset(evil, "test")  # a file as the data root


def test_refcoco_refs_pickle(tmp_path, payload):
    obj, marker, name = payload
    root = make_refcoco(tmp_path / "refer")
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    refs[0]["sentences"][0]["sent"] = obj
    path.write_bytes(pickle.dumps(refs, protocol=2))  # refer's files are Python 2 pickles
    with pytest.raises(DatasetError) as error:
        RefCOCODataset(root, "refcoco", "train")
    assert not marker.exists()
    assert error.match(_refused(marker, name, path))


def test_mmud_records_pickle(tmp_path, payload):
    obj, marker, name = payload
    root = make_mmud(tmp_path / "mmud")
    path = root / "train.pkl"
    rows = pickle.loads(path.read_bytes())
    rows[1] = (*rows[1][:5], obj, *rows[1][6:])
    path.write_bytes(pickle.dumps(rows))
    with pytest.raises(DatasetError) as error:
        MMUDDataset(root, "train")
    assert not marker.exists()
    assert error.match(_refused(marker, name, path))


def test_mmud_embedding_pickle(tmp_path, payload):
    obj, marker, name = payload
    root = make_mmud(tmp_path / "mmud")
    data = MMUDDataset(root, "train", image_size=32)
    path = root / "CLIPGENFeatureUN" / "0.jpg.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DatasetError) as error:
        data[0]
    assert not marker.exists()
    assert error.match(_refused(marker, name, path))
    assert data[1]["glb_target"].shape == (8,)  # the genuine ones still load


class _StorageFromBytes:
    """A pickle that calls ``torch.storage._load_from_bytes(blob)`` (what a pickled tensor's storage is), whose
    original runs ``torch.load(blob, weights_only=False)``."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


def test_mmud_embedding_with_code_in_the_tensor_storage(tmp_path, payload):
    """The tensor path of the unpickler reads a storage's embedded torch.save blob with weights_only=True."""
    obj, marker, _ = payload
    root = make_mmud(tmp_path / "mmud")
    blob = io.BytesIO()
    torch.save(obj, blob, _use_new_zipfile_serialization=False)
    path = root / "CLIPGENFeatureUN" / "0.jpg.pkl"
    path.write_bytes(pickle.dumps(_StorageFromBytes(blob.getvalue())))
    with pytest.raises(DatasetError, match=r"refusing to load a torch storage that torch.load\(weights_only=True\)"):
        MMUDDataset(root, "train", image_size=32)[0]
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"torch._utils._rebuild_tensor_v2 with other arguments"):
        load_pickle(
            _write(tmp_path / "bad.pkl", _Reduce(torch._utils._rebuild_tensor_v2, ("x", 0, (1,), (1,)))), tensors=True
        )


def test_tensors_only_where_the_format_has_them(tmp_path):
    """MMUD's records, MMSA's features and refer's refs hold no tensors: a tensor there is refused; MMUD's
    embeddings are tensors (the authors' loader torch.stack's them) or numpy arrays."""
    root = make_mmud(tmp_path / "mmud")
    rows = pickle.loads((root / "train.pkl").read_bytes())
    rows[0] = (*rows[0][:5], torch.zeros(2), *rows[0][6:])
    _write(root / "train.pkl", rows)
    with pytest.raises(DatasetError, match=r"refusing to load torch._utils._rebuild_tensor_v2 from .*train.pkl"):
        MMUDDataset(root, "train")
    embedding = np.arange(8, dtype=np.float32)
    _write(root / "CLIPGENFeatureUN" / "100.jpg.pkl", embedding)
    assert torch.equal(MMUDDataset(root, "valid", image_size=32)[0]["glb_target"], torch.from_numpy(embedding))


def _as_numpy1(data: bytes) -> bytes:
    """The pickle ``data`` with numpy's globals under the names numpy 1.x writes (``numpy.core.*`` for numpy 2's
    ``numpy._core.*``). Frames (protocol 4+) are dropped, as the renamed strings change their lengths; an unframed
    pickle is valid at every protocol."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        chunk = data[pos : ops[i + 1][2] if i + 1 < len(ops) else len(data)]
        if op.name == "FRAME":
            continue
        if isinstance(arg, str) and arg.startswith("numpy._core"):
            new = arg.replace("numpy._core", "numpy.core", 1)
            if op.name == "GLOBAL":
                chunk = b"c" + new.replace(" ", "\n").encode() + b"\n"
            elif op.name == "SHORT_BINUNICODE":
                chunk = b"\x8c" + bytes([len(new)]) + new.encode()
            else:
                raise AssertionError(f"unexpected {op.name} {arg!r}")
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy1_pickles_load(tmp_path, protocol):
    """MMSA's files were written by numpy 1.x (``numpy.core.multiarray._reconstruct``, ``numpy.core.numeric.
    _frombuffer`` at protocol 5): they load, and give the arrays the numpy 2 file gives."""
    root = make_mosi(tmp_path / "mosi")
    data = pickle.loads((root / "unaligned_50.pkl").read_bytes())
    data["train"]["regression_labels"] = [np.float32(v) for v in data["train"]["regression_labels"]]  # scalars
    data["train"]["empty"] = np.zeros((0, 3), dtype=np.float32)
    data["train"]["raw_text"] = np.array(list(data["train"]["raw_text"]), dtype=object)
    old = _as_numpy1(pickle.dumps(data, protocol=protocol))
    assert b"numpy._core" not in old and b"numpy.core.multiarray" in old
    if protocol == 5:
        assert b"numpy.core.numeric" in old and b"_frombuffer" in old
    (root / "unaligned_50.pkl").write_bytes(old)
    reread = load_pickle(root / "unaligned_50.pkl")
    for split in data:
        for key, value in data[split].items():
            if isinstance(value, np.ndarray):
                assert type(reread[split][key]) is np.ndarray and reread[split][key].dtype == value.dtype, key
                np.testing.assert_array_equal(reread[split][key], value)
            else:
                assert reread[split][key] == value, key
    assert [type(v) for v in reread["train"]["regression_labels"]] == [np.float32] * 6
    dataset = MSADataset(root, "train")
    assert dataset.texts == [str(t) for t in data["train"]["raw_text"]]
    audio = np.nan_to_num(data["train"]["audio"], nan=0.0, posinf=0.0, neginf=0.0)
    np.testing.assert_array_equal(dataset.features["audio"], audio)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_tensors_and_arrays_round_trip(tmp_path, protocol):
    """Everything the formats hold comes back equal, at every protocol (0-2 write bytes through _codecs.encode)."""
    tensor = torch.randn(2, 3)[:, 1:]  # a view: offset and strides
    value = {"t": tensor, "a": np.arange(6.0).reshape(2, 3), "b": [b"", b"\xff\x00"], "n": (1, 2.5, None, True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation from pickling a tensor
        path = _write(tmp_path / "x.pkl", value, protocol)
    back = load_pickle(path, tensors=True)
    assert torch.equal(back["t"], tensor) and back["t"].stride() == tensor.stride()
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["b"] == value["b"] and back["n"] == value["n"]
    with pytest.raises(UnsafePickleError, match=r"refusing to load torch\._utils\._rebuild_tensor_v2 from .*x\.pkl"):
        load_pickle(path)


def test_embedding_pickled_from_a_gpu_loads_on_the_cpu(tmp_path):
    """The authors computed the CLIP embeddings on a GPU: a tensor pickled there names the device ``cuda:0`` in its
    storage; the storage is read with ``map_location="cpu"`` (this machine need not have CUDA)."""
    from collections import OrderedDict

    values = torch.arange(8, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        blob = values.storage().__reduce__()[1][0]  # the legacy torch.save of the storage a pickled tensor embeds
    assert blob.count(b"X\x03\x00\x00\x00cpu") == 1
    blob = blob.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    gpu_tensor = _Reduce(
        torch._utils._rebuild_tensor_v2, (_StorageFromBytes(blob), 0, (8,), (1,), False, OrderedDict())
    )
    root = make_mmud(tmp_path / "mmud")
    _write(root / "CLIPGENFeatureUN" / "0.jpg.pkl", gpu_tensor)
    target = MMUDDataset(root, "train", image_size=32)[0]["glb_target"]
    assert target.device.type == "cpu" and torch.equal(target, values)


# -- DeepSpeed optimizer partitions ---------------------------------------------------------------------------------


class _ZeroStage(int, enum.Enum):
    weights = 3


class _LossScaler:
    def __init__(self, scale: float) -> None:
        self.cur_scale, self.cur_iter, self.dynamic, self.dtype = scale, 7, True, torch.float16


class _ZeroOptimizer:
    """The part of DeepSpeed's ZeRO-3 optimizer that the checkpoint uses: ``state_dict()`` with the keys and types of
    ``DeepSpeedZeroOptimizer_Stage3._rigid_state_dict`` (an enum, the loss scaler object, flags, the base optimizer's
    state dict, the fp32 partitions) and ``load_state_dict(list of partitions, ...)``."""

    def __init__(self) -> None:
        self.fp32 = torch.nn.Parameter(torch.randn(5))
        self.optimizer = torch.optim.Adam([self.fp32], lr=0.1)
        self.fp32.grad = torch.ones(5)
        self.optimizer.step()
        self.loss_scaler = _LossScaler(65536.0)
        self.loaded = None

    def state_dict(self) -> dict:
        return {
            "zero_stage": _ZeroStage.weights,
            "loss_scaler": self.loss_scaler,
            "dynamic_loss_scale": True,
            "overflow": False,
            "partition_count": 1,
            "optimizer_state_dict": self.optimizer.state_dict(),
            "fp32_flat_groups": [self.fp32],
        }

    def load_state_dict(self, partitions, load_optimizer_states=True, load_from_fp32_weights=False) -> None:
        self.loaded = partitions


class _Wrapped:  # accelerate's optimizer wrapper
    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


class _DeepSpeedAccelerator:
    distributed_type = DistributedType.DEEPSPEED
    process_index, num_processes = 0, 1


def test_deepspeed_partition_round_trip(tmp_path):
    zero = _ZeroOptimizer()
    state = distributed.optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), tmp_path)
    path = tmp_path / "optimizer_rank_0.pt"
    assert state == {"deepspeed_partitions": 1}
    plain = torch.load(path, weights_only=True)  # no DeepSpeed object in the file
    assert plain["zero_stage"] == 3 and type(plain["zero_stage"]) is int
    assert plain["loss_scaler"]["attributes"]["cur_scale"] == 65536.0
    zero.loss_scaler.cur_scale = 1.0  # changed since the checkpoint
    distributed.load_optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), state, tmp_path)
    (loaded,) = zero.loaded
    scaler = loaded["loss_scaler"]
    assert type(scaler) is _LossScaler and scaler is not zero.loss_scaler
    assert vars(scaler) == {"cur_scale": 65536.0, "cur_iter": 7, "dynamic": True, "dtype": torch.float16}
    assert loaded["zero_stage"] == _ZeroStage.weights and loaded["overflow"] is False
    assert torch.equal(loaded["fp32_flat_groups"][0], zero.fp32.detach())
    saved = zero.optimizer.state_dict()
    assert torch.equal(loaded["optimizer_state_dict"]["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    zero.optimizer.load_state_dict(loaded["optimizer_state_dict"])  # what ZeRO does with it


def test_deepspeed_partition_with_code_is_refused(tmp_path, payload):
    obj, marker, name = payload
    zero = _ZeroOptimizer()
    state = distributed.optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), tmp_path)
    path = tmp_path / "optimizer_rank_0.pt"
    torch.save({"loss_scaler": obj, "optimizer_state_dict": zero.optimizer.state_dict()}, path)
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*optimizer_rank_0\.pt: it references the global"
    ) as error:
        distributed.load_optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), state, tmp_path)
    assert not marker.exists() and zero.loaded is None
    assert name.rsplit(".", 1)[1] in str(error.value)


def test_deepspeed_partition_errors(tmp_path):
    zero = _ZeroOptimizer()
    zero.loss_scaler = fractions.Fraction(1, 3)  # a top-level object without attributes
    with pytest.raises(TypeError, match=r"optimizer_rank_0\.pt\['loss_scaler'\]: cannot write a fractions\.Fraction"):
        distributed.optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), tmp_path)
    zero = _ZeroOptimizer()
    zero.optimizer.state_dict = lambda: {"state": {0: {"step": fractions.Fraction(1, 3)}}}  # nested: refused too
    with pytest.raises(TypeError, match=r"\['optimizer_state_dict'\]\['state'\]\[0\]\['step'\]: cannot write a"):
        distributed.optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), tmp_path)
    zero = _ZeroOptimizer()
    state = distributed.optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), tmp_path)
    zero.loss_scaler = {"not": "a loss scaler"}
    with pytest.raises(CheckpointError, match=r"'loss_scaler' holds the attributes of a .*_LossScaler, but the"):
        distributed.load_optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), state, tmp_path)
    torch.save(_ZeroOptimizer().state_dict(), tmp_path / "optimizer_rank_0.pt")  # as written before: objects
    with pytest.raises(CheckpointError, match=r"optimizer_rank_0\.pt: it references the global .*_ZeroStage, which"):
        distributed.load_optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), state, tmp_path)
    (tmp_path / "optimizer_rank_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing the DeepSpeed optimizer partition optimizer_rank_0\.pt"):
        distributed.load_optimizer_state(_DeepSpeedAccelerator(), None, _Wrapped(zero), state, tmp_path)
