"""A toy task, written as a user adding a task would: one module building a TaskSpec (registered by the test).

Each sample is a prompt "item <i>" with a fixed random modality vector; the label is the sign of the vector's first
coordinate, so the infused embedding carries the answer and MiT + a linear head can learn it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mit.tuning.tasks import DatasetSpec, TaskModel, TaskSpec


class ToyDataset(Dataset):
    def __init__(self, size: int, dim: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vectors = torch.randn(size, dim, generator=generator)

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vector = self.vectors[i]
        return {"prompt": f"item {i}", "id": str(i), "vector": vector, "label": int(vector[0] > 0)}


class ToyModel(TaskModel):
    def __init__(self, llm, classes: int) -> None:
        super().__init__(llm)
        self.head = nn.Linear(llm.config.hidden_size, classes)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.head(self.task_embedding(batch, batch["vector"]))
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = nn.functional.cross_entropy(logits, batch["label"])
        return out


def build_dataset(data, split, image_size, limit):
    return ToyDataset(limit or 8, 16, seed={"train": 0, "test": 1}[split])


SPEC = TaskSpec(
    name="toy",
    description="toy classification of infused vectors",
    datasets=(DatasetSpec("toyset", ("train", "test"), build_dataset),),
    selection_metric="accuracy",
    higher_is_better=True,
    uses_image_encoder=False,
    build_model=lambda llm, mit_config, encoder, dataset, heads: ToyModel(llm, 2),
    collate=lambda items: {
        "vector": torch.stack([x["vector"] for x in items]),
        "label": torch.tensor([x["label"] for x in items]),
    },
    records=lambda batch, out: list(zip(out["logits"].argmax(-1).tolist(), batch["label"].tolist())),
    metrics=lambda rows: {"accuracy": sum(p == y for p, y in rows) / len(rows)},
)
