"""The README's code blocks and commands, run or parsed as written (against the installed package): the quickstart
prints what it says; the Hugging Face example runs on the real SmolLM2 with stand-ins for the user's files; the
paper's training commands build valid configurations; the benchmark commands exist and take the options named."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert stdout.getvalue().startswith("torch.Size([2, 9, 128, 64]) tensor([")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_hugging_face_example_runs_as_written(tmp_path, monkeypatch):
    """The README's second block, run as written on the real SmolLM2 with stand-ins only for the user's own files:
    a (tiny, random) CLIP checkpoint at the path it names, two pictures named as it names them (scikit-learn digits)
    and the tensors it leaves to the reader (``input_ids``, ``mask``, ``fresh_base_model``)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import mit
    from mit.tuning.image_preprocessing import processor_class

    block = _blocks("python")[1]
    assert "mit.ImageEmbedder.from_pretrained(" in block and "mit.load_adapter(" in block
    monkeypatch.chdir(tmp_path)
    clip = tmp_path / "clip-vit-large-patch14-336"
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=768)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(clip)
    processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    digits = sklearn_datasets.load_digits().images
    for name, digit in (("cat.jpg", digits[0]), ("dog.png", digits[1])):
        Image.fromarray((digit * 15).astype("uint8")).convert("RGB").resize((40, 40)).save(name)
    fresh_base_model, tokenizer = mit.models.load_smollm2()
    batch = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    namespace = {"input_ids": batch.input_ids, "mask": batch.attention_mask, "fresh_base_model": fresh_base_model}
    exec(compile(block, "README.md", "exec"), namespace)
    model, ids, fresh = namespace["model"], namespace["ids"], namespace["fresh"]
    assert namespace["emb"].shape == (2, 768) and namespace["out"].logits.shape[:2] == batch.input_ids.shape
    assert ids.shape[0] == 2 and ids.shape[1] > batch.input_ids.shape[1]
    assert {"mit_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    saved = dict(model.mit_named_parameters())
    loaded = dict(fresh.mit_named_parameters())
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def _readme_train_commands() -> list[list[str]]:
    """The paper's ``mit train`` commands of the README's bash block, its shell variables expanded."""
    block = next(b for b in _blocks("bash") if "$RUN --task" in b)
    variables: dict[str, str] = {}
    commands = []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        assignment = re.fullmatch(r'(\w+)="(.*)"', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        elif line.startswith("$RUN"):
            expanded = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line)
            words = shlex.split(expanded)
            commands.append(words[words.index("train") + 1 :])
    return commands


def test_readme_paper_commands_parse_into_valid_configurations():
    """Each of the seven paper-task commands parses and its settings pass every check made before anything is loaded
    (the paths are the reader's); the ``mit eval`` lines beside them parse too."""
    from mit.cli import build_parser
    from mit.tuning.config import RunConfig

    commands = _readme_train_commands()
    tasks = sorted((argv[argv.index("--task") + 1], argv[argv.index("--dataset") + 1]) for argv in commands)
    assert tasks == [("cls", "food101"), ("cls", "snli-ve"), ("msa", "mosei"), ("msa", "mosi"),
                     ("refseg", "refcoco"), ("refseg", "refcoco+"), ("refseg", "refcocog")]  # fmt: skip
    for argv in commands:
        args = vars(build_parser().parse_args(["train", *argv]))
        args.pop("command"), args.pop("config")
        config = RunConfig.from_dict(args)
        assert config.optim.mixed_precision == "bf16" and config.llm.model == "/models/Llama-2-7b-hf"
    block = next(b for b in _blocks("bash") if "$RUN --task" in b)
    evals = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("mit eval")]
    assert len(evals) == 3
    for words in evals:
        assert build_parser().parse_args(words[1:]).command == "eval"


def test_readme_benchmark_commands_exist_and_take_the_documented_options(script_runs):
    """The benchmark commands the README lists are scripts of the repository that take ``--out DIR`` and
    ``--quick``, as the text after them says (their quick runs are tested in tests/benchmarks/)."""
    root = README.parent
    block = next(b for b in _blocks("bash") if "benchmarks/memory_vs_seqlen.py" in b)
    scripts = [shlex.split(line)[1] for line in block.splitlines() if line.startswith("python ")]
    assert len(scripts) == 3
    runs = {script: script_runs.start(["--help"], script=root / script, cwd=root) for script in scripts}
    for script, run in runs.items():
        assert run.wait(120) == 0, run.stderr
        assert "--out" in run.stdout and "--quick" in run.stdout, script


