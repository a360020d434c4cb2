"""Deterministic, resumable batches: the batch of micro-step m is a function of (seed, m)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
