"""`mit train` / `mit eval` end to end on a synthetic fixture of each dataset format; config files; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tuning_fixtures import (
    make_food101,
    make_mosi,
    make_refcoco,
    make_snli_ve,
    one_thread,
    write_tiny_clip_config,
    write_tiny_llama,
)

from mit.cli import main

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
TINY = [
    "--epochs",
    "2",
    "--batch-size",
    "2",
    "--no-progress",
    "--decoder-hidden",
    "16",
    "--cls-hidden",
    "16",
    "--seq-d-model",
    "16",
    "--modality-dim",
    "16",
    "--lr",
    "1e-3",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "llama": str(write_tiny_llama(root / "llama")),
        "clip": str(write_tiny_clip_config(root)),
        "refcoco": str(make_refcoco(root / "refer")),
        "refcocog": str(make_refcoco(root / "refer", "refcocog", "umd")),
        "food101": str(make_food101(root / "food")),
        "snli-ve": str(make_snli_ve(root / "snli")),
        "mosi": str(make_mosi(root / "mosi")),
        "mosei": str(make_mosi(root / "mosei", aligned=True)),
    }


@pytest.mark.parametrize(
    "task,dataset,metric",
    [
        ("refseg", "refcoco", "oIoU"),
        ("refseg", "refcocog", "oIoU"),
        ("cls", "food101", "accuracy"),
        ("cls", "snli-ve", "f1_macro"),
        ("msa", "mosi", "acc7"),
        ("msa", "mosei", "corr"),
    ],
)
def test_train_end_to_end(assets, tmp_path, capsys, task, dataset, metric):
    out = tmp_path / "run"
    argv = [
        "train",
        "--task",
        task,
        "--dataset",
        dataset,
        "--model",
        assets["llama"],
        "--data",
        assets[dataset],
        "--out",
        str(out),
        "--encoder",
        assets["clip"],
        *TINY,
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metric in printed and printed["global_step"] > 0
    assert (out / "checkpoints" / "latest").is_file() and (out / "metrics.csv").is_file()
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (latest / "trainable.safetensors").is_file()
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert metric in header and len((out / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    eval_split = {
        "refcoco": "testA",
        "refcocog": "test",
        "food101": "test",
        "snli-ve": "test",
        "mosi": "test",
        "mosei": "test",
    }[dataset]
    assert main(["eval", "--checkpoint", str(out), "--split", eval_split, "--output", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert metric in evaluated
    # what was evaluated comes first: the run's latest checkpoint, its step, the split
    assert list(evaluated)[:7] == ["checkpoint", "global_step", "epoch", "task", "dataset", "split", "samples"]
    assert evaluated["checkpoint"] == str(latest.resolve()) and evaluated["global_step"] == printed["global_step"]
    assert evaluated["split"] == eval_split and evaluated["dataset"] == dataset and evaluated["samples"] > 0


def test_config_file_with_overrides(assets, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"task: msa\nmodel: {assets['llama']}\ndata: {assets['mosi']}\nout: {tmp_path / 'run'}\nepochs: 5\n"
        "batch-size: 3\nseq_d_model: 16\nmodality_dim: 16\nlayers: 0,1\nprogress: false\nlr: 1e-3\n"
    )
    assert main(["train", "--config", str(config), "--epochs", "1", "--max-steps", "1"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    optim, run = saved["optim"], saved["run"]
    assert (optim["epochs"], optim["batch_size"], saved["mit"]["layers"], run["max_steps"]) == (1, 3, [0, 1], 1)
    assert optim["lr"] == 1e-3  # YAML's 1e-3 is a string to PyYAML: converted
    # continue the run from its checkpoint
    assert main(["train", "--config", str(config), "--epochs", "1", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 2
    json_config = tmp_path / "run.json"
    json_config.write_text(
        json.dumps(
            {
                "task": "msa",
                "model": assets["llama"],
                "data": assets["mosi"],
                "out": str(tmp_path / "run2"),
                "epochs": 1,
                "max_steps": 1,
                "progress": False,
                "seq_d_model": 16,
                "modality_dim": 16,
            }
        )
    )
    assert main(["train", "--config", str(json_config)]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--task", "bogus"], "argument --task: invalid choice: 'bogus'"),
        (["train", "--task", "cls", "--epochs", "x"], "argument --epochs: expected an integer, got 'x'"),
        (["train", "--task", "cls", "--data", "d", "--out", "o"], "missing required setting --model"),
        (["train", "--task", "cls", "--model", "m", "--out", "o"], "missing required setting --data"),
        (
            ["train", "--task", "cls", "--model", "m", "--data", "d", "--out", "o", "--encoder-pretrained", "V.pt"],
            "encoder_pretrained: 'V.pt' is a single checkpoint file, which the transformers backend cannot load",
        ),
        (
            ["train", "--task", "cls", "--model", "/no/such", "--data", "d", "--out", "o"],
            "--model /no/such: expected a Hugging Face model directory with config.json",
        ),
        (["train", "--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
        (
            ["train", "--task", "msa", "--model", "m", "--data", "d", "--out", "o", "--epochs", "0"],
            "epochs: expected an integer >= 1, got 0",
        ),
        (["train", "--layers", "1,x"], "argument --layers: expected comma-separated integers"),
        (["eval"], "the following arguments are required: --checkpoint"),
        (["eval", "--checkpoint", "/no/run"], "--checkpoint /no/run: expected a run directory"),
    ],
)
def test_bad_arguments_give_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mit: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_files(tmp_path, capsys):
    cases = {
        "a.yaml": "task: [unclosed",
        "b.json": "{",
        "c.yaml": "- a list",
        "d.yaml": "learning_rate: 1",
        "f.yaml": "infuse_kv: 'false'\ntask: msa\nmodel: m\ndata: d\nout: o",
        "g.yaml": "layers: 7\ntask: msa\nmodel: m\ndata: d\nout: o",
        "h.yaml": "optim: {lr: 1e-3, momentum: 0.9}",
        "e.txt": "x",
        # a key given twice (either format, any depth), or one setting under two spellings: never one silently
        "i.yaml": "task: msa\nlr: 1e-3\nepochs: 2\nlr: 1e-4",
        "j.yaml": "optim:\n  lr: 1e-3\n  epochs: 2\n  lr: 1e-4",
        "k.json": '{"task": "msa", "optim": {"lr": 0.001, "lr": 0.0001}}',
        "l.yaml": "lr: 1e-3\noptim:\n  lr: 1e-4",
        "m.json": '{"batch-size": 2, "batch_size": 4}',
        "n.yaml": "neural:\n  dropout: 0.1\nnt_dropout: 0.2",
        # a list setting as a lone string: refused like the Python API refuses it (a comma makes it a list: 0,1)
        "o.yaml": 'layers: "1"\ntask: msa\nmodel: m\ndata: d\nout: o',
        "p.yaml": 'layers: "12"\ntask: msa\nmodel: m\ndata: d\nout: o',
    }
    expected = [
        "not valid YAML",
        "not valid JSON",
        "expected a mapping",
        "unknown setting 'learning_rate'",
        "infuse_kv: expected a bool (true or false), got 'false'",
        "layers: expected None or a non-empty list of integers each >= 0, got 7",
        "unknown setting optim.momentum",
        "expected a .yaml, .yml or .json file",
        "i.yaml: duplicate key 'lr' (lines 2 and 4); give each setting once",
        "j.yaml: duplicate key 'optim.lr' (lines 2 and 4); give each setting once",
        "k.json: duplicate key 'optim.lr'; give each setting once",
        "l.yaml: setting 'lr' is given twice, as 'lr' and as optim.lr; give it once",
        "m.json: setting 'batch_size' is given twice, as 'batch-size' and as 'batch_size'; give it once",
        "n.yaml: setting 'nt_dropout' is given twice, as neural.dropout and as 'nt_dropout'; give it once",
        "layers: expected None or a non-empty list of integers each >= 0, got '1'",
        "layers: expected None or a non-empty list of integers each >= 0, got '12'",
    ]
    assert len(cases) == len(expected)
    for (name, text), message in zip(cases.items(), expected):
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_missing_dataset_file_is_named(assets, tmp_path, capsys):
    argv = [
        "train",
        "--task",
        "cls",
        "--dataset",
        "snli-ve",
        "--model",
        assets["llama"],
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--encoder",
        assets["clip"],
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mit: error: missing file ") and "snli_ve_train.jsonl: expected SNLI-VE JSON lines" in err


@pytest.mark.parametrize("argv", [["train", "--help"], ["--help"], ["eval", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("examples", "mit train --task refseg", "mit eval --checkpoint"):
        assert text in out
    if argv[0] == "train":
        for text in ("--task", "--encoder-pretrained", "--quick-gelu", "--mixed-precision", "--resume", "--config"):
            assert text in out


def _example_commands(text: str) -> list[list[str]]:
    """The ``mit train`` commands of an examples text, continuation lines joined, comments dropped."""
    import shlex

    joined = text.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[2:] for line in joined.splitlines() if line.strip().startswith("mit train")]


def test_every_train_example_parses_into_a_valid_configuration():
    """The help's examples are what users copy: each one parses, and its settings pass every check the configuration
    makes before anything is loaded (an open_clip .pt file given to the transformers backend used to pass here and
    fail at load time)."""
    from mit.cli import EXAMPLES, build_parser
    from mit.tuning.config import RunConfig

    commands = _example_commands(EXAMPLES)
    assert len(commands) >= 5
    for argv in commands:
        args = vars(build_parser().parse_args(["train", *argv]))
        args.pop("command"), args.pop("config")
        if args:  # the config-file examples carry only overrides
            if "task" in args:
                RunConfig.from_dict(args)


def test_demo_help_lists_the_demos(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "mit demo digits [--quick]" in out and "mit demo neural-digits [--quick]" in out


def test_top_level_help_names_the_supported_families(capsys):
    from mit.hf.families import FAMILIES

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tune a frozen Llama model" not in out
    for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Gemma3", "Phi3"):
        assert name in out
    assert len(FAMILIES) == 7  # the help names seven families: a new one must be added there too


@pytest.mark.parametrize(
    "error,status,line",
    [
        (PermissionError(13, "Permission denied", "/data/train.jsonl"), 2, "/data/train.jsonl: Permission denied"),
        (OSError(5, "Input/output error", "/a", None, "/b"), 2, "/a -> /b: Input/output error"),
        (OSError("a message of its own\non two lines"), 2, "a message of its own on two lines"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_every_failure_is_one_line_with_its_exit_status(monkeypatch, capsys, error, status, line):
    """Whatever I/O error reaches the command line (reading a dataset, a model, a checkpoint) is one line, no
    traceback: exit status 2 before a run starts; 130 for Ctrl-C. (Failures of a started run, exit status 1, are in
    tests/tuning/test_failures.py.)"""
    import mit.cli

    def fail(args):
        raise error

    monkeypatch.setattr(mit.cli, "_train", fail)
    assert main(["train", "--task", "msa"]) == status
    assert capsys.readouterr().err == f"mit: error: {line}\n"


def test_an_unreadable_config_file_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import os
    import pathlib

    config = tmp_path / "run.yaml"
    config.write_text("task: msa\n")
    if os.name == "posix" and os.geteuid() != 0:
        config.chmod(0)  # the real thing; root reads any file, so as root the read is made to fail
    else:
        monkeypatch.setattr(
            pathlib.Path, "read_text", lambda self, *a, **k: _raise(PermissionError(errno.EACCES, "Permission denied"))
        )
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"mit: error: --config {config}: cannot read it: Permission denied\n"


def _raise(error: BaseException):
    raise error


def test_mit_data_toy_writes_real_digits_that_mit_train_runs_on(tmp_path, capsys):
    """`mit data toy`: real scans in UPMC-Food101's layout (the adapter reads them back: ten classes, disjoint splits,
    the pixels of scikit-learn's digits); the printed command's flags run (here on the tiny test model, 2 steps)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from tuning_fixtures import write_tiny_llama

    from mit.tuning.data.food101 import Food101Dataset
    from mit.tuning.data.toy import DIGIT_WORDS

    out = tmp_path / "toy"
    assert main(["data", "toy", "--out", str(out), "--train", "30", "--test", "20"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 30 training and 20 test digits" in printed and "--encoder" in printed
    train, test = Food101Dataset(out, "train", image_size=32), Food101Dataset(out, "test", image_size=32)
    assert len(train) == 30 and len(test) == 20 and train.classes == test.classes and len(train.classes) == 10
    digits = load_digits()
    label = DIGIT_WORDS[int(digits.target[45])]  # scan 45 is a test sample (30 + 20 scans, split by index)
    stored = np.asarray(Image.open(out / "images" / "test" / label / "digit_0045.png"))[::4, ::4, 0]
    assert np.array_equal(stored, np.round(digits.images[45] * 255 / 16).astype(np.uint8))
    assert main(["data", "toy", "--out", str(out)]) == 2  # nothing is overwritten
    assert "exists and is not an empty directory" in capsys.readouterr().err

    command = printed.split("mit train ", 1)[1].split()
    command[command.index("--model") + 1] = str(write_tiny_llama(tmp_path / "llama"))
    command[command.index("--out") + 1] = str(tmp_path / "run")
    assert main(["train", *command, "--max-steps", "2", "--no-progress", "--modality-dim", "64"]) == 0
    assert '"global_step": 2' in capsys.readouterr().out


def test_report_to_tensorboard_logs_steps_and_epochs_and_a_console_line(assets, tmp_path, capsys):
    """--report-to tensorboard (accelerate's tracker, offline): per-step loss / lr and per-epoch metrics as scalars
    in --out/trackers; every epoch also prints one line (stderr)."""
    pytest.importorskip("tensorboard")  # in the test extra; an optional extra of the package
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--task", "cls", "--dataset", "food101", "--model", assets["llama"], "--data", assets["food101"],
            "--encoder", assets["clip"], "--out", str(out), "--report-to", "tensorboard", *TINY,
            "--progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    epoch_lines = [line for line in captured.err.splitlines() if line.startswith("mit: epoch ")]
    assert [line.split(" (")[0] for line in epoch_lines] == ["mit: epoch 1/2", "mit: epoch 2/2"]
    assert "train_loss" in epoch_lines[-1] and "accuracy" in epoch_lines[-1]
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, list((out / "trackers").rglob("*"))
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    tags = scalars.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/epoch_loss", "eval/accuracy", "eval/loss"} <= set(tags)
    steps = [e.step for e in scalars.Scalars("train/loss")]
    assert steps == list(range(1, printed["global_step"] + 1))
    final = scalars.Scalars("eval/accuracy")[-1]
    assert final.step == printed["global_step"] and final.value == pytest.approx(printed["accuracy"])


def test_export_then_predict_answers_as_the_trained_model_does(tmp_path, capsys):
    """train (toy digits) -> mit export -> mit predict: the answers are the trained task model's own predictions on
    the same images (argmax of its logits, recomputed here through the run's checkpoint), one JSON line per image."""
    from tuning_fixtures import write_tiny_llama

    from mit.tuning.checkpoints import checkpoint_dir, read_config
    from mit.tuning.data.food101 import Food101Dataset
    from mit.tuning.trainer import Trainer

    data = tmp_path / "toy"
    assert main(["data", "toy", "--out", str(data), "--train", "24", "--test", "6"]) == 0
    run = tmp_path / "run"
    argv = ["train", "--task", "cls", "--dataset", "food101", "--data", str(data), "--encoder",
            str(data / "clip_tiny.json"), "--model", str(write_tiny_llama(tmp_path / "llama")), "--out", str(run),
            "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--no-progress",
            "--modality-dim", "64"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert set(exported["files"]) >= {"task.json", "task_head.safetensors", "mit_config.json"}
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 2  # never overwritten

    test = Food101Dataset(data, "test", image_size=32)
    images = [str(data / "images" / "test" / label / name) for name, _, _, label in test.samples]
    assert main(["predict", "--adapter", str(tmp_path / "adapter"), "--images", *images,
                 "--text", "a scanned handwritten digit", "--batch-size", "4",
                 "--output", str(tmp_path / "answers.jsonl")]) == 0  # fmt: skip
    answers = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [a["image"] for a in answers] == images and all(a["label"] in test.classes for a in answers)
    assert (tmp_path / "answers.jsonl").read_text().count("\n") == len(images)

    # the same predictions from the run's checkpoint, computed by the trainer's model directly
    directory = checkpoint_dir(run)
    trainer = Trainer(read_config(directory).replace(progress=False), build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    model = trainer.unwrapped.eval()
    with torch.no_grad():
        logits = model(trainer.collate([test[i] for i in range(len(test))]))["logits"]
    trainer.close()
    expected = [test.classes[i] for i in logits.argmax(-1).tolist()]
    assert [a["label"] for a in answers] == expected
    probabilities = logits.float().softmax(-1).max(-1).values.tolist()
    assert [a["probability"] for a in answers] == pytest.approx(probabilities, abs=1e-5)


def test_predict_refuses_what_it_cannot_answer(tmp_path, capsys):
    (tmp_path / "not_an_adapter").mkdir()
    assert main(["predict", "--adapter", str(tmp_path / "not_an_adapter"), "--images", "x.png"]) == 2
    assert "task.json' does not exist; expected a directory written by mit export" in capsys.readouterr().err
    (tmp_path / "msa").mkdir()
    (tmp_path / "msa" / "task.json").write_text(json.dumps({"format": "mit-task-v1", "task": "msa"}))
    assert main(["predict", "--adapter", str(tmp_path / "msa"), "--images", "x.png"]) == 2
    assert "mit predict supports the tasks ('cls', 'refseg'); this adapter is 'msa'" in capsys.readouterr().err


def test_export_then_predict_refseg_writes_the_trained_models_masks(assets, tmp_path, capsys):
    """refseg: train -> export -> predict --masks: one PNG per (image, expression) at the image's own resolution,
    equal to the trained model's logits on the same images (the dataset's square view), resized bilinearly and
    thresholded at 0 (what evaluation does), recomputed here through the run's checkpoint."""
    from PIL import Image

    from mit.tuning.checkpoints import checkpoint_dir, read_config
    from mit.tuning.trainer import Trainer

    run = tmp_path / "run"
    argv = ["train", "--task", "refseg", "--dataset", "refcoco", "--model", assets["llama"], "--data",
            assets["refcoco"], "--out", str(run), "--encoder", assets["clip"], *TINY, "--max-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()

    directory = checkpoint_dir(run)
    trainer = Trainer(read_config(directory).replace(progress=False), build_train_data=False)
    trainer.load_checkpoint(directory, weights_only=True)
    dataset, model = trainer.eval_dataset, trainer.unwrapped.eval()
    samples = [dataset.samples[i] for i in range(3)]
    images = [str(dataset.image_dir / dataset.images[image_id]["file_name"]) for _, image_id, _, _ in samples]
    texts = [sentence for _, _, _, sentence in samples]
    with torch.no_grad():
        logits = model(trainer.collate([dataset[i] for i in range(3)]))["logits"].float()
    trainer.close()

    adapter, masks = str(tmp_path / "adapter"), tmp_path / "masks"
    assert main(["predict", "--adapter", adapter, "--images", *images, "--text", *texts]) == 2  # no --masks
    assert "--masks: a refseg adapter predicts masks" in capsys.readouterr().err
    assert main(["predict", "--adapter", adapter, "--images", *images, "--text", *texts, "--masks", str(masks),
                 "--batch-size", "2"]) == 0  # fmt: skip
    answers = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [a["image"] for a in answers] == images and [a["text"] for a in answers] == texts
    for i, answer in enumerate(answers):
        with Image.open(images[i]) as picture:
            width, height = picture.size
        resized = torch.nn.functional.interpolate(logits[i][None, None], size=(height, width), mode="bilinear")
        expected = (resized[0, 0] > 0).numpy()
        with Image.open(answer["mask"]) as written:
            assert written.size == (width, height) and written.mode == "L"
            got = np.asarray(written) > 127
        assert (got == expected).all(), answer["mask"]
        assert answer["foreground"] == pytest.approx(expected.mean())
    assert any(0 < a["foreground"] < 1 for a in answers)  # the comparison above is not between empty masks
