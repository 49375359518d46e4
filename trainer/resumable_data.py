"""A training DataLoader whose order survives a restart: `--resume` continues with the very next batch.

Lightning restarts a plain DataLoader from the beginning of the epoch after a mid-epoch resume, so the
resumed run would see different batches than an uninterrupted one. Here the order of epoch e is a fixed
permutation drawn from (seed, e), and the loader counts the batches it has handed out; Lightning stores
that count in the checkpoint (`state_dict`) and gives it back before iterating again (`load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def derived_seed(*values: int) -> int:
    """A seed that is a fixed function of non-negative integers (numpy's SeedSequence hash), e.g. of
    (seed, epoch): independent streams without a global RNG whose state would have to be saved."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


class EpochOrder(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), this rank's share of it, and from
    batch `start_batch` on. Every rank gets the same number of full batches (the remainder is dropped)."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.batches_per_epoch = dataset_size // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {dataset_size} pairs, fewer than one batch of {batch_size} for each "
                             f"of {world_size} device(s)")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator)
        mine = order[self.rank::self.world_size][: len(self)]
        return iter(mine[self.start_batch * self.batch_size:].tolist())


class ResumableDataLoader(DataLoader):
    """A shuffling DataLoader (full batches only) that remembers its place: (epoch, batches handed out).

    The dataset's `set_epoch(epoch)` is called before each epoch when it has one (seeded augmentation).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 **loader_options: Any):
        self.order = EpochOrder(len(dataset), batch_size, seed, rank, world_size)
        super().__init__(dataset, batch_size=batch_size, sampler=self.order, drop_last=True, **loader_options)

    def __iter__(self) -> Iterator[Any]:
        order = self.order
        # Lightning ends an epoch after len(self) batches without exhausting the iterator: the next
        # iteration starts the next epoch.
        if order.start_batch >= order.batches_per_epoch:
            order.epoch, order.start_batch = order.epoch + 1, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(order.epoch)
        for batch in super().__iter__():
            # Counted as handed out before the training step runs: a checkpoint written after this step
            # resumes with the next batch.
            order.start_batch += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: {"epoch": e, "batch": batches of epoch e handed out}."""
        return {"epoch": self.order.epoch, "batch": self.order.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.epoch, self.order.start_batch = int(state["epoch"]), int(state["batch"])


class ResumableDataModule(L.LightningDataModule):
    """Serves a Dataset through a `ResumableDataLoader`; the loader is made once Lightning knows this
    process's rank and the number of processes (each takes its own share of every epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, **loader_options: Any):
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.loader_options = loader_options

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(self.dataset, self.batch_size, self.seed, rank=self.trainer.global_rank,
                                   world_size=self.trainer.world_size, **self.loader_options)
