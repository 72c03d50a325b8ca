"""The tuning framework's parts on their own: tuning methods (registry, fitting to the encoder, applying), each
task's own head settings and the one ``heads`` section built from them, a run config that writes only its method's
section (and still reads files that hold both), the data order, the optimizer / schedule and the single-process
step loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from mit.config import MiTConfig
from mit.neural import TASK_TOKENS, NeuralTuningConfig
from mit.tuning.config import HeadConfig, OptimConfig, RunConfig, head_section
from mit.tuning.errors import TrainingDiverged
from mit.tuning.loaders import epoch_batches, shard
from mit.tuning.loop import run_steps
from mit.tuning.methods import METHODS, MIT, NEURAL, TuningMethod, get_method, register_method
from mit.tuning.optim import paper_optimizer, warmup_cosine, warmup_cosine_factor
from mit.tuning.tasks import DatasetSpec, TaskSpec, get_task
from mit.tuning.tasks.classification import ClassificationHeads
from mit.tuning.tasks.sentiment import SentimentHeads
from mit.utils.settings import setting

ENCODER = SimpleNamespace(embed_dim=24, width=16)


def test_methods_are_objects_fitted_to_the_encoder_and_resolved_once_by_the_registry():
    assert METHODS == {"mit": MIT, "neural": NEURAL} and get_method("neural") is NEURAL and get_method(MIT) is MIT
    assert get_task("refseg").method is MIT and get_task("multitask").method is NEURAL
    assert MIT.fit_to_encoder(MiTConfig(modality_dim=5), ENCODER).modality_dim == 24
    assert NEURAL.fit_to_encoder(NeuralTuningConfig(image_dim=5), ENCODER).image_dim == 16
    assert NEURAL.prepare(NeuralTuningConfig()).new_tokens == list(TASK_TOKENS)
    assert NEURAL.prepare(NeuralTuningConfig(new_tokens=["<x>"])).new_tokens == ["<x>"]
    with pytest.raises(ValueError, match="expects a MiTConfig, got NeuralTuningConfig"):
        MIT.check(NeuralTuningConfig(), "refseg", None)
    with pytest.raises(ValueError, match="modality_dim: expected the CLIP embedding size 24, got 5"):
        MIT.check(MiTConfig(modality_dim=5), "refseg", ENCODER)
    with pytest.raises(ValueError, match="method: expected one of"):
        get_method("lora")
    with pytest.raises(ValueError, match="already registered"):
        register_method(MIT)


def test_a_third_method_is_one_subclass_and_a_task_names_it():
    class Identity(TuningMethod):
        name, config_section, config_type = "identity", "mit", MiTConfig

        def apply(self, llm, config, tokenizer=None):
            return llm

    method = register_method(Identity())
    try:
        spec = TaskSpec("t", "", (DatasetSpec("d", ("a", "b"), lambda *a: None),), "m", True, False,
                        lambda *a: None, lambda i: {}, lambda b, o: [], lambda r: {}, method="identity")  # fmt: skip
        assert spec.method is method
    finally:
        METHODS.pop("identity")
    with pytest.raises(ValueError, match="TaskSpec 't': method: expected one of"):
        TaskSpec("t", "", (DatasetSpec("d", ("a", "b"), lambda *a: None),), "m", True, False,
                 lambda *a: None, lambda items: {}, lambda b, o: [], lambda r: {}, method="identity")  # fmt: skip


def test_each_task_declares_its_head_settings_and_the_heads_section_holds_them_all():
    names = {f.name for f in dataclasses.fields(HeadConfig)}
    for task in ("refseg", "cls", "msa", "multitask"):
        assert {f.name for f in dataclasses.fields(get_task(task).head_settings)} <= names
    assert ClassificationHeads().cls_hidden == 512 and SentimentHeads().seq_d_model == 128
    with pytest.raises(ValueError, match="seq_d_model: expected a multiple of seq_heads"):
        HeadConfig(seq_d_model=10, seq_heads=4)  # the task's own check runs for the shared section

    @dataclasses.dataclass
    class Clash:
        dropout: float = setting(0.5, help="another default")

    clash = SimpleNamespace(name="clash", head_settings=Clash)
    with pytest.raises(ValueError, match="'dropout'"):
        head_section([get_task("cls"), clash])


def _config(task: str, **flat) -> RunConfig:
    return RunConfig.from_dict({"task": task, "model": "smollm2", "data": "/data", "out": "/out", **flat})


def test_a_run_reads_its_own_head_settings_from_the_cli_keys_users_already_use():
    config = _config("cls", cls_hidden=64, dropout=0.2)
    assert config.head_settings() == ClassificationHeads(cls_hidden=64, dropout=0.2)
    nested = RunConfig.from_dict({"task": "msa", "llm": {"model": "smollm2"}, "data": {"root": "/d"},
                                  "run": {"out": "/o"}, "heads": {"seq_layers": 2}})  # fmt: skip
    assert nested.head_settings() == SentimentHeads(seq_layers=2)


def test_config_json_holds_only_the_methods_section_and_old_files_with_both_still_read():
    mit_run, neural_run = _config("refseg", rank=8), _config("multitask", rank=8)
    assert "mit" in mit_run.to_dict() and "neural" not in mit_run.to_dict()
    assert "neural" in neural_run.to_dict() and "mit" not in neural_run.to_dict()
    assert neural_run.method_config.rank == 8 and mit_run.method_config == mit_run.mit
    written = RunConfig.from_json(json.dumps(mit_run.to_dict()))
    assert written == dataclasses.replace(mit_run, neural=NeuralTuningConfig())
    old = {**mit_run.to_dict(), "neural": dataclasses.asdict(NeuralTuningConfig(rank=8))}  # as written before
    assert RunConfig.from_json(json.dumps(old)).to_dict() == mit_run.to_dict()
    # a run resumed from an old file: the other method's section is not a conflict
    assert mit_run.resume_conflicts(RunConfig.from_json(json.dumps(old))) == []
    assert [c[0] for c in mit_run.resume_conflicts(_config("refseg", rank=8, modality_dim=10))] == ["modality_dim"]


def test_epoch_batches_are_seeded_sharded_and_ordered():
    data = list(range(10))
    first = epoch_batches(data, seed=3, epoch=1, batch_size=4)
    assert first == epoch_batches(data, seed=3, epoch=1, batch_size=4) != epoch_batches(data, 3, 2, 4)
    assert sorted(itertools.chain(*first)) == data and [len(b) for b in first] == [4, 4, 2]
    halves = [list(itertools.chain(*epoch_batches(data, 3, 1, 4, rank, 2))) for rank in (0, 1)]
    assert sorted(halves[0] + halves[1]) == data and shard([1, 2, 3], 1, 2, pad=True) == [2, 1]
    assert epoch_batches(data, 3, 1, 20, order=lambda d, i: sorted(i)) == [data]


def test_paper_optimizer_and_the_warmup_cosine_schedule():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = paper_optimizer([weight], OptimConfig(lr=1.0, lr_step=2, lr_gamma=0.5))
    assert isinstance(optimizer, torch.optim.Adam)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert [warmup_cosine_factor(s, 2, 10) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert warmup_cosine_factor(6, 2, 10) == pytest.approx(0.5) and warmup_cosine_factor(10, 2, 10) == 0.0
    optimizer = torch.optim.SGD([weight], lr=2.0)
    scheduler = warmup_cosine(optimizer, 2, 10)
    assert optimizer.param_groups[0]["lr"] == 1.0  # step 0: half the warm-up


def test_run_steps_trains_logs_and_stops_on_a_non_finite_loss():
    weight = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    rows = run_steps(lambda step: ((weight**2).sum(), {"w": weight.item()}), optimizer, 20, progress=False)
    assert [r["step"] for r in rows] == list(range(1, 21)) and rows[-1]["loss"] < rows[0]["loss"]
    assert set(rows[0]) == {"run", "step", "loss", "w"}
    with pytest.raises(TrainingDiverged, match="step 1: the training loss is nan"):
        run_steps(lambda step: (weight.sum() * math.nan, {}), optimizer, 3, progress=False)
    assert weight.item() == pytest.approx(rows[-1]["w"] * 0.8)  # nothing was updated by the diverged step
