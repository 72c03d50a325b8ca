"""Test metrics: caption exact match (greedy decoding), draw accuracy (a digit classifier on the drawn
images), segmentation mIoU and P@0.5."""

from __future__ import annotations

import dataclasses

import torch

from mit.demo.digits import DigitsSplit

from .config import NeuralDigitsConfig
from .models import DigitsModel
from .tasks import caption_text, make_canvases
from .train import build_rows, task_outputs


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks (N, ...); an empty union counts as IoU 1."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclasses.dataclass
class EvalSets:
    caption: torch.Tensor  # test image indices
    canvases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per segmentation task


def eval_sets(test: DigitsSplit, cfg: NeuralDigitsConfig, caption: int | None = None, segment: int | None = None):
    n = len(test.labels)
    count = n if caption is None else min(caption, n)
    gen = torch.Generator().manual_seed(12345)
    segment = segment or cfg.eval_segment
    return EvalSets(
        caption=torch.linspace(0, n - 1, count).round().long(),
        canvases={t: make_canvases(test, segment, gen) for t in ("segment_digit", "segment_larger")},
    )


def digit_classifier(train_split: DigitsSplit):
    """A logistic-regression digit classifier trained only on the training split's real images."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(train_split.images.numpy(), train_split.labels.numpy())


@torch.no_grad()
def greedy_answers(model: DigitsModel, tokens: torch.Tensor, prompt: list[int], max_new: int = 8) -> list[list[int]]:
    """Greedy decoding of (B, P, patch_dim) image tokens + ``prompt`` through :meth:`NeuralDigits.run` (the training
    layout, re-run in full at each step: the answers are a few tokens); each answer stops after its EOS."""
    answers: list[list[int]] = [[] for _ in range(len(tokens))]
    for _ in range(max_new):
        open_rows = [b for b, a in enumerate(answers) if not a or a[-1] != model.eos_id]
        if not open_rows:
            break
        hidden, _ = model.run([(tokens[b], prompt, answers[b]) for b in open_rows])
        for b, token in zip(open_rows, model.lm_logits(hidden[:, -1]).argmax(-1).tolist()):
            answers[b].append(token)
    return answers


@torch.no_grad()
def evaluate(model: DigitsModel, tasks: tuple[str, ...], test: DigitsSplit, sets: EvalSets, classifier,
             batch: int = 50) -> dict[str, float]:  # fmt: skip
    """The metrics of ``tasks``: caption exact-match accuracy (greedy decoding with the image tokens), draw accuracy
    (classifier on the generated images of "Draw a 0" .. "Draw a 9"), segmentation mIoU and P@0.5."""
    model.eval()
    out: dict[str, float] = {}
    if "caption" in tasks:
        correct = 0
        for s in range(0, len(sets.caption), batch):
            pick = sets.caption[s : s + batch]
            tokens, _ = model.image_inputs(test.images[pick][:, None])
            texts = model.tokenizer.batch_decode(greedy_answers(model, tokens, model.caption_prompt),
                                                 skip_special_tokens=True)  # fmt: skip
            correct += sum(t.strip() == caption_text(int(d)) for t, d in zip(texts, test.labels[pick]))
        out["caption_accuracy"] = correct / len(sets.caption)
    if "draw" in tasks:
        rows, extra = build_rows(model, "draw", test, 10, None, index=torch.arange(10))
        pixels = task_outputs(model, ["draw"], [(rows, extra)])[0]["pixels"].clamp(0, 1)
        out["draw_accuracy"] = float((classifier.predict(pixels.numpy()) == extra["digits"].numpy()).mean())
    for task in ("segment_digit", "segment_larger"):
        if task not in tasks:
            continue
        pixels, digits, named = sets.canvases[task]
        ious = []
        for s in range(0, len(named), batch):
            sl = slice(s, s + batch)
            part = build_rows(model, task, test, 0, None, index=(pixels[sl], digits[sl], named[sl]))
            result = task_outputs(model, [task], [part])[0]
            ious.append(iou(result["mask_logits"] > 0, result["mask"]))
        ious = torch.cat(ious)
        out[f"{task}_miou"] = ious.mean().item()
        # IoU > 0.5, strictly: the two halves are 64 pixels each, so the whole canvas (or any mask covering the named
        # half and as much of the other) has IoU exactly 0.5 and must not count as a hit
        out[f"{task}_p50"] = (ious > 0.5).float().mean().item()
        out[f"{task}_p50_incl"] = (ious >= 0.5).float().mean().item()  # IoU >= 0.5, which counts the whole canvas
    model.train()
    return out


def headline(metrics: dict[str, float], task: str) -> float:
    """The metric with the target: accuracy for caption / draw, P@0.5 for segmentation."""
    return metrics[f"{task}_accuracy"] if task in ("caption", "draw") else metrics[f"{task}_p50"]
