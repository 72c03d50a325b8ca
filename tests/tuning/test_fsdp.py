"""Two CPU processes under accelerate's FSDP2 (``accelerate launch --config_file`` with examples/accelerate_fsdp.yaml
made to run on CPUs: frozen base sharded, decoder layers auto-wrapped) train the cls task:
the loss curve, the trainable checkpoints and the optimizer state match one process on the same global batch, the base
is really sharded, only MiT parameters and the head train, a resumed run continues the curve, and the checkpoint
evaluates in one process.

accelerate 1.15 alone would run these processes with DDP (FSDP is only switched on for accelerator devices):
``mit.tuning.distributed.enable_cpu_fsdp`` switches it on, and the worker records what accelerate chose by itself."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tuning_fixtures import make_food101, one_thread, write_tiny_clip_config, write_tiny_llama
from tuning_fsdp_worker import make_config, record_grad_norms

from mit.tuning.trainer import Trainer, evaluate_checkpoint

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
ROOT = pathlib.Path(__file__).resolve().parents[2]
HALF = 2  # optimizer steps before the checkpoint the FSDP run resumes from (3 steps per epoch: 12 samples, batch 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: pathlib.Path) -> list[dict[str, float]]:
    with open(run / "loss.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(FSDP run directory, its workers' shard records, the single-process Trainer after the same steps)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    llama, clip = write_tiny_llama(tmp / "llama"), write_tiny_clip_config(tmp)
    data = make_food101(tmp / "food", per_class=4)
    out = tmp / "fsdp"
    # examples/accelerate_fsdp.yaml, on 2 CPU processes, fp32; the tiny model infuses both its layers
    config = yaml.safe_load((ROOT / "examples" / "accelerate_fsdp.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no", num_processes=2)
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = "MiTLlamaDecoderLayer"
    (tmp / "fsdp.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / "fsdp.yaml")]
    command += ["--main_process_port", str(_free_port()), str(ROOT / "tests" / "tuning_fsdp_worker.py")]
    command += [str(llama), str(clip), str(data), str(out), str(HALF)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    shards = [json.loads((out / f"shard_{rank}.json").read_text()) for rank in (0, 1)]
    # one process, the same global batch (4 = 2 processes x 2), the same steps, no FSDP
    single = Trainer(
        make_config(str(llama), str(clip), str(data), str(tmp / "single"), batch_size=4, max_steps=2 * HALF)
    )
    single.grad_norms = record_grad_norms(single.accelerator)
    single.train()
    return out, shards, single


def test_base_is_sharded_and_only_mit_and_head_train(runs):
    _, shards, single = runs
    assert {s["accelerate_alone"] for s in shards} == {"DistributedType.MULTI_CPU"}  # what enable_cpu_fsdp fixes
    full = shards[0]["base_full"]
    assert full == sum(p.numel() for p in single.unwrapped.parameters() if not p.requires_grad)
    assert sum(s["base_local"] for s in shards) == full  # every element of the frozen base on exactly one process
    for s in shards:
        assert 0.4 * full < s["base_local"] < 0.6 * full
    trainable = sorted(n for n, p in single.unwrapped.named_parameters() if p.requires_grad)
    assert shards[0]["trainable"] == shards[1]["trainable"] == trainable
    assert all(".mit_" in n or n.startswith("head.") for n in trainable), trainable
    assert sum(s["trainable_local"] for s in shards) == shards[0]["trainable_full"]


def test_loss_curve_and_gradient_norms_match_one_process_and_resume_continues_the_curve(runs):
    out, shards, single = runs
    fsdp, reference = _losses(out), _losses(pathlib.Path(single.config.run.out))
    assert [r["global_step"] for r in fsdp] == [1.0, 2.0, 3.0, 4.0]  # steps 3-4 come from the resumed Trainer
    assert [r["global_step"] for r in reference] == [1.0, 2.0, 3.0, 4.0]
    # equal up to reduction order (FSDP reduce-scatters gradients, the loss is a mean of the two processes' means)
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in fsdp]), torch.tensor([r["loss"] for r in reference]), rtol=1e-5, atol=0
    )
    assert fsdp[-1]["loss"] < fsdp[0]["loss"] - 0.02  # the curve moves: the comparison is not of constants
    assert (out / "checkpoints" / "latest").read_text() == "step-0000004"
    # gradient clipping (max_grad_norm 0.05) under FSDP: the global norm of the full gradient, on both processes
    assert len(single.grad_norms) == 4 and min(single.grad_norms) > 0.05  # it does clip
    for s in shards:  # recorded on the shared accelerator: the first and the resumed Trainer's steps
        torch.testing.assert_close(torch.tensor(s["grad_norms"]), torch.tensor(single.grad_norms), rtol=1e-4, atol=0)


def test_checkpoints_hold_full_trainable_tensors_and_optimizer_state(runs):
    out, _, single = runs
    reference_root = pathlib.Path(single.config.run.out) / "checkpoints"
    names = [n for n, p in single.unwrapped.named_parameters() if p.requires_grad]  # the optimizer's order
    for step in ("step-0000003", "step-0000004"):
        ckpt, reference = out / "checkpoints" / step, reference_root / step
        weights, expected = load_file(ckpt / "trainable.safetensors"), load_file(reference / "trainable.safetensors")
        assert sorted(weights) == sorted(expected) == sorted(names)
        for name in names:
            assert weights[name].shape == expected[name].shape, name  # full, not a shard
            torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=1e-5)
        optimizer = torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]
        reference_optimizer = torch.load(reference / "trainer_state.pt", weights_only=False)["optimizer"]
        assert set(optimizer["state"]) == set(names)  # full state, keyed by parameter name
        for index, name in enumerate(names):
            for key in ("exp_avg", "exp_avg_sq"):
                got, want = optimizer["state"][name][key], reference_optimizer["state"][index][key]
                assert got.shape == want.shape, (name, key)
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-9)
        assert not any(p.name.startswith(".tmp") for p in out.joinpath("checkpoints").iterdir())


def test_fsdp_checkpoint_evaluates_in_one_process(runs):
    out, _, single = runs
    # the end-of-epoch evaluation under FSDP (uneven shards, as many forwards on each process) = one process's
    with open(out / "metrics.csv") as f, open(pathlib.Path(single.config.run.out) / "metrics.csv") as g:
        fsdp_rows, single_rows = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert len(fsdp_rows) == len(single_rows) == 1 and fsdp_rows[0].keys() == single_rows[0].keys()
    for key, value in single_rows[0].items():
        assert float(fsdp_rows[0][key]) == pytest.approx(float(value), rel=1e-5), key
    metrics = evaluate_checkpoint(out)  # one process, no FSDP: the full tensors load as they are
    expected = single.evaluate()
    assert metrics.keys() == expected.keys()
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["accuracy"] == expected["accuracy"]


def test_fsdp1_is_refused_and_mismatched_checkpoints_are_named(runs):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mit.tuning import distributed

    def fsdp(version: int) -> SimpleNamespace:
        return SimpleNamespace(
            distributed_type=DistributedType.FSDP,
            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)),
        )

    distributed.check_supported(fsdp(2))
    with pytest.raises(ValueError, match=r"FSDP_VERSION \(fsdp_version\): expected 2 .*got 1"):
        distributed.check_supported(fsdp(1))
    _, _, single = runs
    tensors = load_file(pathlib.Path(single.config.run.out) / "checkpoints" / "step-0000004" / "trainable.safetensors")
    name = "head.net.0.bias"
    with pytest.raises(ValueError, match=r"x\.safetensors does not match the model: missing \['head\.net\.0\.bias'\]"):
        distributed.load_trainable(
            single.accelerator, single.model, {k: v for k, v in tensors.items() if k != name}, "x.safetensors"
        )
    with pytest.raises(ValueError, match=r"head\.net\.0\.bias has shape \(1,\), the model expects"):
        distributed.load_trainable(single.accelerator, single.model, {**tensors, name: torch.zeros(1)}, "x.safetensors")
