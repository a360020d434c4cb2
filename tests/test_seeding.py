import torch

from ppc_core.data.sampler import step_batches
from ppc_core.seeding import step_seeds
from tests._dist_random_worker import RandomParams


def test_rank_zero_keeps_the_single_process_seeds():
    # the values every single-process run (and tests/test_train.py's pinned losses) used
    for seed, step, micro, accum in [(0, 0, 0, 1), (3, 7, 1, 2), (11, 1000, 3, 4)]:
        index = step * accum + micro
        assert step_seeds(seed, step, micro, 0, accum) == (seed * 1_000_003 + index,
                                                            seed * 7919 + index)


def test_seeds_differ_by_rank_and_repeat_for_the_same_arguments():
    seeds = {(step, rank): step_seeds(3, step, 0, rank) for step in range(50) for rank in range(8)}
    flat = [s for pair in seeds.values() for s in pair]
    assert len(set(flat)) == len(flat)  # no rank replays another rank's (or step's) stream
    assert all(0 <= s < 2**64 for s in flat)  # torch.manual_seed's range
    assert step_seeds(3, 9, 0, 5) == seeds[(9, 5)]
    assert step_seeds(3, 4, 1, 2, grad_accum=2) == step_seeds(3, 9, 0, 2)  # micro-step 9 either way


def _draws(start: int, stop: int, rank: int = 0, workers: int = 0) -> torch.Tensor:
    batches = step_batches(RandomParams(), 4, 5, start, rank, 2, workers)
    return torch.stack([next(batches)["draw"] for _ in range(start, stop)])


def test_augmentation_is_a_function_of_seed_step_and_rank_wherever_it_is_loaded():
    fresh = _draws(0, 5)
    torch.manual_seed(123)  # the caller's RNG state does not matter
    torch.testing.assert_close(_draws(2, 5), fresh[2:], rtol=0, atol=0)
    # DataLoader workers draw what the main process draws
    torch.testing.assert_close(_draws(0, 5, workers=2), fresh, rtol=0, atol=0)
    assert not torch.equal(_draws(0, 5, rank=1), fresh)
