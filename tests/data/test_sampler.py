import pytest

from ppc_core.data.sampler import StepBatchSampler


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_resumed_sampler_continues_the_same_sequence():
    full = _take(StepBatchSampler(10, 4, seed=3), 7)
    assert _take(StepBatchSampler(10, 4, seed=3, start=4), 3) == full[4:]
    # each epoch (2 batches of 4 from 10 items) is a fresh permutation without repeats
    assert len(set(full[0] + full[1])) == 8
    assert full[:2] != full[2:4]


def test_ranks_split_the_global_batch():
    whole = _take(StepBatchSampler(12, 4, seed=0), 3)
    r0 = _take(StepBatchSampler(12, 4, seed=0, rank=0, world_size=2), 3)
    r1 = _take(StepBatchSampler(12, 4, seed=0, rank=1, world_size=2), 3)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == whole


def test_bad_sizes_are_clear():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        StepBatchSampler(3, 4, 0)
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(10, 3, 0, world_size=2)
