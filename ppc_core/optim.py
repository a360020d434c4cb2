"""The optimiser over the model's four parameter groups."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def build_optimizer(
    groups: list[dict],
    name: str,
    lr: float,
    momentum: float = 0.9,
    lr_mults: Sequence[float] = (1.0, 2.0, 10.0, 20.0),
) -> torch.optim.Optimizer:
    """groups: `CAMNet.param_groups(...)` (backbone weights / biases, new weights / biases).

    lr_mults replace the groups' LR multipliers (the reference's 1/2/10/20 suit a pretrained
    backbone; a network trained from scratch learns better with one rate everywhere).
    name: "sgd" (the reference) or "adamw" (much faster from scratch on the bundled data).
    """
    if len(lr_mults) != len(groups):
        raise ValueError(f"lr_mults needs one multiplier per group ({len(groups)}), got {list(lr_mults)}")
    groups = [{**g, "lr_mult": float(m)} for g, m in zip(groups, lr_mults, strict=True)]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer name must be 'sgd' or 'adamw', got {name!r}")
