"""A training DataLoader whose order survives a restart: `--resume` continues with the very next batch.

Lightning restarts a plain DataLoader from the beginning of the epoch after a mid-epoch resume, so the
resumed run would see different batches than an uninterrupted one. Here the order of epoch e is a fixed
permutation drawn from (seed, e), and the loader counts the batches it has handed out; Lightning stores
that count in the checkpoint (`state_dict`) and gives it back before iterating again (`load_state_dict`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from dataset import DatasetError


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


class _CollateWithSkips:
    """collate_fn that sends the dataset's unreadable-pair records (`take_skipped`) back with the batch:
    it runs where the items were read, also in a DataLoader worker, whose records the main process never
    sees otherwise."""

    def __init__(self, dataset: Dataset, collate: Callable[[list[Any]], Any]):
        self.dataset, self.collate = dataset, collate

    def __call__(self, items: list[Any]) -> tuple[Any, list[tuple[int, str]]]:
        return self.collate(items), self.dataset.take_skipped()


def _without_worker_traceback(err: DatasetError) -> DatasetError:
    """torch re-raises a worker's exception with the worker's traceback as its message; keep the
    original message (its last line, after the exception's name)."""
    message = str(err)
    if "DataLoader worker" in message.split("\n", 1)[0]:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return DatasetError(message)


class ResumableDataLoader(DataLoader):
    """A shuffling DataLoader (full batches only) that remembers its place: (epoch, batches handed out).

    The dataset's `set_epoch(epoch)` is called before each epoch when it has one (seeded augmentation).
    A dataset with `take_skipped` (dataset.ControlDataset) stands in the next readable pair for one that
    cannot be read; the loader prints one warning per such pair, in the main process, and keeps them in
    `skipped_pairs` ({index: "SOURCE + TARGET: reason"}).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 **loader_options: Any):
        self.order = EpochOrder(len(dataset), batch_size, seed, rank, world_size)
        self.skipped_pairs: dict[int, str] = {}
        self._reports_skips = hasattr(dataset, "take_skipped")
        if self._reports_skips:
            loader_options["collate_fn"] = _CollateWithSkips(
                dataset, loader_options.get("collate_fn") or default_collate)
        super().__init__(dataset, batch_size=batch_size, sampler=self.order, drop_last=True, **loader_options)

    def _batches(self) -> Iterator[Any]:
        """The DataLoader's batches, with the skip records taken off and reported."""
        try:
            for batch in super().__iter__():
                if self._reports_skips:
                    batch, skipped = batch
                    self._report(skipped)
                yield batch
        except DatasetError as err:
            raise _without_worker_traceback(err) from None

    def _report(self, skipped: list[tuple[int, str]]) -> None:
        for index, reason in skipped:
            # Workers are started again each epoch and find the same pairs again: warn once.
            if index not in self.skipped_pairs:
                self.skipped_pairs[index] = reason
                tqdm.write(f"warning: skipped unreadable pair {reason}; using the next readable pair instead",
                           file=sys.stderr)

    def __iter__(self) -> Iterator[Any]:
        order = self.order
        # Lightning ends an epoch after len(self) batches without exhausting the iterator: the next
        # iteration starts the next epoch.
        if order.start_batch >= order.batches_per_epoch:
            order.epoch, order.start_batch = order.epoch + 1, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(order.epoch)
        for batch in self._batches():
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
        self.loader = ResumableDataLoader(self.dataset, self.batch_size, self.seed, rank=self.trainer.global_rank,
                                          world_size=self.trainer.world_size, **self.loader_options)
        return self.loader

    @property
    def skipped_pairs(self) -> dict[int, str]:
        """The unreadable pairs this process skipped so far (see ResumableDataLoader)."""
        loader = getattr(self, "loader", None)
        return loader.skipped_pairs if loader is not None else {}
