"""The neural-tuning experiment (benchmarks/experiments/neural_digits, imported by path: it is not part of the
installed package): data, masks, metrics, the encoder pretraining, the draw
targets, and the quick run on SmolLM2.

The quick run (25 steps of the four-task mix, batch 8: ~30 s on 2 cores; ~20 s on the first 16 layers, as tested) is
far too short for the task metrics (the full runs' results are in the README, "Neural tuning on digits");
what it checks is that one adapter trains on the mixed batch: every task's training loss (its LM loss on the answer
tokens, mostly the new <GLB> / <LCL-1> tokens at this stage, plus its own loss) falls below half its start, and that
every metric is produced."""

from __future__ import annotations

import csv
import dataclasses
import functools
import pathlib
import sys

import numpy as np
import pytest
import torch

from mit.models import SMOLLM2_INSTALL

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import neural_digits as nd  # noqa: E402

# The real-model tests use SmolLM2's first 16 pretrained layers: the experiment adapts from layer 12 (4 layers instead
# of 18), and what they check (the adapter's wiring, that losses fall, the selectivity test's bookkeeping) does not
# need the whole depth.
LAYERS = 16


def test_canvases_pair_two_different_digits_of_the_same_split():
    _, test = nd.load_digits_split()
    pixels, digits, named = nd.make_canvases(test, 300, torch.Generator().manual_seed(0))
    assert pixels.shape == (300, 2, 64) and digits.shape == (300, 2)
    assert (digits[:, 0] != digits[:, 1]).all()
    assert named.float().mean().item() == 0.5  # "Segment the k" names the left digit half of the time
    # every half is a test image with its own label: no training image is used
    flat = test.images.numpy()
    for side in range(2):
        match = (pixels[:, side, None].numpy() == flat[None]).all(-1)  # (300, n_test)
        assert match.any(1).all()
        found = match.argmax(1)
        assert (test.labels.numpy()[found] == digits[:, side].numpy()).all()
    canvas = nd.canvas_image(pixels)
    assert torch.equal(canvas[:, :, :8].reshape(300, 64), pixels[:, 0])
    assert torch.equal(canvas[:, :, 8:].reshape(300, 64), pixels[:, 1])


def test_half_masks_iou_and_the_random_half_baseline():
    side = torch.tensor([0, 1, 1, 0])
    masks = nd.half_mask(side)
    assert masks.shape == (4, 2, 64) and masks.sum().item() == 4 * 64
    assert torch.equal(masks[:, 1].amax(-1), side.float())
    gen = np.random.default_rng(0)
    pred = torch.tensor(gen.random((4, 2, 64)) > 0.5)
    expected = [
        np.logical_and(p, t).sum() / np.logical_or(p, t).sum() for p, t in zip(pred.numpy(), masks.bool().numpy())
    ]
    torch.testing.assert_close(nd.iou(pred, masks), torch.tensor(expected, dtype=torch.float32))
    # picking a half at random: IoU 1 or 0, so P@0.5 = the fraction picked right (~50%)
    guess = nd.half_mask(torch.tensor(gen.integers(0, 2, 4000)))
    truth = nd.half_mask(torch.tensor(gen.integers(0, 2, 4000)))
    ious = nd.iou(guess, truth)
    assert set(ious.unique().tolist()) == {0.0, 1.0}
    assert abs((ious >= 0.5).float().mean().item() - 0.5) < 0.03
    assert nd.dice_loss(torch.where(masks > 0, 30.0, -30.0), masks).item() < 1e-6
    assert nd.dice_loss(torch.where(masks > 0, -30.0, 30.0), masks).item() > 0.99


