"""Runs that go wrong fail loudly and recoverably: a changed config on --resume is refused, an unreadable checkpoint
falls back to the previous one (and the loss curve still continues exactly), stale temporaries are removed, a
non-finite loss stops the run without saving, a run directory in use by another run is refused before anything is
written, a full disk or an unwritable directory is one line (the previous checkpoint resumes exactly), and each
command-line case is one line with a non-zero exit."""

from __future__ import annotations

import csv
import errno
import fractions
import os
import subprocess
import sys

import pytest
import torch
import tuning_toy_task
from safetensors.torch import load_file
from tuning_fixtures import one_thread, write_tiny_llama

import mit.tuning.checkpoints as checkpoints_module
import mit.tuning.run_dir as run_dir_module
from mit.cli import main
from mit.tuning.config import RunConfig
from mit.tuning.tasks import register_task, unregister_task
from mit.tuning.trainer import RUN_LOCK, CheckpointError, RunDirectoryError, Trainer, TrainingDiverged

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


# ------------------------------------------------------------------------------------- run directory and I/O


def toy_argv(llama, out, *more: str) -> list[str]:
    common = ["--task", "toy", "--model", llama, "--data", str(out), "--modality-dim", "16", "--batch-size", "2"]
    common += ["--lr", "1e-2", "--checkpoint-every", "1", "--no-progress", "--limit-train", "6", "--limit-eval", "4"]
    return ["train", *common, "--out", str(out), *more]


def hold_lock_in_subprocess(directory) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a running `mit train` does (it waits for stdin)."""
    script = (
        "import sys; from mit.utils.files import DirectoryLock; from mit.tuning.trainer import RUN_LOCK; "
        f"lock = DirectoryLock({str(directory)!r}, RUN_LOCK).acquire(); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_run_directory_in_use_is_refused_before_anything_is_written(llama, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock_in_subprocess(out)
    try:
        assert main(toy_argv(llama, out, "--epochs", "1")) == 2
        err = one_line(capsys)
        assert f"out: {out} is in use by another run (pid {holder.pid} on " in err, err
        assert f"which holds {out / RUN_LOCK}; wait for it to end or choose another --out" in err
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]  # no config.json, no checkpoints
        # the lock is the OS's: when its holder dies (here SIGKILL, no clean-up of any kind) the directory is free
        holder.kill()
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert main(toy_argv(llama, out, "--epochs", "1")) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"
    assert not (out / RUN_LOCK).exists()  # released (and removed) at the end of the run


def test_one_process_cannot_run_two_trainers_on_one_directory(llama, tmp_path):
    out = tmp_path / "run"
    first = Trainer(config(llama, out, max_steps=1))
    with pytest.raises(RunDirectoryError, match=r"is in use by another Trainer of this process"):
        Trainer(config(llama, out, max_steps=1))
    first.train()  # releases the lock at its end
    assert Trainer(config(llama, out, max_steps=2, resume=True)).global_step == 1


def fail_with(errno_code: int, when, monkeypatch, holder, attribute: str) -> list:
    """Make ``holder.attribute`` raise OSError(errno_code) on the calls for which ``when(path, n)`` is true."""
    original = getattr(holder, attribute)
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(str(path))
        if when(str(path), len(calls)):
            raise OSError(errno_code, os.strerror(errno_code), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(holder, attribute, failing)
    return calls


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_resumes_exactly(
    llama, tmp_path, capsys, monkeypatch
):
    straight = tmp_path / "straight"
    assert main(toy_argv(llama, straight, "--epochs", "2")) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    # the 2nd checkpoint's weights hit a full disk (the writes of a checkpoint: rng state, weights, trainer state, ...)
    fail_with(errno.ENOSPC, lambda path, n: "step-0000002" in path and path.endswith(".safetensors"), monkeypatch,
              checkpoints_module, "write_bytes")  # fmt: skip
    assert main(toy_argv(llama, out, "--epochs", "2")) == 1
    err = one_line(capsys)
    checkpoints = out / "checkpoints"
    assert err == (
        f"mit: error: cannot write checkpoint to {checkpoints / 'step-0000002'}: No space left on device; the last "
        f"complete checkpoint is {checkpoints / 'step-0000001'} (--resume continues from it)\n"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000001"]  # the temporary one removed
    monkeypatch.undo()
    assert main(toy_argv(llama, out, "--epochs", "2", "--resume")) == 0
    assert losses(out) == losses(straight)


def test_a_full_disk_while_writing_the_logs_is_one_line(llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    fail_with(errno.ENOSPC, lambda path, n: path.endswith("loss.csv"), monkeypatch, run_dir_module,
              "atomic_write_text")  # fmt: skip
    assert main(toy_argv(llama, out, "--epochs", "1")) == 1
    err = one_line(capsys)
    assert f"cannot write {out / 'loss.csv'}: No space left on device; the last complete checkpoint is " in err
    assert (out / "checkpoints" / "latest").read_text() == "step-0000001"  # written before the logs


@pytest.mark.parametrize("code,reason", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")])
def test_an_unwritable_run_directory_is_one_line(llama, tmp_path, capsys, monkeypatch, code, reason):
    out = tmp_path / "run"
    out.mkdir()
    if code == errno.EACCES and os.name == "posix" and os.geteuid() != 0:
        out.chmod(0o500)  # the real thing; root ignores permission bits, so as root the OS call is made to fail
    else:
        real_open = os.open
        monkeypatch.setattr(
            os, "open", lambda path, *a, **k: _raise(code, path) if str(out) in str(path) else real_open(path, *a, **k)
        )
    try:
        assert main(toy_argv(llama, out, "--epochs", "1")) == 2
    finally:
        out.chmod(0o700)
    err = one_line(capsys)
    assert f"out: cannot write to {out}: {reason} ({out / RUN_LOCK}); expected a writable run directory" in err
    assert list(out.iterdir()) == []


def test_a_run_that_fails_before_it_starts_leaves_no_directory_behind(llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "run"
    assert main([*toy_argv(llama, out, "--epochs", "1"), "--model", str(tmp_path)]) == 2  # no model there
    assert "expected a Hugging Face model directory" in one_line(capsys)
    assert not (tmp_path / "new").exists()  # created for the lock, removed with it
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("x")

    def fail(self, *args):
        raise RuntimeError("a failure after the lock")

    monkeypatch.setattr(Trainer, "_build", fail)
    with pytest.raises(RuntimeError, match="a failure after the lock"):
        Trainer(config(llama, out))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["keep.txt"]  # only what the run created is gone


def _raise(code: int, path) -> None:
    raise OSError(code, os.strerror(code), str(path))


def test_other_path_failures_are_one_line(llama, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(toy_argv(llama, a_file / "run", "--epochs", "1")) == 2
    assert f"out: cannot write to {a_file / 'run'}: Not a directory" in one_line(capsys)
    config_dir = tmp_path / "config.yaml"
    config_dir.mkdir()
    assert main(["train", "--config", str(config_dir)]) == 2
    assert f"--config {config_dir}: is a directory; expected a .yaml, .yml or .json file" in one_line(capsys)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    assert main(["train", "--config", str(binary)]) == 2
    assert f"--config {binary}: expected UTF-8 text, got invalid start byte at byte 0" in one_line(capsys)
    run = tmp_path / "run"
    assert main(toy_argv(llama, run, "--max-steps", "1")) == 0
    capsys.readouterr()
    output = tmp_path / "no" / "such" / "dir" / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err == f"mit: error: --output {output}: cannot write it: No such file or directory\n", err
