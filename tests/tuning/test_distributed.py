"""Two CPU processes (gloo) train one step on different shards: their parameters stay identical (the gradients were
averaged) and equal one process's step on the union of the two batches."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tuning_ddp_worker import make_config
from tuning_fixtures import make_food101, one_thread, write_tiny_clip_config, write_tiny_llama

from mit.tuning.trainer import Trainer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_synchronise_gradients(tmp_path):
    llama, clip = write_tiny_llama(tmp_path / "llama"), write_tiny_clip_config(tmp_path)
    data = make_food101(tmp_path / "food")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "tuning_ddp_worker.py"),
        str(llama),
        str(clip),
        str(data),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(out / "rank_0.safetensors"), load_file(out / "rank_1.safetensors")
    b0, b1 = load_file(out / "batch_0.safetensors")["indices"], load_file(out / "batch_1.safetensors")["indices"]
    assert set(b0.tolist()).isdisjoint(b1.tolist())  # different data on each process
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # ... and still the same parameters

    # one process, one step on the union of both batches (4 samples; mean loss = mean of the two processes' means)
    config = make_config(str(llama), str(clip), str(data), str(tmp_path / "single"), batch_size=4)
    single = Trainer(config)
    assert sorted(single._train_batches(0)[0]) == sorted(b0.tolist() + b1.tolist())
    single.train()
    params = dict(single.unwrapped.named_parameters())
    for name, tensor in rank0.items():  # Adam's first step: about lr x sign(gradient); equal up to rounding
        torch.testing.assert_close(params[name].detach(), tensor, atol=5e-5, rtol=0)
    initial = Trainer(config.replace(out=str(tmp_path / "init"), max_steps=None))
    change = max(
        (p.detach() - rank0[n]).abs().max().item() for n, p in initial.unwrapped.named_parameters() if n in rank0
    )
    assert change > 5e-4  # the step moved the parameters (by about lr)
