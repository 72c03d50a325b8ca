"""One process of tests/test_tuning_distributed.py (started by torch.distributed.run): one optimizer step of the cls
task on its shard of the data, then it writes its trainable parameters to OUT/rank_<rank>.safetensors."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from mit.tuning.config import RunConfig
from mit.tuning.tasks import trainable_state_dict
from mit.tuning.trainer import Trainer


def make_config(llama: str, clip: str, data: str, out: str, **overrides) -> RunConfig:
    """The run's settings (shared with the single-process reference run of the test, which changes the batch size)."""
    settings = dict(task="cls", model=llama, data=data, out=out, encoder=clip, batch_size=2, epochs=1, max_steps=1)
    settings.update(dropout=0.0, lr=1e-3, cls_hidden=16, progress=False)
    return RunConfig.from_dict({**settings, **overrides})


def main(llama: str, clip: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    config = make_config(llama, clip, data, out)
    trainer = Trainer(config)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    assert torch.distributed.get_backend() == "gloo"
    trainer.train()
    rank = trainer.accelerator.process_index
    # the batches of the two processes differ
    save_file({"indices": torch.tensor(trainer._train_batches(0)[0])}, f"{out}/batch_{rank}.safetensors")
    save_file(trainable_state_dict(trainer.unwrapped), f"{out}/rank_{rank}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:5])
