"""``multitask``: neural tuning's four MMUD tasks served by one adapter (captioning, referring segmentation, reasoning
segmentation, text-to-image embedding regression).

Every MMUD record gives one sample of each task (:class:`MultiTaskDataset`: index ``i`` is record ``i // 4``, task
``TASKS[i % 4]``); training batches interleave the tasks round-robin (:func:`order`), so a batch of ``4n`` samples
holds ``n`` of each. The model never receives a task id: the prompt alone selects the neurons. Each sample is a
prompt (CLIP patch tokens, then the question) and a teacher-forced answer ending with EOS:

- caption: "Describe the scene in this image." -> the caption (LM loss);
- refseg: "Please segment <object texts> from the image." -> "The segmented object is <LCL-1>, <LCL-2>." (up to 5
  objects, each with its first description); the final hidden state at each ``<LCL-i>`` conditions
  :class:`~mit.tuning.heads_neural.FiLMMaskDecoder` over CLIP's multi-level features (Dice loss);
- reasonseg: MMUD's ``enriched_text`` as the authors' code splits it: the ``<LCL-i>`` tags are removed from the text,
  the question is the part before ``<SEP>``, the answer the part after it followed by `` <LCL-1> <LCL-2> ...`` (one
  per distinct tag, in order of first mention, at most 5); tag ``j`` conditions the decoder for the mask of the
  object the j-th distinct tag named (the authors' code appends one mask per tag occurrence, which misaligns masks
  and tokens when a tag repeats);
- t2i: "Generate an image based on the following description. <caption>" -> "<GLB>"; the ``<GLB>`` state goes through
  :class:`~mit.tuning.heads_neural.EmbeddingRegressor` onto the image's CLIP embedding (cosine + MSE,
  :func:`mit.tuning.losses.embedding_regression_loss`).

The LM loss covers every task's answer tokens (so the model also learns to emit ``<LCL-i>`` and ``<GLB>``); the loss is
``lm_weight * LM + mask_weight * Dice + glb_weight * regression``. The authors draw templates at random from lists;
here each task has one fixed template (deterministic data).

Evaluation is teacher-forced: caption exact match is "the argmax at every answer position is the answer token",
which is exactly "greedy decoding reproduces the caption (and stops)"; masks and ``<GLB>`` regressions read the states
at the reference answer's task tokens. Metrics: ``caption_exact``, ``caption_token_acc``, ``refseg_mIoU`` /
``refseg_oIoU`` / ``refseg_P@0.5`` (and the same for ``reasonseg``, per mask at the model's input resolution),
``t2i_cosine``; ``score`` (the selection metric) is the mean of ``caption_exact``, both mIoUs and ``t2i_cosine``:
one adapter serves all tasks, so "better" weighs every task equally.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ...integrations import decoder_of
from ...neural import TASK_TOKENS
from ...utils.settings import setting, validate
from ..heads_neural import EmbeddingRegressor, FiLMMaskDecoder
from ..losses import dice_loss, embedding_regression_loss
from ..metrics import intersection_union, segmentation_metrics
from .registry import DatasetSpec, TaskSpec


@dataclasses.dataclass
class MultiTaskHeads:
    """The head settings and loss weights of ``multitask`` (section ``heads``)."""

    decoder_hidden: int = setting(256, help="mask decoder channels", metavar="N", low=1)
    glb_hidden: int = setting(1024, help="<GLB> regressor hidden size (reference: 1024)", metavar="N", low=1)
    dropout: float = setting(0.1, help="dropout in the trainable heads", metavar="P", low=0, high=1, high_open=True)
    lm_weight: float = setting(1.0, help="weight of the LM loss on the answers", metavar="W", low=0)
    mask_weight: float = setting(1.0, help="weight of the Dice loss of the masks", metavar="W", low=0)
    glb_weight: float = setting(1.0, help="weight of the <GLB> loss (1 - cosine + MSE)", metavar="W", low=0)

    def __post_init__(self) -> None:
        validate(self)


TASKS = ("caption", "refseg", "reasonseg", "t2i")
SEGMENTATION_TASKS = ("refseg", "reasonseg")
LCL_TOKENS = tuple(t for t in TASK_TOKENS if t.startswith("<LCL-"))
GLB_TOKEN = "<GLB>"
TEMPLATE = "Write a response that appropriately completes the request. ##Request: {}\n##Response: "
CAPTION_PROMPT = "Describe the scene in this image."
SEGMENT_PROMPT = "Please segment {} from the image."
SEGMENT_ANSWER = "The segmented object is {}."
GENERATION_PROMPT = "Generate an image based on the following description. {}"
_TAG = re.compile(r"<LCL-(\d{1,2})>")


def reasoning_sample(enriched_text: str) -> tuple[str, str, list[int]]:
    """(question, answer, 0-based object indices) from MMUD's ``enriched_text`` (see the module docstring)."""
    tags = _TAG.findall(enriched_text)
    distinct = list(dict.fromkeys(int(t) for t in tags))[: len(LCL_TOKENS)]
    text = enriched_text.replace("##Question:", "").replace("\n##Answer:", "").replace("##Answer:", "")
    text = _TAG.sub("", text)
    if "<SEP>" not in text:
        raise ValueError(f"enriched_text: expected '##Question: ... <SEP> answer', got {enriched_text[:80]!r}")
    question, answer = text.split("<SEP>", 1)
    answer = answer.strip() + "".join(f" {LCL_TOKENS[j]}" for j in range(len(distinct)))
    return question.strip(), answer.strip(), [k - 1 for k in distinct]


