"""One run of tests/tuning/test_kill_resume.py: trains the toy task and kills itself with SIGKILL when a chosen
checkpoint-writing call starts (``<name>:<n>``: the n-th call of torch.save / serialize_tensors / os.rename /
atomic_write_text inside the trainer and its checkpoint / run-directory parts, counted together), as a power cut or an
OOM kill would. ``<name>:<n>:TERM`` sends SIGTERM instead (as ``kill``, a job scheduler or a container stop would);
``<name>:<n>:WAIT=<file>`` pauses there, in the middle of writing a checkpoint, until ``<file>`` exists."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time

import torch
import tuning_toy_task

import mit.tuning.checkpoints as checkpoints_module
import mit.tuning.run_dir as run_dir_module
import mit.tuning.trainer as trainer_module
from mit.tuning.config import RunConfig
from mit.tuning.tasks import register_task


def stop_at(name: str, count: int, action: str) -> None:
    calls = {"n": 0}
    if name == "torch.save":
        holders = [(torch, "save")]
    elif name == "os.rename":
        holders = [(os, "rename")]
    else:  # a name the trainer's modules import: patched in each of them, one count for all
        modules = (trainer_module, checkpoints_module, run_dir_module)
        holders = [(module, name) for module in modules if hasattr(module, name)]
    original = getattr(*holders[0])  # the same function in every module that imports it

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            if action.startswith("WAIT="):
                release, deadline = pathlib.Path(action[len("WAIT=") :]), time.monotonic() + 200
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            else:
                os.kill(os.getpid(), signal.SIGTERM if action == "TERM" else signal.SIGKILL)
        return original(*args, **kwargs)

    for holder, attribute in holders:
        setattr(holder, attribute, wrapper)


def main(settings_json: str, kill_at: str) -> None:
    torch.set_num_threads(1)
    register_task(tuning_toy_task.SPEC, replace=True)
    if kill_at != "none":
        name, count, *action = kill_at.split(":", 2)
        stop_at(name, int(count), action[0] if action else "KILL")
    trainer_module.Trainer(RunConfig.from_dict(json.loads(settings_json))).train()


if __name__ == "__main__":
    main(*sys.argv[1:3])
