"""Deterministic, resumable batches: the batch of micro-step m and its augmentation are
functions of (seed, m, rank), wherever it is loaded (main process or DataLoader worker)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ppc_core.seeding import step_seeds


class StepBatchSampler(Sampler[list[int]]):
    """Endless shuffled batches, each epoch a fresh permutation seeded by (seed, epoch).

    A resumed run starts at `start` (a micro-step) and sees exactly the batches an uninterrupted
    run would. With several processes, `batch_size` is the global batch and process `rank` takes
    its contiguous share, so N processes together see what one process would see alone.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_items < batch_size:
            raise ValueError(
                f"the data set has {num_items} items, fewer than batch_size={batch_size}"
            )
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the number of processes ({world_size})"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.per_epoch = num_items // batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        step = self.start
        epoch, perm = None, None
        while True:
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                perm = self._permutation(epoch)
            lo = (step % self.per_epoch) * self.batch_size + self.rank * share
            yield perm[lo : lo + share].tolist()
            step += 1


class _Keyed(Sampler[list[tuple[int, int]]]):
    """A StepBatchSampler whose indices carry their micro-step: [(m, index), ...]."""

    def __init__(self, batches: StepBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for m, batch in enumerate(self.batches, start=self.batches.start):
            yield [(m, i) for i in batch]


class _SeededBatches(Dataset):
    """Loads a keyed batch after seeding torch's RNG from (seed, micro-step, rank).

    The seed travels with the indices, so a DataLoader worker (which runs ahead of the loop
    and keeps its own RNG) draws the augmentation the main process would have drawn: the
    batches do not depend on num_workers, and a resumed run draws what an uninterrupted one did.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        # step_seeds(seed, m) is micro-step m's seed whatever the accumulation (step * accum + micro)
        seed = step_seeds(self.seed, keys[0][0], rank=self.rank)[0]
        torch.manual_seed(seed)  # torchvision's transforms draw from torch
        random.seed(seed)  # and a data set's own augmentation may draw from these two
        np.random.seed(seed % 2**32)
        return [self.dataset[i] for _, i in keys]

    def __getitem__(self, key: tuple[int, int]):  # noqa: ANN204 (the wrapped data set's item)
        return self.__getitems__([key])[0]


def step_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Endless batches from micro-step `start` on: process `rank`'s share of the global batch
    (see StepBatchSampler), augmented under `step_seeds(seed, m, rank=rank)[0]`."""
    keyed = _Keyed(StepBatchSampler(len(dataset), batch_size, seed, start, rank,  # type: ignore[arg-type]
                                    world_size))
    return iter(DataLoader(_SeededBatches(dataset, seed, rank), batch_sampler=keyed,
                           num_workers=num_workers, pin_memory=pin_memory))


class EvalShard(Sampler[list[int]]):
    """Process `rank`'s share of an evaluation split: in-order batches rank, rank + W, ... of
    the split's first `max_batches` batches (all when None).

    Each image is evaluated once, by one process, in the very batch one process alone would put
    it in, so the summed confusion counts equal the one-process counts exactly.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EvalShard: need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"{batch_size}, {rank}, {world_size}")
        batches = -(-num_items // batch_size)
        if max_batches is not None:
            batches = min(batches, max_batches)
        self.num_items, self.batch_size = num_items, batch_size
        self.mine = range(rank, batches, world_size)

    def __len__(self) -> int:
        return len(self.mine)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.mine:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_items)))
