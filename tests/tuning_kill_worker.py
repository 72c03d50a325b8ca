"""One run of tests/tuning/test_kill_resume.py: trains the toy task and kills itself with SIGKILL when a chosen
checkpoint-writing call starts (``<name>:<n>``: the n-th call of torch.save / save_file / os.rename /
atomic_write_text inside the trainer), as a power cut or an OOM kill would."""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import tuning_toy_task

import mit.tuning.trainer as trainer_module
from mit.tuning.config import RunConfig
from mit.tuning.tasks import register_task


def die_at(name: str, count: int) -> None:
    calls = {"n": 0}
    if name == "torch.save":
        holder, attribute = trainer_module.torch, "save"
    elif name == "os.rename":
        holder, attribute = trainer_module.os, "rename"
    else:
        holder, attribute = trainer_module, name
    original = getattr(holder, attribute)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(holder, attribute, wrapper)


def main(settings_json: str, kill_at: str) -> None:
    torch.set_num_threads(1)
    register_task(tuning_toy_task.SPEC, replace=True)
    if kill_at != "none":
        name, count = kill_at.rsplit(":", 1)
        die_at(name, int(count))
    trainer_module.Trainer(RunConfig.from_dict(json.loads(settings_json))).train()


if __name__ == "__main__":
    main(*sys.argv[1:3])
