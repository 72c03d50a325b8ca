"""Neural tuning's multitask path: the MMUD adapter on a synthetic fixture in its published format, the task samples,
equal task mixing, and `mit train --task multitask` / `mit eval` end to end on a tiny Llama + tiny CLIP."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tuning_fixtures import MMUD_OBJECTS, make_mmud, one_thread, write_tiny_clip_config, write_tiny_llama

from mit.cli import main
from mit.tuning.data import MMUDDataset
from mit.tuning.tasks import get_task
from mit.tuning.tasks.multitask import TASKS, MultiTaskDataset, collate, encode, metrics, order, reasoning_sample

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    return {
        "llama": str(write_tiny_llama(root / "llama", causal=True)),
        "clip": str(write_tiny_clip_config(root)),
        "mmud": make_mmud(root / "mmud"),
    }


def _box_mask(k: int, size: int, width: int, height: int) -> torch.Tensor:
    """The fixture's object k, rasterised independently at the original size, then nearest-resized like the
    adapter does."""
    from PIL import Image

    x0, y0, x1, y1 = 4 + 10 * k, 4 + 6 * k, 14 + 10 * k, 20 + 6 * k
    full = np.zeros((height, width), dtype=np.uint8)
    full[y0:y1, x0:x1] = 255
    small = Image.fromarray(full).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(small) > 127).float()


def test_mmud_fixture_parses_every_task(assets):
    root = assets["mmud"]
    records = MMUDDataset(root, "train", image_size=32)
    raw = pickle.loads((root / "train.pkl").read_bytes())
    assert len(records) == 3
    for i in range(3):
        item = records[i]
        count = 2 + i % 2
        width = 40 + 4 * i
        assert item["image"].shape == (3, 32, 32) and item["caption"] == raw[i][1]
        assert item["masks"].shape == (count, 32, 32)
        for k in range(count):  # polygons (record 0) and RLE lists (others) give the same rectangle
            expected = _box_mask(k, 32, width, 36)
            # polygon rasterisation includes the far edge: at most one extra row / column of the original grid
            assert (item["masks"][k] - expected).abs().sum() <= 2 * 32, (i, k)
            assert (item["masks"][k] * expected).sum() == expected.sum()
        expected_glb = pickle.loads((root / "CLIPGENFeatureUN" / f"{i}.jpg.pkl").read_bytes()).reshape(-1)
        assert torch.equal(item["glb_target"], expected_glb)
    samples = MultiTaskDataset(records)
    assert len(samples) == 12 and [samples[j]["task"] for j in range(4)] == list(TASKS)
    caption, refseg, reason, t2i = (samples[4 + j] for j in range(4))  # record 1: three objects
    assert caption["answer"] == "a picture with 3 objects" and caption["masks"].shape[0] == 0
    assert ", ".join(t[0] for t in MMUD_OBJECTS) in refseg["prompt"]
    assert refseg["answer"] == "The segmented object is <LCL-1>, <LCL-2>, <LCL-3>."
    assert torch.equal(refseg["masks"], records[1]["masks"])
    # reasoning: tags removed from the text, one token per distinct tag in order of first mention (<LCL-2> first)
    assert "<LCL" not in reason["prompt"] and "Question" not in reason["prompt"]
    assert reason["answer"] == "the square  is left of  and  is red . <LCL-1> <LCL-2>"
    assert torch.equal(reason["masks"], records[1]["masks"][[1, 0]])
    assert t2i["answer"] == "<GLB>" and caption["answer"] in t2i["prompt"]
    assert torch.equal(t2i["glb_target"], records[1]["glb_target"])
    with pytest.raises(ValueError, match="enriched_text: expected"):
        reasoning_sample("##Question: no separator <LCL-1>")
    with pytest.raises(ValueError, match="split: expected one of"):
        MMUDDataset(root, "dev")


def test_batches_mix_the_tasks_equally(assets):
    samples = MultiTaskDataset(MMUDDataset(assets["mmud"], "train", image_size=32))
    shuffled = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    arranged = order(samples, shuffled)
    assert sorted(arranged) == list(range(len(samples)))
    for start in range(0, len(arranged), 4):
        assert sorted(samples.task_of(j) for j in arranged[start : start + 4]) == sorted(TASKS)
    for task in TASKS:  # each task keeps its shuffled order
        assert [j for j in arranged if samples.task_of(j) == task] == [
            j for j in shuffled if samples.task_of(j) == task
        ]
    batch = collate([samples[j] for j in arranged[:8]])
    assert sorted(batch["task"]) == sorted(TASKS * 2)
    masks_per_sample = [len(samples[j]["masks"]) for j in arranged[:8]]
    assert batch["masks"].shape[0] == sum(masks_per_sample)
    assert batch["mask_sample"].tolist() == [b for b, n in enumerate(masks_per_sample) for _ in range(n)]
    assert batch["glb_sample"].tolist() == [b for b, t in enumerate(batch["task"]) if t == "t2i"]


def test_encode_labels_only_the_answer(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    tokenizer.add_tokens(["<LCL-1>", "<GLB>"], special_tokens=True)
    items = [
        {"id": "a", "prompt": "segment the red square", "answer": "<LCL-1>"},
        {"id": "b", "prompt": "a dog", "answer": "red square <GLB>"},
    ]
    for side in ("left", "right"):
        out = encode(tokenizer, items, side, 64)
        for b, x in enumerate(items):
            real = out["attention_mask"][b].bool()
            ids = out["input_ids"][b][real].tolist()
            answer = tokenizer(x["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert ids == tokenizer(x["prompt"])["input_ids"] + answer
            labelled = out["labels"][b] != -100
            assert out["labels"][b][labelled].tolist() == answer and not (labelled & ~real).any()
            assert real[0 if side == "right" else -1]
    short = encode(tokenizer, items, "left", 5)  # the prompt is cut from its start, the answer kept
    assert short["input_ids"].shape[1] == 5 and short["labels"][1, -4:].tolist() != [-100] * 4
    with pytest.raises(ValueError, match="max_length: the answer of b has 4 tokens"):
        encode(tokenizer, items, "left", 4)


def test_metrics_against_hand_computed_values():
    rows = [("caption", True, 3, 3), ("caption", False, 1, 4), ("refseg", 5, 10), ("refseg", 9, 10)]
    rows += [("reasonseg", 0, 4), ("t2i", 0.5), ("t2i", -0.1)]
    out = metrics(rows)
    assert out["caption_exact"] == 0.5 and out["caption_token_acc"] == pytest.approx(4 / 7)
    assert out["refseg_mIoU"] == pytest.approx(0.7) and out["refseg_P@0.5"] == 1.0
    assert out["reasonseg_P@0.5"] == 0.0 and out["t2i_cosine"] == pytest.approx(0.2)
    assert out["score"] == pytest.approx((0.5 + 0.7 + 0.0 + 0.2) / 4)
    assert np.isnan(metrics(rows[:4])["score"])  # a task without records is not hidden


def _train(assets, out, *extra):
    argv = ["train", "--task", "multitask", "--model", assets["llama"], "--data", str(assets["mmud"]), "--out", out]
    argv += ["--encoder", assets["clip"], "--rank", "8", "--sparsity", "0.5", "--batch-size", "4", "--epochs", "1"]
    argv += ["--decoder-hidden", "8", "--glb-hidden", "16", "--lr", "1e-3", "--no-progress", *extra]
    return main(argv)


def test_train_resume_and_eval_from_the_command_line(assets, tmp_path, capsys):
    assert get_task("multitask").method.name == "neural" and get_task("multitask").causal_lm
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert _train(assets, straight) == 0  # 3 records x 4 tasks / batch 4 = 3 steps, then evaluation
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["global_step"] == 3
    for name in ("caption_exact", "refseg_mIoU", "reasonseg_P@0.5", "t2i_cosine"):
        assert np.isfinite(final[name])
    assert _train(assets, stopped, "--max-steps", "2") == 0
    assert (tmp_path / "stopped" / "checkpoints" / "step-0000002" / "trainable.safetensors").is_file()
    assert _train(assets, stopped, "--resume") == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["global_step"] == 3
    assert (tmp_path / "stopped" / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    assert resumed["score"] == pytest.approx(final["score"], abs=1e-6)

    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["neural"]["rank"] == 8 and saved["neural"]["image_dim"] == 32  # the tiny CLIP's width
    assert saved["neural"]["new_tokens"] == ["<LCL-1>", "<LCL-2>", "<LCL-3>", "<LCL-4>", "<LCL-5>", "<GLB>"]
    weights = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    # only the neurons (layer 1 of 2: start_layer = half the depth), the image projection, the new-token rows
    # (embedding and the untied LM head) and the two heads train
    allowed = ("llm.model.layers.1.self_attn.nt_neurons.", "llm.nt_image_projection.", "llm.nt_new_tokens.")
    allowed += ("mask_decoder.", "glb_head.")
    assert all(name.startswith(allowed) for name in weights), sorted(weights)
    for prefix in allowed:
        assert any(name.startswith(prefix) for name in weights), prefix
    assert weights["llm.nt_new_tokens.embedding"].shape == (6, 32)
    assert weights["llm.nt_new_tokens.head"].shape == (6, 32)

    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", straight, "--output", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["score"] == pytest.approx(final["score"], abs=1e-6)
    assert evaluated["caption_exact"] == final["caption_exact"]


def test_help_lists_the_neural_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--rank", "--sparsity", "--nt-dropout", "--zero-init-b", "--glb-weight", "multitask"):
        assert flag in text


def test_heads_and_regression_loss():
    from mit.tuning.heads_neural import EmbeddingRegressor, FiLMMaskDecoder
    from mit.tuning.losses import embedding_regression_loss

    torch.manual_seed(0)
    decoder = FiLMMaskDecoder(cond_dim=6, feature_dim=5, num_levels=2, hidden=8).eval()
    levels = [torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)]
    state = torch.randn(3, 6)
    logits = decoder(state, levels, (16, 16))
    assert logits.shape == (3, 16, 16)
    one = decoder(state[1:2], [x[1:2] for x in levels], (16, 16))  # rows are independent (GroupNorm per sample)
    assert torch.allclose(one[0], logits[1], atol=1e-5)
    other = decoder(state[[0, 0, 0]], levels, (16, 16))  # the state conditions the mask
    assert not torch.allclose(other[1], logits[1])
    with pytest.raises(ValueError, match="levels: expected 2 feature maps, got 1"):
        decoder(state, levels[:1], (16, 16))
    assert EmbeddingRegressor(6, 4, hidden=7)(state).shape == (3, 4)
    p, y = torch.randn(5, 4), torch.randn(5, 4)
    pn, yn = p.numpy().astype(np.float64), y.numpy().astype(np.float64)
    cos = (pn * yn).sum(1) / np.linalg.norm(pn, axis=1) / np.linalg.norm(yn, axis=1)
    expected = (1 - cos).mean() + ((pn - yn) ** 2).mean()
    assert float(embedding_regression_loss(p, y)) == pytest.approx(expected, rel=1e-5)
    assert float(embedding_regression_loss(y * 1, y)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="predictions and targets"):
        embedding_regression_loss(p, y[:, :3])


def test_outputs_do_not_depend_on_padding_side_or_a_task_id(assets, tmp_path):
    """The <LCL-i> / <GLB> states are read at the right positions after the image tokens (left and right padding
    agree), the answer predictions are what greedy generation emits, and the model reads no task id."""
    from mit.tuning.config import RunConfig
    from mit.tuning.tasks import make_collate
    from mit.tuning.trainer import Trainer

    settings = {"task": "multitask", "model": assets["llama"], "data": str(assets["mmud"]), "out": str(tmp_path)}
    settings.update(encoder=assets["clip"], rank=8, sparsity=0.5, decoder_hidden=8, glb_hidden=16, progress=False)
    trainer = Trainer(RunConfig.from_dict(settings), build_train_data=False)
    model, spec, tokenizer = trainer.unwrapped.eval(), trainer.spec, trainer.tokenizer
    items = [trainer.eval_dataset[j] for j in range(8)]
    left = make_collate(spec, tokenizer, "left", 64)(items)
    right = make_collate(spec, tokenizer, "right", 64)(items)
    assert not torch.equal(left["input_ids"], right["input_ids"])  # some rows are padded
    with torch.no_grad():
        a, b = model(left), model(right)
        for key in ("mask_logits", "glb_prediction", "loss"):
            assert torch.allclose(a[key], b[key], atol=1e-4), key
        for row in range(8):
            answer_left, answer_right = left["labels"][row] != -100, right["labels"][row] != -100
            assert torch.equal(a["answer_predictions"][row][answer_left], b["answer_predictions"][row][answer_right])
        # the prediction at each answer's first position is greedy generation's first token from the prompt alone
        patches = model.encoder(left["image"]).patches
        for row in range(8):
            prompt = left["input_ids"][row][(left["attention_mask"][row] == 1) & (left["labels"][row] == -100)]
            image = {"image_features": patches[row : row + 1]} if left["has_image"][row] else {}  # t2i: no image
            first = model.llm.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                **image,
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            position = int((left["labels"][row] != -100).nonzero()[0])
            assert int(first[0, -1]) == int(a["answer_predictions"][row, position]), row
        # the states the heads read are the final states at the task tokens: those of a forward of the prompt cut
        # right after each task token (causal attention), read at its last position
        from mit.hf import decoder_of

        seen = {}
        hooks = [
            model.mask_decoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("lcl", args[0])),
            model.glb_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("glb", args[0])),
        ]
        model(left)
        for hook in hooks:
            hook.remove()
        final = []
        hook = decoder_of(model.llm).norm.register_forward_hook(lambda m, args, output: final.append(output))
        expected = {"lcl": [], "glb": []}
        task_ids = [*model.lcl_ids.tolist(), model.glb_id]
        for row in range(8):
            real = left["input_ids"][row][left["attention_mask"][row] == 1]
            for position in range(len(real)):
                if int(real[position]) in task_ids:
                    image = {"image_features": patches[row : row + 1]} if left["has_image"][row] else {}
                    model.llm(input_ids=real[None, : position + 1], **image)
                    kind = "glb" if int(real[position]) == model.glb_id else "lcl"
                    expected[kind].append(final[-1][0, -1])
        hook.remove()
        for kind in ("lcl", "glb"):
            assert torch.allclose(torch.stack(expected[kind]), seen[kind], atol=1e-4), kind
        del left["task"]
        c = model(left)
    assert torch.equal(c["mask_logits"], a["mask_logits"]) and torch.equal(c["glb_prediction"], a["glb_prediction"])
