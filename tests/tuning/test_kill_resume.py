"""kill -9 at any point of writing a checkpoint, then --resume: the loss curve and the trained weights are those of
the uninterrupted run, bit for bit (the previous complete checkpoint is used; the incomplete one is ignored and
removed). SIGTERM removes the incomplete checkpoint itself; a second run on the directory of a running one is
refused."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest
import torch
from forked_runs import ForkServer
from safetensors.torch import load_file
from tuning_fixtures import write_tiny_llama

from mit.tuning.trainer import RUN_LOCK

ROOT = pathlib.Path(__file__).resolve().parents[2]
# each optimizer step writes a checkpoint: rng state (torch.save), weights (serialize_tensors), trainer state
# (torch.save), the directory rename (os.rename), then `latest`, loss.csv and metrics.csv (atomic_write_text)
KILL_POINTS = ["torch.save:7", "serialize_tensors:4", "torch.save:8", "os.rename:4", "atomic_write_text:14"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The kill worker (tests/tuning_kill_worker.py), each run a process forked from one interpreter that imported it
    (tests/forked_runs.py): 15 runs in this module, each a process of its own, without 15 imports of torch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    server = ForkServer(env, tmp_path_factory.mktemp("runs"), worker=ROOT / "tests" / "tuning_kill_worker.py")
    yield server
    server.close()


def run(worker: ForkServer, settings: dict, kill_at: str) -> subprocess.CompletedProcess:
    return worker.run([json.dumps(settings), kill_at], timeout=240)


@pytest.fixture(scope="module")
def straight(worker, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    llama = str(write_tiny_llama(root / "llama"))
    settings = dict(task="toy", model=llama, data=str(root), modality_dim=16, batch_size=2, lr=1e-2, epochs=2)
    settings.update(checkpoint_every=1, keep_checkpoints=2, progress=False, limit_train=6, limit_eval=4)
    done = run(worker, {**settings, "out": str(root / "straight")}, "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return settings, root / "straight"


def final_weights(out: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "trainable.safetensors")


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_while_checkpointing_then_resume_is_exact(worker, straight, tmp_path, kill_at):
    settings, reference = straight
    out = tmp_path / "run"
    killed = run(worker, {**settings, "out": str(out)}, kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert_resume_is_exact(worker, settings, reference, out)


def assert_resume_is_exact(worker: ForkServer, settings: dict, reference: pathlib.Path, out: pathlib.Path) -> None:
    resumed = run(worker, {**settings, "out": str(out), "resume": True}, "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "loss.csv").read_text() == (reference / "loss.csv").read_text()
    assert (out / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def temporaries(out: pathlib.Path) -> list[str]:
    return [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_sigterm_while_checkpointing_removes_the_temporary_then_resume_is_exact(worker, straight, tmp_path):
    """SIGTERM (a scheduler's or a container's stop) still ends the process as SIGTERM does, but first removes the
    incomplete checkpoint and releases the run directory."""
    settings, reference = straight
    out = tmp_path / "run"
    terminated = run(worker, {**settings, "out": str(out)}, "torch.save:8:TERM")  # the 4th checkpoint's trainer state
    assert terminated.returncode == -signal.SIGTERM, (terminated.returncode, terminated.stderr[-2000:])
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert f"mit: warning: terminated by SIGTERM; the last complete checkpoint is {last}" in terminated.stderr
    assert temporaries(out) == []  # before any resume
    assert not (out / RUN_LOCK).exists()  # released (and removed)
    assert_resume_is_exact(worker, settings, reference, out)


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_is_checkpointing(worker, straight, tmp_path):
    """Two runs on one directory at the same moment: the second is refused at once and writes nothing (no config.json
    of its own beside the first one's checkpoints, no temporary of its own, nothing of the first's removed)."""
    settings, reference = straight
    out, release = tmp_path / "run", tmp_path / "release"
    first = worker.start([json.dumps({**settings, "out": str(out)}), f"torch.save:1:WAIT={release}"])
    try:
        deadline = time.monotonic() + 200
        while not ((out / "checkpoints").is_dir() and temporaries(out)):  # inside its first checkpoint
            assert first.poll() is None and time.monotonic() < deadline, first.stderr[-3000:]
            time.sleep(0.05)
        in_progress = temporaries(out)
        second = run(worker, {**settings, "out": str(out), "lr": 0.5, "resume": True}, "none")
        assert second.returncode == 1 and "RunDirectoryError" in second.stderr, second.stderr[-2000:]
        assert f"out: {out} is in use by another run (pid {first.pid} on " in second.stderr
        assert temporaries(out) == in_progress and json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01
        release.touch()
        assert first.wait(240) == 0, first.stderr[-3000:]
    finally:
        first.kill()
    assert (out / "loss.csv").read_text() == (reference / "loss.csv").read_text()
    assert temporaries(out) == []
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert json.loads((last / "config.json").read_text())["optim"]["lr"] == 0.01
