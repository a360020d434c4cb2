"""Schedules as pure functions of the optimiser step."""

from __future__ import annotations


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """The reference's poly schedule: base_lr * (1 - step / total_steps) ** power."""
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** power


def ppc_ramp(step: int, start: int, ramp_steps: int) -> float:
    """PPC weight multiplier: 0 before `start`, then linear to 1 over `ramp_steps` steps."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / ramp_steps)
