"""Run under torchrun: each rank takes its share of one global batch and saves its prototypes."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ppc_core.losses.ppc import PPCConfig, PPCLoss


def global_batch(b: int = 8, c: int = 20, d: int = 16, hw: int = 8):
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(b, c + 1, hw, hw, generator=g)
    feats = torch.randn(b, d, hw, hw, generator=g).relu()
    labels = (torch.rand(b, c, generator=g) < 0.2).float()
    labels[:, 5] = 1
    return cam, feats, labels


if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    cam, feats, labels = global_batch()
    share = cam.shape[0] // acc.num_processes
    rows = slice(acc.process_index * share, (acc.process_index + 1) * share)
    _, proto = PPCLoss(PPCConfig(), gather=acc.gather).prototypes(cam[rows], feats[rows], labels[rows])
    torch.save(proto, Path(sys.argv[1]) / f"proto_{acc.process_index}.pt")
    acc.end_training()  # tears the gloo group down; leaving it to exit can abort the process
