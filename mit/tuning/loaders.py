"""The data of a run: its datasets, each process's shard of a seeded per-epoch order cut into micro-batches, and the
data loaders over them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .config import RunConfig


def build_datasets(config: RunConfig, preprocessing: Any, splits: tuple[str, ...]) -> list:
    """The datasets of ``splits``; with two splits the first one is the training split (``limit_train``).
    ``preprocessing``: the image encoder's :class:`~mit.tuning.image_preprocessing.ImagePreprocessing`, or None."""
    dataset = config.spec.dataset(config.data.dataset)
    out = []
    for i, split in enumerate(splits):
        limit = config.data.limit_train if i == 0 and len(splits) == 2 else config.data.limit_eval
        out.append(dataset.build(config.data, split, preprocessing, limit))
    return out


def shard(indices: list[int], rank: int, world: int, pad: bool) -> list[int]:
    """Process ``rank``'s share of ``indices`` (every ``world``-th); with ``pad`` the list is first padded by
    repeating its start so that every process gets as many."""
    if pad and len(indices) % world:
        indices = indices + indices[: world - len(indices) % world]
    return indices[rank::world]


def epoch_batches(
    dataset: Dataset,
    seed: int,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    order: Callable[[Dataset, list[int]], list[int]] | None = None,
) -> list[list[int]]:
    """Process ``rank``'s micro-batches of ``epoch``: a permutation of ``dataset`` seeded by ``seed + epoch``, sharded
    by rank (padded: as many batches on every process), rearranged by the task's ``order`` if any, cut into lists of
    ``batch_size`` indices."""
    generator = torch.Generator().manual_seed(seed + epoch)
    permutation = torch.randperm(len(dataset), generator=generator).tolist()
    mine = shard(permutation, rank, world, pad=True)
    if order is not None:  # e.g. tasks mixed equally in every batch
        mine = order(dataset, mine)
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_loader(
    dataset: Dataset, batches: list[list[int]], collate: Callable[[list[Any]], Any], seed: int, num_workers: int = 0
) -> DataLoader:
    """A DataLoader over the given index ``batches``. It has its own generator seeded by ``seed``: creating the
    iterator would otherwise draw a seed from the global RNG, which must stay where a checkpoint left it for an exact
    resume."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers, generator=generator)


__all__ = ["build_datasets", "epoch_batches", "make_loader", "shard"]