def test_patch_encoder_and_mask_decoder_shapes():
    train, _ = nd.load_digits_split()
    encoder = nd.PatchEncoder(16, 2, *nd.pixel_statistics(train.images))
    tokens, features = encoder(train.images[:3].view(3, 1, 64).expand(3, 2, 64))
    assert tokens.shape == (3, 4, 16) and features.shape == (3, 2, 16)
    # the learned positions tell the two (identical) halves apart
    assert not torch.allclose(features[:, 0], features[:, 1])
    assert nd.MaskDecoder(32, 16)(features, torch.randn(3, 32)).shape == (3, 2, 64)
    with pytest.raises(ValueError, match="patches"):
        encoder(train.images[:3].view(3, 1, 64).expand(3, 3, 64))


def test_pretrained_patch_encoder_tokens_carry_the_digit_on_held_out_images():
    from sklearn.linear_model import LogisticRegression

    train, test = nd.load_digits_split()
    torch.manual_seed(0)
    encoder = nd.PatchEncoder(32, 2, *nd.pixel_statistics(train.images))

    def probe_accuracy() -> float:  # a linear probe fitted on the training tokens, scored on the test tokens
        with torch.no_grad():
            fit, _ = encoder(train.images[:, None])
            held, _ = encoder(test.images[:, None])
        probe = LogisticRegression(max_iter=200).fit(fit[:, 0].numpy(), train.labels.numpy())
        return float((probe.predict(held[:, 0].numpy()) == test.labels.numpy()).mean())

    before = probe_accuracy()
    losses = nd.pretrain_encoder(encoder, train, 60)
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0]
    after = probe_accuracy()
    assert after > 0.9 and after > before, (before, after)
    with pytest.raises(ValueError, match="steps"):
        nd.pretrain_encoder(encoder, train, -1)


