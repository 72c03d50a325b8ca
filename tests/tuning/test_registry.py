"""The task registry: a new task is one module (tests/tuning_toy_task.py) plus one register_task call; the command
line, the run config and the trainer then accept it with no other change."""

from __future__ import annotations

import json

import pytest
import tuning_toy_task
from tuning_fixtures import one_thread, write_tiny_llama

from mit.cli import main
from mit.tuning.config import RunConfig
from mit.tuning.tasks import get_task, register_task, task_names, unregister_task

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture
def toy_task():
    register_task(tuning_toy_task.SPEC)
    yield tuning_toy_task.SPEC
    unregister_task("toy")


def test_builtin_tasks_are_registered():
    assert task_names()[:3] == ["refseg", "cls", "msa"]
    assert [d.name for d in get_task("refseg").datasets] == ["refcoco", "refcoco+", "refcocog"]
    assert get_task("msa").selection_metric == "mae" and not get_task("msa").higher_is_better


def test_a_registered_toy_task_trains_from_the_command_line(toy_task, tmp_path, capsys):
    with pytest.raises(ValueError, match="task 'toy' is already registered"):
        register_task(toy_task)
    llama = write_tiny_llama(tmp_path / "llama")
    out = tmp_path / "run"
    argv = ["train", "--task", "toy", "--model", str(llama), "--data", str(tmp_path), "--out", str(out)]
    argv += ["--modality-dim", "16", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["global_step"] == 4 and 0.0 <= printed["accuracy"] <= 1.0
    saved = RunConfig.from_json((out / "config.json").read_text())
    assert saved.task == "toy" and saved.data.dataset == "toyset" and saved.splits() == ("train", "test")
    # evaluation of the checkpoint goes through the same registry entry
    assert main(["eval", "--checkpoint", str(out), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == printed["accuracy"]


def test_unregistered_task_is_refused(tmp_path, capsys):
    assert "toy" not in task_names()
    with pytest.raises(ValueError, match=r"task: expected one of \['refseg', 'cls', 'msa', 'multitask'\], got 'toy'"):
        RunConfig.from_dict({"task": "toy", "model": "m", "data": "d", "out": "o"})
