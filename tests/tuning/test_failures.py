"""Runs that go wrong fail loudly and recoverably: a changed config on --resume is refused, an unreadable checkpoint
falls back to the previous one (and the loss curve still continues exactly), stale temporaries are removed, a
non-finite loss stops the run without saving, and each command-line case is one line with a non-zero exit."""

from __future__ import annotations

import csv
import fractions

import pytest
import torch
import tuning_toy_task
from safetensors.torch import load_file
from tuning_fixtures import one_thread, write_tiny_llama

from mit.cli import main
from mit.tuning.config import RunConfig
from mit.tuning.tasks import register_task, unregister_task
from mit.tuning.trainer import CheckpointError, Trainer, TrainingDiverged

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    register_task(tuning_toy_task.SPEC, replace=True)
    yield str(write_tiny_llama(tmp_path_factory.mktemp("llama")))
    unregister_task("toy")


def config(llama, out, **settings) -> RunConfig:
    base = dict(task="toy", model=llama, data=str(out), out=str(out), modality_dim=16, batch_size=2, lr=1e-2)
    base.update(epochs=2, checkpoint_every=1, progress=False, limit_train=6, limit_eval=4)
    return RunConfig.from_dict({**base, **settings})


def losses(out) -> list[str]:
    with open(out / "loss.csv") as f:
        return [row["loss"] for row in csv.DictReader(f)]


def test_resume_refuses_a_changed_config_naming_the_fields(llama, tmp_path):
    out = tmp_path / "run"
    Trainer(config(llama, out, max_steps=2)).train()
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError) as error:
        Trainer(config(llama, out, resume=True, batch_size=3, lr=1e-3))
    message = str(error.value)
    assert "resume: the settings differ from those of" in message
    assert "lr (0.01 -> 0.001)" in message and "batch_size (2 -> 3)" in message and "epochs" in message
    assert (out / "config.json").read_text() == before  # nothing was overwritten
    # resume-safe settings may change: more epochs, no step limit
    resumed = Trainer(config(llama, out, resume=True, epochs=3))
    assert resumed.global_step == 2
    resumed.train()
    assert resumed.global_step == 9  # 3 steps per epoch, 3 epochs


def test_unreadable_latest_checkpoint_falls_back_and_the_curve_stays_exact(llama, tmp_path, capsys):
    straight = tmp_path / "straight"
    Trainer(config(llama, straight)).train()
    out = tmp_path / "run"
    Trainer(config(llama, out, max_steps=4)).train()
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000004"
    state = checkpoints / "step-0000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    (checkpoints / ".tmp-step-0000005").mkdir()  # left by a run killed while checkpointing
    resumed = Trainer(config(llama, out, resume=True))
    err = capsys.readouterr().err
    assert "step-0000004: unreadable trainer state" in err and "falling back to the previous checkpoint" in err
    assert resumed.global_step == 3
    resumed.train()
    assert not (checkpoints / ".tmp-step-0000005").exists()
    assert "removing" in capsys.readouterr().err
    assert losses(out) == losses(straight)  # the rerun of step 4 gives the same loss as the uninterrupted run


def test_checkpoint_state_is_loaded_with_weights_only(llama, tmp_path):
    out = tmp_path / "run"
    Trainer(config(llama, out, max_steps=1, keep_checkpoints=1)).train()
    state_path = out / "checkpoints" / "step-0000001" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["extra"] = fractions.Fraction(1, 3)  # a class outside the allow-list: only a full unpickler accepts it
    torch.save(state, state_path)
    with pytest.raises(CheckpointError, match=r"resume: no readable checkpoint .*unreadable trainer state"):
        Trainer(config(llama, out, resume=True))


def test_non_finite_loss_stops_without_saving(llama, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(llama, out))
    forward = trainer.model.forward
    calls = []

    def poisoned(batch):
        result = forward(batch)
        calls.append(1)
        if len(calls) == 3:
            result["loss"] = result["loss"] * float("nan")
        return result

    trainer.model.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan at optimizer step 3 \(epoch 1\); stopped"):
        trainer.train()
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    assert "the last good checkpoint is" in str(trainer._diverged("x"))
    assert len(losses(out)) == 2


def one_line(capsys) -> str:
    """The error output: exactly one line (with --no-progress nothing else is written to stderr)."""
    err = capsys.readouterr().err
    assert err.startswith("mit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_command_line_failures_are_one_line(llama, tmp_path, capsys):
    common = ["--task", "toy", "--model", llama, "--data", str(tmp_path), "--modality-dim", "16", "--no-progress"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", *common, "--out", str(a_file)]) == 2
    assert "is an existing file; expected a run directory" in one_line(capsys)

    run = tmp_path / "run"
    argv = ["train", *common, "--out", str(run), "--epochs", "1", "--limit-train", "4", "--limit-eval", "2"]
    assert main([*argv, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--batch-size", "1"]) == 2
    assert "resume: the settings differ" in one_line(capsys)

    # a learning rate that makes the run diverge: exit status 1, one line, the checkpoint of step 1 kept
    diverging = tmp_path / "diverging"
    argv = ["train", *common, "--out", str(diverging), "--lr", "1e30", "--checkpoint-every", "1", "--epochs", "3"]
    assert main(argv) == 1
    err = one_line(capsys)
    assert "stopped without saving" in err and ("non-finite" in err or "loss is" in err)
    latest = diverging / "checkpoints" / (diverging / "checkpoints" / "latest").read_text()
    for name, tensor in load_file(latest / "trainable.safetensors").items():
        assert tensor.isfinite().all(), name