def task_sample(record: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's sample of an :class:`~mit.tuning.data.MMUDDataset` item: prompt, answer, masks, ``<GLB>`` target."""
    size = record["image"].shape[-1]
    no_masks = torch.zeros(0, size, size)
    sample = {"id": f"{record['id']}/{task}", "task": task, "image": record["image"], "masks": no_masks}
    sample["glb_target"] = None
    if task == "caption":
        sample.update(prompt=TEMPLATE.format(CAPTION_PROMPT), answer=record["caption"])
    elif task == "t2i":
        sample.update(prompt=TEMPLATE.format(GENERATION_PROMPT.format(record["caption"])), answer=GLB_TOKEN)
        sample["glb_target"] = record["glb_target"]
    elif task == "refseg":
        count = min(len(record["object_texts"]), len(LCL_TOKENS))
        objects = ", ".join(record["object_texts"][k][0] for k in range(count))
        tokens = ", ".join(LCL_TOKENS[:count])
        sample.update(prompt=TEMPLATE.format(SEGMENT_PROMPT.format(objects)), answer=SEGMENT_ANSWER.format(tokens))
        sample["masks"] = record["masks"][:count]
    elif task == "reasonseg":
        question, answer, objects = reasoning_sample(record["enriched_text"])
        bad = [k for k in objects if not 0 <= k < len(record["masks"])]
        if bad:
            raise ValueError(
                f"enriched_text of {record['id']}: tags <LCL-{bad[0] + 1}> name objects beyond the record's "
                f"{len(record['masks'])} masks"
            )
        sample.update(prompt=TEMPLATE.format(question), answer=answer)
        sample["masks"] = record["masks"][objects] if objects else no_masks
    else:
        raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
    return sample


class MultiTaskDataset(Dataset):
    """Item ``i``: task ``TASKS[i % 4]`` of record ``i // 4`` of ``records`` (an MMUD dataset)."""

    def __init__(self, records: Dataset) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(TASKS) * len(self.records)

    def task_of(self, index: int) -> str:
        return TASKS[index % len(TASKS)]

    @property
    def glb_dim(self) -> int:
        """Size of the ``<GLB>`` target embedding (from the first record)."""
        return int(self.records[0]["glb_target"].numel())

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return task_sample(self.records[index // len(TASKS)], self.task_of(index))


def order(dataset: MultiTaskDataset, indices: list[int]) -> list[int]:
    """Round-robin over the tasks, each task's indices in their given (shuffled) order: caption, refseg, reasonseg,
    t2i, caption, ... until a task runs out (then the others continue)."""
    by_task: dict[str, list[int]] = {t: [] for t in TASKS}
    for i in indices:
        by_task[dataset.task_of(i)].append(i)
    out = []
    for row in range(max(len(v) for v in by_task.values()) if indices else 0):
        out += [v[row] for v in by_task.values() if row < len(v)]
    return out


def encode(tokenizer, items: list[dict[str, Any]], padding_side: str, max_length: int | None) -> dict[str, Any]:
    """``input_ids`` / ``attention_mask`` (B, L) of prompt + answer + EOS, and ``labels`` (B, L): the answer and EOS
    tokens, -100 elsewhere. Only the prompt is shortened (its end kept) to fit ``max_length``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    rows = []
    for x in items:
        question = tokenizer(x["prompt"])["input_ids"]
        answer = tokenizer(x["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if max_length is not None:
            if len(answer) >= max_length:
                raise ValueError(
                    f"max_length: the answer of {x['id']} has {len(answer)} tokens, expected fewer than --max-length "
                    f"{max_length} (raise --max-length)"
                )
            excess = len(question) + len(answer) - max_length
            if excess > 0:
                question = question[excess:]
        rows.append((question, answer))
    length = max(len(q) + len(a) for q, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for b, (q, a) in enumerate(rows):
        n = len(q) + len(a)
        start = length - n if padding_side == "left" else 0
        input_ids[b, start : start + n] = torch.tensor(q + a)
        mask[b, start : start + n] = 1
        labels[b, start + len(q) : start + n] = torch.tensor(a)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``image`` (B, 3, S, S); ``masks`` (M, S, S) of all samples in order with ``mask_sample`` (M,) their rows;
    ``glb_target`` (G, D) of the t2i samples with ``glb_sample`` (G,); ``task`` (for the metrics only)."""
    glb = [(b, x["glb_target"]) for b, x in enumerate(items) if x["glb_target"] is not None]
    # (B,) has_image: False for text-to-image prompts
    out = {
        "image": torch.stack([x["image"] for x in items]),
        "masks": torch.cat([x["masks"] for x in items]),
        "mask_sample": torch.tensor([b for b, x in enumerate(items) for _ in range(len(x["masks"]))], dtype=torch.long),
        "glb_sample": torch.tensor([b for b, _ in glb], dtype=torch.long),
        "task": [x["task"] for x in items],
        # text-to-image prompts carry no image (as in the reference): the <GLB> target is that image's embedding
        "has_image": torch.tensor([x["task"] != "t2i" for x in items], dtype=torch.bool),
    }
    if glb:
        out["glb_target"] = torch.stack([t for _, t in glb])
    return out


class NeuralMultiTaskModel(nn.Module):
    """The neural-tuned causal LM (``llm``), the frozen CLIP ``encoder``, and the trainable heads ``mask_decoder`` and
    ``glb_head``. ``forward(batch)`` -> ``{"loss", "answer_predictions" (B, L): the argmax next-token prediction for
    each prompt position, "mask_logits" (M, S, S), "glb_prediction" (G, D)}``."""

    def __init__(self, llm, encoder, mask_decoder, glb_head, token_ids: dict[str, int], heads) -> None:
        super().__init__()
        self.llm, self.encoder, self.mask_decoder, self.glb_head = llm, encoder, mask_decoder, glb_head
        self.register_buffer("lcl_ids", torch.tensor([token_ids[t] for t in LCL_TOKENS]), persistent=False)
        self.glb_id = token_ids[GLB_TOKEN]
        if not isinstance(getattr(decoder_of(llm), "norm", None), nn.Module):
            raise ValueError(f"llm: expected a decoder with a final norm module, got {type(decoder_of(llm)).__name__}")
        self.weights = (heads.lm_weight, heads.mask_weight, heads.glb_weight)

    def train(self, mode: bool = True) -> NeuralMultiTaskModel:
        super().train(mode)
        self.llm.eval()  # the frozen base: no dropout; the neurons follow ``mode`` (sparsity jitter, dropout)
        for name, module in self.llm.named_modules():
            if name.split(".")[-1].startswith("nt_"):
                module.train(mode)
        return self

    def _states(self, hidden: torch.Tensor, where: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = where.nonzero(as_tuple=True)  # row-major: by sample, then position
        return rows, hidden[rows, cols + offset]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        features = self.encoder(images)
        patches = features.patches
        final: list[torch.Tensor] = []  # the decoder's final norm output: the last hidden states (B, P + L, hidden)
        hook = decoder_of(self.llm).norm.register_forward_hook(lambda module, args, output: final.append(output))
        try:
            out = self.llm(
                input_ids=ids,
                attention_mask=mask,
                image_features=patches,
                image_mask=batch["has_image"],
                labels=batch.get("labels"),
                use_cache=False,
            )
        finally:
            hook.remove()
        hidden, p, length = final[-1], patches.shape[1], ids.shape[1]
        result = {"answer_predictions": out.logits[:, p - 1 : p - 1 + length].argmax(-1)}
        losses = []
        if out.loss is not None:
            losses.append(self.weights[0] * out.loss)
        real = mask.bool()
        rows, states = self._states(hidden, torch.isin(ids, self.lcl_ids) & real, p)
        if rows.shape != batch["mask_sample"].shape or not torch.equal(rows, batch["mask_sample"]):
            raise ValueError(
                f"batch: the prompts hold {len(rows)} <LCL-i> tokens for {len(batch['mask_sample'])} masks (an answer "
                "cut short, or an <LCL-i> in a question?)"
            )
        if len(rows):
            levels = [level[rows] for level in features.levels]
            result["mask_logits"] = self.mask_decoder(states, levels, images.shape[-2:])
            if "masks" in batch:
                losses.append(self.weights[1] * dice_loss(result["mask_logits"], batch["masks"]))
        rows, states = self._states(hidden, (ids == self.glb_id) & real, p)
        if not torch.equal(rows, batch["glb_sample"]):
            raise ValueError(f"batch: {len(rows)} <GLB> tokens for {len(batch['glb_sample'])} text-to-image targets")
        if len(rows):
            result["glb_prediction"] = self.glb_head(states)
            if "glb_target" in batch:
                regression = embedding_regression_loss(result["glb_prediction"], batch["glb_target"])
                losses.append(self.weights[2] * regression)
        if losses:
            result["loss"] = torch.stack([x.float() for x in losses]).sum()
        return result


def build_model(llm, neural_config, encoder, dataset, heads: MultiTaskHeads) -> NeuralMultiTaskModel:
    ids = dict(zip(neural_config.new_tokens, llm.nt_new_token_ids))
    missing = [t for t in TASK_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"new_tokens: the multitask heads need {list(TASK_TOKENS)}, missing {missing}")
    hidden = llm.config.hidden_size
    decoder = FiLMMaskDecoder(hidden, encoder.width, len(encoder.feature_layers), heads.decoder_hidden)
    glb_head = EmbeddingRegressor(hidden, dataset.glb_dim, heads.glb_hidden, heads.dropout)
    return NeuralMultiTaskModel(llm, encoder, decoder, glb_head, ids, heads)


def records(batch: dict[str, Any], out: dict[str, torch.Tensor]) -> list[tuple]:
    """Per caption sample ``("caption", exact, correct tokens, answer tokens)``; per mask ``(task, intersection,
    union)``; per t2i sample ``("t2i", cosine)``."""
    rows: list[tuple] = []
    labels, predictions = batch["labels"].cpu(), out["answer_predictions"].cpu()
    for b, task in enumerate(batch["task"]):
        if task == "caption":
            answer = labels[b] != -100
            correct = int((predictions[b][answer] == labels[b][answer]).sum())
            total = int(answer.sum())
            rows.append(("caption", correct == total, correct, total))
    if "mask_logits" in out:
        inter, union = intersection_union(out["mask_logits"].cpu() > 0, batch["masks"].cpu() > 0.5)
        for m, b in enumerate(batch["mask_sample"].tolist()):
            rows.append((batch["task"][b], int(inter[m]), int(union[m])))
    if "glb_prediction" in out:
        cosine = torch.nn.functional.cosine_similarity(
            out["glb_prediction"].float().cpu(), batch["glb_target"].float().cpu(), dim=-1
        )
        rows += [("t2i", float(c)) for c in cosine]
    return rows


def metrics(rows: list[tuple]) -> dict[str, float]:
    """The per-task metrics and ``score`` (see the module docstring); a task without records gives NaN."""
    nan = float("nan")
    captions = [r for r in rows if r[0] == "caption"]
    out = {
        "caption_exact": float(np.mean([r[1] for r in captions])) if captions else nan,
        "caption_token_acc": sum(r[2] for r in captions) / max(sum(r[3] for r in captions), 1) if captions else nan,
    }
    for task in SEGMENTATION_TASKS:
        masks = [r for r in rows if r[0] == task]
        seg = segmentation_metrics([r[1] for r in masks], [r[2] for r in masks]) if masks else {}
        for name in ("mIoU", "oIoU", "P@0.5"):
            out[f"{task}_{name}"] = seg.get(name, nan)
    cosines = [r[1] for r in rows if r[0] == "t2i"]
    out["t2i_cosine"] = float(np.mean(cosines)) if cosines else nan
    parts = [out["caption_exact"], out["refseg_mIoU"], out["reasonseg_mIoU"], out["t2i_cosine"]]
    out["score"] = float(np.mean(parts))
    return out


def _build(data, split, preprocessing, limit):
    from ..data import MMUDDataset

    return MultiTaskDataset(
        MMUDDataset(data.root, split, preprocessing.size, data.image_dir, limit=limit, preprocessing=preprocessing)
    )


SPEC = TaskSpec(
    name="multitask",
    description="neural tuning: captioning + referring / reasoning segmentation + text-to-image, one adapter",
    datasets=(DatasetSpec("mmud", ("train", "valid"), _build),),
    selection_metric="score",
    higher_is_better=True,
    uses_image_encoder=True,
    build_model=build_model,
    head_settings=MultiTaskHeads,
    collate=collate,
    records=records,
    metrics=metrics,
    method="neural",
    causal_lm=True,
    encode=encode,
    order=order,
)