def test_readme_inline_mit_commands_parse():
    """Every ``mit ...`` command quoted inline in the README (export, predict with --masks, demo, the toy train
    command, ...) parses with the real command-line parser; a trailing `...` (the reader's other options) is dropped;
    placeholders in angle brackets, and bare command names without options, are not commands."""
    from mit.cli import DEMOS, build_parser
    from mit.demo import digits

    quoted = {" ".join(span.split()) for span in re.findall(r"`(mit [^`]+)`", README.read_text())}
    commands = [shlex.split(text.removesuffix(" ...")) for text in quoted if "<" not in text]
    # a command has options (a bare `mit data toy` names the command in a table) or names a demo
    commands = [words for words in commands if "--help" not in words and len(words) > 2
                and (any(w.startswith("--") for w in words) or words[1] == "demo")]  # fmt: skip
    assert {words[1] for words in commands} >= {"export", "predict", "demo", "train"}
    assert any("--masks" in words for words in commands)
    for words in commands:
        if words[1] == "demo":  # routed before the parser: a demo name, then that demo's own options
            assert words[2] in DEMOS, words
            if words[2] == "digits":
                digits.build_parser().parse_args(words[3:])
            continue
        args = build_parser().parse_args(words[1:])
        assert args.command == words[1], words


def test_readme_smollm2_example_prints_what_the_readme_shows(script_runs):
    """``python examples/smollm2_quickstart.py`` (the HF example on the real SmolLM2 with an untrained adapter) prints
    exactly the output block the README shows after it."""
    text = README.read_text()
    after = text[text.index("`python examples/smollm2_quickstart.py` runs exactly this") :]
    shown = re.search(r"```\n(.*?)```", after, flags=re.S).group(1)
    run = script_runs.run([], timeout=600, script=README.parent / "examples" / "smollm2_quickstart.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == shown


def test_readme_paper_commands_run_with_tiny_stand_ins(tmp_path, capsys):
    """The seven paper commands and the three ``mit eval`` lines after them run as written, the weights and data they
    name replaced by tiny stand-ins in the same layouts (a 2-layer Llama, a tiny CLIP checkpoint with its processor,
    the fixtures of each dataset format) and one optimizer step each (``accelerate launch`` replaced by the command
    itself: one process)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from tuning_fixtures import make_food101, make_mosi, make_refcoco, make_snli_ve, write_tiny_llama

    from mit.cli import main
    from mit.tuning.image_preprocessing import processor_class

    clip = tmp_path / "clip"
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(clip)
    processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    refer = make_refcoco(tmp_path / "refer")
    make_refcoco(refer, "refcoco+", "unc")
    make_refcoco(refer, "refcocog", "umd")
    stand_ins = {
        "/models/Llama-2-7b-hf": str(write_tiny_llama(tmp_path / "llama")),
        "/models/clip-vit-large-patch14-336": str(clip),
        "/data/refer": str(refer),
        "/data/UPMC-Food101": str(make_food101(tmp_path / "food")),
        "/data/SNLI-VE": str(make_snli_ve(tmp_path / "snli")),
        "/data/MOSI/Processed": str(make_mosi(tmp_path / "mosi")),
        "/data/MOSEI/Processed": str(make_mosi(tmp_path / "mosei", aligned=True)),
    }
    tiny = ["--epochs", "1", "--max-steps", "1", "--batch-size", "2", "--no-progress", "--decoder-hidden", "16",
            "--cls-hidden", "16", "--seq-d-model", "16"]  # fmt: skip

    def substitute(words: list[str]) -> list[str]:
        words = [stand_ins.get(w, w) for w in words]
        return [str(tmp_path / w) if w.startswith("runs/") else w for w in words]

    for argv in _readme_train_commands():
        argv = substitute(argv)
        assert main(["train", *argv, *tiny]) == 0, argv
        run = pathlib.Path(argv[argv.index("--out") + 1])
        assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "latest").is_file(), run
    block = next(b for b in _blocks("bash") if "$RUN --task" in b)
    for line in (line for line in block.splitlines() if line.startswith("mit eval")):
        words = substitute(shlex.split(line.split("#")[0]))
        capsys.readouterr()
        assert main(words[1:]) == 0, line
        assert '"checkpoint"' in capsys.readouterr().out
