"""The seeds of one micro-step: pure functions of (seed, step, micro-step, rank).

Everything random in a training step draws from these (augmentation, in the main process or a
DataLoader worker, and PPC's hard-pixel sampling), so a resumed run replays an uninterrupted
one exactly, and data-parallel processes draw different augmentations and samples instead of
N copies of one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["micro_index", "step_seeds"]


def micro_index(step: int, micro: int, grad_accum: int) -> int:
    """The global micro-step number of micro-step `micro` (0-based) of optimiser step `step`."""
    return step * grad_accum + micro


def _for_rank(value: int, rank: int) -> int:
    # A hash, not an offset: rank r's stream must not replay rank 0's at another step.
    state = np.random.SeedSequence([value % 2**64, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def step_seeds(
    seed: int, step: int, micro: int = 0, rank: int = 0, grad_accum: int = 1
) -> tuple[int, int]:
    """(augment_seed, sampling_seed) of one micro-step on process `rank`.

    augment_seed seeds the global torch RNG before a batch is loaded (crop, flip, jitter);
    sampling_seed seeds the generator PPC samples hard pixels with. Rank 0 gets the seeds one
    process has always used (so a single-process run, and its pinned values, do not depend on
    this function knowing about ranks); every other rank gets a hash of them and its rank.
    """
    if rank < 0:
        raise ValueError(f"step_seeds: rank must be >= 0, got {rank}")
    index = micro_index(step, micro, grad_accum)
    augment, sampling = seed * 1_000_003 + index, seed * 7919 + index
    if rank == 0:
        return augment, sampling
    return _for_rank(augment, rank), _for_rank(sampling, rank)
