"""The accelerate trainer: exact resume, gradient accumulation, checkpoint contents and atomicity, precision."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from tuning_fixtures import make_food101, make_mosi, make_refcoco, one_thread, write_tiny_clip_config, write_tiny_llama

from mit.tuning.config import RunConfig
from mit.tuning.trainer import Trainer, evaluate_checkpoint

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "llama": str(write_tiny_llama(root / "llama")),
        "clip": str(write_tiny_clip_config(root)),
        "refseg": str(make_refcoco(root / "refer")),
        "cls": str(make_food101(root / "food")),
        "msa": str(make_mosi(root / "mosi")),
    }


def make_config(assets, task, out, **overrides) -> RunConfig:
    settings = dict(
        task=task,
        model=assets["llama"],
        data=assets[task],
        out=str(out),
        encoder=assets["clip"],
        batch_size=2,
        epochs=2,
        lr=1e-3,
        progress=False,
        decoder_hidden=16,
        cls_hidden=16,
        seq_d_model=16,
        modality_dim=16,
    )
    settings.update(overrides)
    return RunConfig.from_dict(settings)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("task", ["msa", "refseg"])
def test_resume_is_exact(assets, tmp_path, task):
    """N steps straight == k steps, stop, a new Trainer resumes from the checkpoint, N - k more steps."""
    settings = dict(epochs=3, lr_step=1, lr_gamma=0.5, grad_accum=2, checkpoint_every=1, dropout=0.2)
    straight = Trainer(make_config(assets, task, tmp_path / "a", **settings))
    straight.train()
    steps = straight.global_step
    assert steps == 6  # 6 samples / batch 2 = 3 micro-batches per epoch -> 2 optimizer steps (2 + 1), 3 epochs

    first = Trainer(make_config(assets, task, tmp_path / "b", max_steps=3, **settings))
    first.train()
    assert first.global_step == 3 and first.step_in_epoch == 2  # stopped inside the second epoch
    # a kill while writing the next checkpoint leaves a temporary directory behind: it is ignored
    (tmp_path / "b" / "checkpoints" / ".tmp-step-0000004").mkdir()
    del first
    resumed = Trainer(make_config(assets, task, tmp_path / "b", resume=True, **settings))
    assert resumed.global_step == 3
    resumed.train()

    a, b = read_csv(tmp_path / "a" / "loss.csv"), read_csv(tmp_path / "b" / "loss.csv")
    assert len(a) == steps and a == b  # identical loss curve, as text
    assert [r["lr"] for r in a] == ["0.001", "0.001", "0.0005", "0.0005", "0.00025", "0.00025"]
    assert read_csv(tmp_path / "a" / "metrics.csv") == read_csv(tmp_path / "b" / "metrics.csv")
    for name, p in straight.unwrapped.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(resumed.unwrapped.named_parameters())[name]), name


def test_checkpoint_holds_only_trainable_parameters(assets, tmp_path):
    trainer = Trainer(make_config(assets, "cls", tmp_path / "run", epochs=1, keep_checkpoints=1, checkpoint_every=1))
    trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000003"]  # older ones removed; no temporary left
    tensors = load_file(tmp_path / "run" / "checkpoints" / "step-0000003" / "trainable.safetensors")
    trainable = {n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable
    assert any(".mit_kv_infusion." in n for n in tensors) and any(n.startswith("head.") for n in tensors)
    assert not any(n.startswith("encoder.") for n in tensors)  # CLIP is frozen
    frozen = sum(p.numel() for p in trainer.unwrapped.parameters() if not p.requires_grad)
    assert frozen > sum(t.numel() for t in tensors.values()) > 0
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and {"train_loss", "eval_loss", "accuracy", "f1_macro"} <= set(rows[0])
    # evaluation of the checkpoint reproduces the run's last evaluation
    metrics = evaluate_checkpoint(tmp_path / "run")
    assert metrics["accuracy"] == pytest.approx(float(rows[0]["accuracy"]))
    assert metrics["loss"] == pytest.approx(float(rows[0]["eval_loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        Trainer(make_config(assets, "cls", tmp_path / "run", epochs=1))


def test_gradient_accumulation_matches_a_larger_batch(assets, tmp_path):
    kwargs = dict(epochs=1, max_steps=1, dropout=0.0)
    big = Trainer(make_config(assets, "cls", tmp_path / "big", batch_size=4, **kwargs))
    big.train()
    accumulated = Trainer(make_config(assets, "cls", tmp_path / "acc", batch_size=2, grad_accum=2, **kwargs))
    accumulated.train()
    assert big.global_step == accumulated.global_step == 1
    # Adam's first step moves each parameter by about lr (1e-3) times the sign of its gradient; the gradients agree to
    # rounding, which only shows where a gradient is near Adam's eps
    params = dict(accumulated.unwrapped.named_parameters())
    for name, p in big.unwrapped.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, params[name], atol=5e-5, rtol=0)
    head = big.unwrapped.head.net[1].weight
    assert (head - accumulated.unwrapped.head.net[1].weight).abs().max() < 5e-5 < 5e-4 < head.abs().max()


def test_bf16_mixed_precision_on_cpu(assets, tmp_path):
    trainer = Trainer(make_config(assets, "msa", tmp_path / "bf16", epochs=1, max_steps=2, mixed_precision="bf16"))
    assert trainer.unwrapped.llm.embed_tokens.weight.dtype == torch.bfloat16  # frozen base in bf16
    assert all(p.dtype == torch.float32 for p in trainer.parameters)  # trainable parameters in fp32
    trainer.train()
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "bf16" / "loss.csv")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_config_validation(assets, tmp_path):
    with pytest.raises(ValueError, match=r"task: expected one of \['refseg', 'cls', 'msa'(, '\w+')*\], got 'seg'"):
        RunConfig.from_dict({"task": "seg", "model": "m", "data": "d", "out": "o"})
    with pytest.raises(ValueError, match=r"dataset: expected one of \['food101', 'snli-ve'\] for task cls, got 'mosi'"):
        make_config(assets, "cls", tmp_path, dataset="mosi")
    with pytest.raises(ValueError, match="lr: expected a finite number > 0, got -1"):
        make_config(assets, "cls", tmp_path, lr=-1)
    with pytest.raises(ValueError, match=r"unknown setting 'learning_rate'"):
        RunConfig.from_dict({"task": "cls", "model": "m", "data": "d", "out": "o", "learning_rate": 1})
