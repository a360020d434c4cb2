"""Schedules as pure functions of the optimiser step (arguments named as their config fields:
`train.steps`, `optim.lr`, `optim.poly_power`, `loss.ppc_start_step`, `loss.ppc_ramp_steps`)."""

from __future__ import annotations


def poly_lr(step: int, steps: int, lr: float, poly_power: float = 0.9) -> float:
    """The reference's poly schedule: lr * (1 - step / steps) ** poly_power."""
    return lr * (1.0 - min(step, steps) / steps) ** poly_power


def ppc_ramp(step: int, ppc_start_step: int, ppc_ramp_steps: int) -> float:
    """PPC weight multiplier: 0 before `ppc_start_step`, then linear to 1 over `ppc_ramp_steps`."""
    if step < ppc_start_step:
        return 0.0
    if ppc_ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - ppc_start_step + 1) / ppc_ramp_steps)
