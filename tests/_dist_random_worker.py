"""Run under torchrun: what each rank's loader draws per micro-step, fresh and resumed.

Saves draws_<rank>.pt: {"fresh": (6, share, 2) augmentation draws of micro-steps 0..5 loaded in
the main process, "resumed": the same from micro-step 3 on, loaded by 2 DataLoader workers,
"sampling": (6, 3) draws of PPC's sampling generator}.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from ppc_core.data.sampler import step_batches
from ppc_core.seeding import step_seeds

SEED, BATCH, STEPS = 5, 4, 6


class RandomParams(Dataset):
    """An item is the random parameters its augmentation would draw (two uniforms), plus its
    index: what a rank drew is visible in the batch."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        return {"draw": torch.rand(2), "index": index}


def draws(acc: Accelerator, start: int, num_workers: int) -> torch.Tensor:
    batches = step_batches(RandomParams(), BATCH, SEED, start, acc.process_index,
                           acc.num_processes, num_workers)
    return torch.stack([next(batches)["draw"] for _ in range(start, STEPS)])


if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    sampling = torch.stack([
        torch.rand(3, generator=torch.Generator().manual_seed(step_seeds(SEED, m, 0, rank)[1]))
        for m in range(STEPS)])
    torch.save({"fresh": draws(acc, 0, 0), "resumed": draws(acc, 3, 2), "sampling": sampling},
               Path(sys.argv[1]) / f"draws_{rank}.pt")
    acc.wait_for_everyone()
    acc.end_training()
