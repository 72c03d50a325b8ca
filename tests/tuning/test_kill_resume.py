"""kill -9 at any point of writing a checkpoint, then --resume: the loss curve and the trained weights are those of
the uninterrupted run, bit for bit (the previous complete checkpoint is used; the incomplete one is ignored and
removed)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tuning_fixtures import write_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[2]
# each optimizer step writes a checkpoint: rng state (torch.save), weights (save_file), trainer state (torch.save),
# the directory rename (os.rename), then `latest`, loss.csv and metrics.csv (atomic_write_text)
KILL_POINTS = ["torch.save:7", "save_file:4", "torch.save:8", "os.rename:4", "atomic_write_text:14"]


def run(settings: dict, kill_at: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    command = [sys.executable, str(ROOT / "tests" / "tuning_kill_worker.py"), json.dumps(settings), kill_at]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    llama = str(write_tiny_llama(root / "llama"))
    settings = dict(task="toy", model=llama, data=str(root), modality_dim=16, batch_size=2, lr=1e-2, epochs=2)
    settings.update(checkpoint_every=1, keep_checkpoints=2, progress=False, limit_train=6, limit_eval=4)
    done = run({**settings, "out": str(root / "straight")}, "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return settings, root / "straight"


def final_weights(out: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "trainable.safetensors")


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_while_checkpointing_then_resume_is_exact(straight, tmp_path, kill_at):
    settings, reference = straight
    out = tmp_path / "run"
    killed = run({**settings, "out": str(out)}, kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    resumed = run({**settings, "out": str(out), "resume": True}, "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "loss.csv").read_text() == (reference / "loss.csv").read_text()
    assert (out / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