def test_draw_targets_are_the_digit_mean_images_or_a_training_image_of_the_digit():
    from types import SimpleNamespace

    train, _ = nd.load_digits_split()
    fake = SimpleNamespace(draw_prompts=[[d] for d in range(10)], draw_answer=[99])
    digits = torch.tensor([3, 7, 3, 0])
    gen = torch.Generator().manual_seed(0)
    rows, extra = nd.build_rows(fake, "draw", train, 4, gen, index=digits, draw_target="mean")
    images, labels = train.images.numpy(), train.labels.numpy()
    expected = np.stack([images[labels == d].mean(0) for d in digits.tolist()])
    np.testing.assert_allclose(extra["target"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert [r[1:] for r in rows] == [([3], [99]), ([7], [99]), ([3], [99]), ([0], [99])]
    _, extra = nd.build_rows(fake, "draw", train, 4, gen, index=digits, draw_target="sample")
    for target, d in zip(extra["target"].numpy(), digits.tolist()):  # each target is a training image of its digit
        assert ((images == target).all(1) & (labels == d)).any()
    with pytest.raises(ValueError, match="draw_target"):
        nd.build_rows(fake, "draw", train, 4, gen, index=digits, draw_target="blur")
    pixels, logits = nd.DrawHead(16)(torch.randn(5, 16))
    assert pixels.shape == (5, 64) and logits.shape == (5, 10)


QUICK_LOSS_RATIO = {"caption": 0.5, "draw": 0.5, "segment_digit": 0.5, "segment_larger": 0.5}


def test_quick_run_trains_one_adapter_on_the_four_tasks(tmp_path, monkeypatch):
    """The command line's quick run (on SmolLM2's first LAYERS layers)."""
    monkeypatch.setattr(nd.grid, "load_smollm2", functools.partial(nd.grid.load_smollm2, num_layers=LAYERS))
    try:
        nd.main(["--quick", "--out", str(tmp_path)])
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    with open(tmp_path / "neural_digits_quick.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["variant"] == "neural"
    for key in ("caption_accuracy", "draw_accuracy", "segment_digit_p50", "segment_larger_p50"):
        assert 0.0 <= float(row[key]) <= 1.0
    with open(tmp_path / "neural_digits_quick_curves.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(c["step"]) for c in curve] == list(range(1, 26))
    for task in nd.TASKS:  # every task's loss falls over the 25 steps (first 5 vs last 5)
        losses = [float(c[f"loss_{task}"]) for c in curve]
        assert np.mean(losses[-5:]) < QUICK_LOSS_RATIO[task] * np.mean(losses[:5]), task
    assert (tmp_path / "neural_digits_quick.png").stat().st_size > 10_000


def test_validation_split_is_by_image_disjoint_and_stratified():
    train, test = nd.load_digits_split()
    fit, val = nd.split_validation(train, 0.2)
    fit_ids, val_ids = set(fit.index.tolist()), set(val.index.tolist())
    assert not fit_ids & val_ids and fit_ids | val_ids == set(train.index.tolist())
    assert not val_ids & set(test.index.tolist())
    assert abs(len(val.labels) - 0.2 * len(train.labels)) <= 1
    for d in range(10):  # every digit in the same proportion (to one image)
        share = (train.labels == d).float().mean().item() * len(val.labels)
        assert abs((val.labels == d).sum().item() - share) <= 1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation_fraction"):
            nd.split_validation(train, bad)


def _run(variant, lr, seed, val_score, test_value, **extra):
    metrics = {k: test_value for k in nd.METRIC_KEYS}
    tasks = nd.IMAGE_TASKS if variant == "mit" else nd.TASKS
    val = {f"val_{t}_accuracy" if t in ("caption", "draw") else f"val_{t}_miou": val_score for t in tasks}
    val |= {f"val_{t}_p50": 1.0 for t in tasks if t.startswith("segment")}  # P@0.5 takes no part in the choice
    return {"variant": variant, "lr": lr, "seed": seed, "steps": 400, "val_score": val_score, **val, **metrics,
            "trainable_params": 10, "train_seconds": 1.0, **extra}  # fmt: skip


def test_learning_rate_is_chosen_on_validation_and_reported_over_seeds():
    runs = [
        _run("neural", 1e-3, 0, 0.70, 0.99),  # best on test, not on validation: must not be chosen
        _run("neural", 3e-3, 0, 0.80, 0.90),
        _run("neural", 1e-2, 0, 0.80, 0.50),  # tie on validation: the smaller learning rate wins
        _run("neural", 3e-3, 1, 0.10, 0.70),  # a later seed's validation score takes no part in the choice
        _run("neural", 3e-3, 2, 0.10, 0.80),
        _run("mit", 1e-2, 0, 0.60, 0.40),
        _run("mit", 1e-3, 0, 0.20, 0.30),
    ]
    assert nd.choose_lr(runs[:3], 0) == 3e-3
    with pytest.raises(ValueError, match="seed 5"):
        nd.choose_lr(runs, 5)
    neural, mit = nd.summarise(runs)
    assert neural["variant"] == "neural" and neural["lr"] == 3e-3 and neural["seeds"] == "0 1 2"
    assert neural["lrs_tried"] == "0.001 0.003 0.01"
    assert neural["caption_accuracy"] == pytest.approx(0.8) and neural["val_score"] == pytest.approx(1 / 3)
    assert nd.validation_score({"val_caption_accuracy": 0.9, "val_segment_digit_miou": 0.5, "val_draw_p50": 1}) == 0.7
    assert (neural["caption_accuracy_min"], neural["caption_accuracy_max"]) == (0.7, 0.9)
    assert mit["lr"] == 1e-2 and mit["seeds"] == "0" and mit["segment_larger_p50"] == 0.4


def test_runs_at_another_step_count_are_another_setting_never_averaged_in():
    runs = [
        _run("neural", 1e-3, 0, 0.70, 0.50),
        _run("neural", 3e-3, 0, 0.80, 0.60),
        _run("neural", 3e-3, 1, 0.10, 0.70),
        _run("neural", 1e-3, 0, 0.90, 0.95, steps=800),  # a better validation score, but another experiment
        _run("neural", 1e-3, 1, 0.90, 0.85, steps=800),
    ]
    runs.append(_run("neural", 3e-3, 0, 0.2, 0.3, segment_tokens=5))  # another recipe field: another setting too
    short, long, five = nd.summarise(runs)
    assert (short["steps"], short["lr"], short["seeds"]) == (400, 3e-3, "0 1")
    assert short["caption_accuracy"] == pytest.approx(0.65)
    assert (long["steps"], long["lr"], long["seeds"], long["lrs_tried"]) == (800, 1e-3, "0 1", "0.001")
    assert long["caption_accuracy"] == pytest.approx(0.9)
    assert (five["segment_tokens"], five["steps"], five["caption_accuracy"]) == (5, 400, 0.3)
    summary = [short, long, five]
    labels = [nd.setting_label(r, summary) for r in summary]
    assert labels == ["neural steps 400 segment_tokens 1", "neural steps 800 segment_tokens 1",
                      "neural steps 400 segment_tokens 5"]  # fmt: skip
    assert nd.setting_label(short, [short]) == "neural"
    assert nd.setting({"variant": "dense"}) == nd.setting({"variant": "dense", "steps": 400, "train_encoder": "True"})


def test_a_choice_at_the_edge_of_the_sweep_extends_it_by_half_a_decade():
    assert nd.beyond_edge(1e-3, [1e-3, 3e-3, 1e-2]) == 3e-4
    assert nd.beyond_edge(3e-4, [3e-4, 1e-3, 3e-3]) == 1e-4
    assert nd.beyond_edge(1e-2, [1e-3, 3e-3, 1e-2]) == 3e-2
    assert nd.beyond_edge(3e-2, [1e-2, 3e-2]) == 1e-1
    assert nd.beyond_edge(3e-3, [1e-3, 3e-3, 1e-2]) is None


def test_partial_runs_merge_into_one_summary_and_a_run_twice_is_an_error(tmp_path):
    first = [_run("neural", lr, 0, v, v) for lr, v in ((1e-3, 0.5), (3e-3, 0.6))]
    second = [_run("dense", 3e-3, 0, 0.4, 0.4)]
    curves = lambda runs: [  # noqa: E731
        {
            "variant": r["variant"],
            "steps": r["steps"],
            "lr": r["lr"],
            "seed": r["seed"],
            "run": f"{r['variant']} {r['lr']}",
            "step": s,
            "loss": 1.0 / s,
        }
        for r in runs
        for s in (1, 2)
    ]
    nd.write_results(first, curves(first), [], tmp_path / "a", "neural_digits")
    nd.write_results(second, curves(second), [], tmp_path / "b", "neural_digits")
    summary = nd.merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    assert [(r["variant"], r["lr"]) for r in summary] == [("neural", 3e-3), ("dense", 3e-3)]
    merged = nd.read_rows(tmp_path / "all" / "neural_digits_runs.csv")
    assert len(merged) == 3 and merged[0]["val_score"] == 0.5
    assert merged[0]["trainable_params"] == 10 and isinstance(merged[0]["seed"], int)
    # runs are deterministic: a run repeated in another part is kept once; a repeat with other metrics is an error
    again = nd.merge_runs([tmp_path / "a", tmp_path / "b", tmp_path / "a"], tmp_path / "again")
    assert again == summary and len(nd.read_rows(tmp_path / "again" / "neural_digits_runs.csv")) == 3
    assert len(nd.read_rows(tmp_path / "again" / "neural_digits_curves.csv")) == 6
    other = [dict(first[1], segment_larger_p50=0.1)]
    nd.write_results(other, curves(other), [], tmp_path / "other", "neural_digits")
    with pytest.raises(ValueError, match="appears twice with different metrics"):
        nd.merge_runs([tmp_path / "a", tmp_path / "other"], tmp_path / "again")
    # the same (variant, lr, seed) at another step count is another run; curve rows written before they recorded
    # their step count take their run's
    longer = [_run("neural", 3e-3, 0, 0.9, 0.9, steps=800)]
    nd.write_results(longer, curves(longer), [], tmp_path / "c", "neural_digits")
    old_format = [{k: v for k, v in c.items() if k != "steps"} for c in curves(longer)]
    nd.write_csv(old_format, tmp_path / "c" / "neural_digits_curves.csv")
    summary = nd.merge_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "all")
    assert [(r["variant"], r["steps"], r["lr"]) for r in summary] == [
        ("neural", 400, 3e-3), ("dense", 400, 3e-3), ("neural", 800, 3e-3)
    ]  # fmt: skip
    merged = nd.read_rows(tmp_path / "all" / "neural_digits_curves.csv")
    assert sorted({(c["variant"], c["steps"]) for c in merged}) == [("dense", 400), ("neural", 400), ("neural", 800)]
    assert all(c["segment_tokens"] == 1 and c["train_encoder"] == "True" for c in merged)  # the defaults, filled in
    with pytest.raises(ValueError, match="from_runs"):
        nd.merge_runs([tmp_path / "missing"], tmp_path / "again")


def test_every_variant_sees_the_same_samples_of_a_task_per_step():
    assert nd.variant_groups("neural") == [nd.TASKS] == nd.variant_groups("dense")
    assert nd.variant_groups("per_task") == [(t,) for t in nd.TASKS]
    assert nd.variant_groups("mit") == [("caption", "segment_digit", "segment_larger")]  # drawing has no image
    with pytest.raises(ValueError, match="variant"):
        nd.variant_groups("lora")


def test_mit_variant_infuses_the_image_and_trains_on_the_image_tasks():
    """MiT on the real SmolLM2: the modality embedding is both digits' features (a single digit: then zeros), the
    untrained (zero-initialised) infusion leaves the frozen model's states unchanged, a draw row is refused, only the
    infusion maps are in the adapter's learning-rate group, a segmentation loss reaches them, and training lowers the
    caption loss."""
    from mit.models import load_smollm2

    try:
        base, tokenizer = load_smollm2(num_layers=LAYERS)
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    train, _ = nd.load_digits_split()
    cfg = nd.NeuralDigitsConfig(encoder_pretrain_steps=0)
    torch.manual_seed(0)
    model = nd.build_model("mit", base, tokenizer, cfg, nd.pixel_statistics(train.images))
    assert isinstance(model, nd.MiTDigits) and model.segment_answer == []
    single, features = model.image_inputs(train.images[:3, None])
    assert single.shape == (3, 2 * cfg.patch_dim) and features.shape == (3, 1, cfg.patch_dim)
    assert torch.equal(single[:, : cfg.patch_dim], features[:, 0]) and not single[:, cfg.patch_dim :].any()
    pair, features = model.image_inputs(train.images[:4].view(2, 2, 64))
    assert torch.equal(pair, features.flatten(1))

    rows = [(single[i], model.caption_prompt, model.caption_answers[3]) for i in range(3)]
    with torch.no_grad():
        hidden, _ = model.run(rows)
        ids, mask, positions, _ = model.layout(rows, [0, 0, 0])
        frozen = base.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    torch.testing.assert_close(hidden, frozen, rtol=1e-5, atol=1e-4)  # the fused attention's fp32 rounding only
    with pytest.raises(ValueError, match="draw"):
        model.run([(None, model.draw_prompts[1], [])])

    adapter, heads = model.parameter_groups(1e-3, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert adapter["params"] and all(".mit_" in names[id(p)] for p in adapter["params"])
    assert not any(".mit_" in names[id(p)] for p in heads["params"])
    assert not any(p.requires_grad for p in model.llm.parameters() if ".mit_" not in names[id(p)])

    # a segmentation loss reaches the infusion maps (through the last prompt token's state)
    part = nd.build_rows(model, "segment_digit", train, 2, torch.Generator().manual_seed(0))
    loss, _ = nd.batch_loss(model, ["segment_digit"], nd.task_outputs(model, ["segment_digit"], [part]))
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in adapter["params"] if p.grad is not None) > 0
    model.zero_grad(set_to_none=True)
    cfg.steps, cfg.warmup_steps = 30, 3  # captions are learned within a few steps (segmentation takes hundreds)
    curve, _ = nd.train(model, nd.IMAGE_TASKS, 2, train, cfg, "mit")
    losses = [c["loss_caption"] for c in curve]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_selectivity_test_switches_off_the_chosen_units_at_every_dose():
    """On the real SmolLM2 with an untrained neural adapter (PyTorch-default W_b: the units already act): switching
    units off zeroes exactly those units of Z^a at every adapted layer, and the test reports nothing-off once and, per
    dose, the units most selective for each task and two random sets of the same size."""
    from mit.models import load_smollm2

    try:
        base, tokenizer = load_smollm2(num_layers=LAYERS)
    except ImportError as error:
        pytest.skip(f"{error} ({SMOLLM2_INSTALL})")
    train, test = nd.load_digits_split()
    cfg = nd.NeuralDigitsConfig(encoder_pretrain_steps=0, selectivity_fractions=(0.01, 0.03), selectivity_samples=2)
    torch.manual_seed(0)
    model = nd.build_model("neural", base, tokenizer, cfg, nd.pixel_statistics(train.images))
    layers = model.units()
    assert len(layers) == base.config.num_hidden_layers - cfg.start_layer and layers[0].rank == cfg.rank

    off = torch.rand(len(layers), cfg.rank, generator=torch.Generator().manual_seed(1)) < 0.3
    seen = []
    handles = nd.switch_off(model, off)  # registered first: the recording hooks below see its output
    handles += [layer.b_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for layer in layers]
    try:
        with torch.no_grad():
            nd.task_outputs(model, ["caption"], [nd.build_rows(model, "caption", train, 2, torch.Generator())])
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(layers)
    for i, z in enumerate(seen):
        assert not z[..., off[i]].any(), i
        assert z[..., ~off[i]].abs().sum() > 0, i  # the other units stay active (about rho0 * r per token)

    rows = nd.selectivity_test(model, train, test, nd.digit_classifier(train), cfg)
    total = len(layers) * cfg.rank
    conditions = [f"selective_{t}" for t in nd.TASKS] + ["random_0", "random_1"]
    assert [(r["condition"], r["units_off"]) for r in rows] == [("none", 0)] + [
        (c, round(f * total)) for f in cfg.selectivity_fractions for c in conditions
    ]
    assert all(0.0 <= r[t] <= 1.0 for r in rows for t in nd.TASKS)
    with pytest.raises(ValueError, match="selectivity_fractions"):
        nd.selectivity_test(model, train, test, None, dataclasses.replace(cfg, selectivity_fractions=(1.5,)))


def test_the_experiment_runs_by_path_and_mit_demo_neural_digits_runs_it_from_a_source_checkout(script_runs):
    """The experiment is not in the installed package: ``run.py`` runs as a script, and ``mit demo neural-digits``
    runs that script (same flags) in a source checkout (run from its root: the installed package is not one)."""
    script = EXPERIMENTS / "neural_digits" / "run.py"
    for target, args in ((script, ["--help"]), ("-m mit.cli", ["demo", "neural-digits", "--help"])):
        result = script_runs.run(args, timeout=300, script=target, cwd=EXPERIMENTS.parents[1])
        assert result.returncode == 0, result.stderr[-2000:]
        assert "benchmarks/experiments/neural_digits/run.py" in result.stdout and "--from-runs" in result.stdout
        # the task list shows the answer the default recipe trains (one <LCL-1> token, ExperimentConfig.segment_tokens)
        assert nd.NeuralDigitsConfig().segment_tokens == 1 and '-> "<LCL-1>..<LCL-5>"' not in result.stdout
        assert '"Segment the 3" -> "<LCL-1>"' in result.stdout and "(default 1, --segment-tokens)" in result.stdout
        # a run writes outside the committed results unless told to (--out benchmarks/results)
        text = " ".join(result.stdout.split()).replace("neural- digits", "neural-digits")  # argparse wraps at "-"
        assert "(default: ./mit-results/neural-digits; --out benchmarks/results refreshes the committed" in text
    import importlib.util

    assert importlib.util.find_spec("mit.demo.neural_digits") is None
