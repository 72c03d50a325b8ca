"""One process of tests/tuning/test_fsdp.py (started by ``accelerate launch --config_file`` with an FSDP2 config, which
sets the ACCELERATE_USE_FSDP / FSDP_* environment): the cls task under FSDP2 for ``half`` optimizer steps (a
checkpoint), then a new Trainer resumes that checkpoint and trains to ``2 * half`` steps. Writes OUT/shard_<rank>.json:
the distributed type accelerate chose by itself, how many elements of the frozen base and of the trainable parameters
this process holds, their full counts and the total gradient norms of every step."""

from __future__ import annotations

import json
import sys

import torch

from mit.tuning.config import RunConfig
from mit.tuning.trainer import Trainer


def make_config(llama: str, clip: str, data: str, out: str, **overrides) -> RunConfig:
    """The run's settings (the same as the single-process reference run of the test, except the batch size)."""
    settings = dict(
        task="cls",
        model=llama,
        data=data,
        out=out,
        encoder=clip,
        batch_size=2,
        eval_batch_size=1,  # 3 evaluation samples: 2 forwards on one process, 1 on the other (+1 padding forward)
        epochs=2,
        dropout=0.0,
        lr=1e-3,
        cls_hidden=16,
        max_grad_norm=0.05,
        progress=False,
    )
    return RunConfig.from_dict({**settings, **overrides})


def record_grad_norms(accelerator) -> list[float]:
    """The total gradient norms ``accelerator.clip_grad_norm_`` returns from now on (it is wrapped on the instance)."""
    norms: list[float] = []
    clip = accelerator.clip_grad_norm_

    def recording(*args, **kwargs):
        norm = clip(*args, **kwargs)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        return norm

    accelerator.clip_grad_norm_ = recording
    return norms


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def main(llama: str, clip: str, data: str, out: str, half: str) -> None:
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # as the Trainer makes it on CPU processes
    accelerate_alone = str(accelerator.distributed_type)  # before the Trainer's enable_cpu_fsdp
    first = Trainer(make_config(llama, clip, data, out, max_steps=int(half)), accelerator=accelerator)
    norms = record_grad_norms(accelerator)
    assert accelerator.num_processes == 2 and accelerator.is_fsdp2, accelerator.state
    assert torch.distributed.get_backend() == "gloo"
    params = list(first.unwrapped.named_parameters())
    shard = {
        "accelerate_alone": accelerate_alone,
        "base_local": sum(_local_numel(p) for _, p in params if not p.requires_grad),
        "base_full": sum(p.numel() for _, p in params if not p.requires_grad),
        "trainable_local": sum(_local_numel(p) for _, p in params if p.requires_grad),
        "trainable_full": sum(p.numel() for _, p in params if p.requires_grad),
        "trainable": sorted(n for n, p in params if p.requires_grad),
        "grad_norms": norms,
    }
    first.train()
    accelerator.free_memory()  # forget the first model: accelerate's clip_grad_norm_ compares every prepared model's
    # parameters with the ones it is given (one model per accelerator, as in `mit train`)
    # resume from the checkpoint just written, in a fresh Trainer (fresh model and optimizer, same processes)
    resumed = Trainer(
        make_config(llama, clip, data, out, max_steps=2 * int(half), resume=True), accelerator=accelerator
    )
    assert resumed.global_step == int(half), resumed.global_step
    resumed.train()
    with open(f"{out}/shard_{accelerator.process_index}.json", "w") as f:
        json.dump(shard, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
