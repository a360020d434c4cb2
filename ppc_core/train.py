"""The training loop: one readable function on Hugging Face Accelerate.

Checkpoints hold the model, optimiser and step; batches and sampling are functions of
(seed, step), so a killed run restarted with the same command ends where an uninterrupted one
would.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ppc_core.checkpoint import latest_checkpoint, save_checkpoint
from ppc_core.data.sampler import StepBatchSampler
from ppc_core.objective import Objective
from ppc_core.schedules import poly_lr, ppc_ramp

# (step, metrics) -> True to stop the run now (a sweep's pruner decided).
Reporter = Callable[[int, dict[str, float]], bool]
# model -> metrics, run on the main process only.
EvalFn = Callable[[nn.Module], dict[str, float]]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; the state before the step was saved."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the step in flight finished and a checkpoint was saved."""

    def __init__(self, signal: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by {signal} at step {step}; checkpoint {checkpoint}")
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


@contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """Collect SIGTERM / SIGINT (names, in order) instead of dying; restores the old handlers."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, lambda num, _: received.append(signal.Signals(num).name))
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Schedule:
    steps: int
    base_lr: float
    poly_power: float = 0.9
    ppc_start: int = 0
    ppc_ramp: int = 0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    last_logs: dict[str, float] = field(default_factory=dict)


class _Progress:
    """The loop position and evaluation history, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], state["history"]


def train(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    objective: Objective,
    schedule: Schedule,
    output_dir: str | Path,
    evaluate: EvalFn,
    reporter: Reporter | None = None,
    num_workers: int = 0,
    resume: bool = True,
) -> TrainResult:
    """Train `model` for `schedule.steps` optimiser steps; evaluate, report and checkpoint."""
    s, output_dir = schedule, Path(output_dir)
    progress = _Progress()
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(progress)
    if resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} at step {progress.step}")
    sampler = StepBatchSampler(len(dataset), batch_size, s.seed, progress.step * s.grad_accum,
                               accelerator.process_index, accelerator.num_processes)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers))
    bar = tqdm(total=s.steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    model.train()
    with _stop_on_signals() as received:
        return _loop(accelerator, model, optimizer, objective, s, output_dir, evaluate, reporter,
                     progress, batches, bar, received)


def _loop(accelerator, model, optimizer, objective, s, output_dir, evaluate, reporter, progress,
          batches, bar, received) -> TrainResult:
    stop, seen, tic, logs = False, 0, time.perf_counter(), {}
    while progress.step < s.steps and not stop:
        step = progress.step
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(step, s.steps, s.base_lr, s.poly_power) * group["lr_mult"]
        scale = ppc_ramp(step, s.ppc_start, s.ppc_ramp)
        for micro in range(s.grad_accum):
            # Seeding by step makes augmentation and PPC's sampling independent of resumption.
            torch.manual_seed(s.seed * 1_000_003 + step * s.grad_accum + micro)
            batch = next(batches)
            images = batch["image"].to(accelerator.device)
            labels = batch["label"].to(accelerator.device)
            gen = torch.Generator().manual_seed(s.seed * 7919 + step * s.grad_accum + micro)
            with accelerator.accumulate(model):
                terms = objective(model, images, labels, scale, gen)
                loss = sum(terms.values())
                total = accelerator.reduce(loss.detach(), "mean")
                if not torch.isfinite(total):
                    path = save_checkpoint(accelerator, output_dir, step)
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    raise NonFiniteLoss(f"non-finite loss at step {step}: {values}; "
                                        f"state before the step saved to {path}")
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            seen += images.shape[0] * accelerator.num_processes
        progress.step = step = step + 1
        bar.update(1)

        if step % s.log_every == 0 or step == s.steps:
            logs = {f"loss/{k}": float(accelerator.reduce(v.detach(), "mean")) for k, v in terms.items()}
            logs["loss/total"] = float(total)
            logs["lr"] = optimizer.param_groups[0]["lr"]
            logs["ppc_scale"] = scale
            logs["images_per_s"] = seen / (time.perf_counter() - tic)
            seen, tic = 0, time.perf_counter()
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{float(total):.3f}")
        if step % s.eval_every == 0 or step == s.steps:
            decision = [None, False]
            if accelerator.is_main_process:
                metrics = {"step": step, **evaluate(accelerator.unwrap_model(model))}
                progress.history.append(metrics)
                bar.write(f"step {step}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
                accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"},
                                step=step)
                decision = [metrics, bool(reporter and reporter(step, metrics))]
            broadcast_object_list(decision)  # every rank stops together and keeps the history
            if not accelerator.is_main_process:
                progress.history.append(decision[0])
            stop = decision[1]
            model.train()
        interrupted = _any_rank(accelerator, bool(received))
        if step % s.checkpoint_every == 0 or step == s.steps or stop or interrupted:
            path = save_checkpoint(accelerator, output_dir, step)
            if interrupted and step < s.steps and not stop:
                bar.close()
                raise TrainingInterrupted(received[0] if received else "SIGTERM", step, path)
    bar.close()
    last = progress.history[-1] if progress.history else {}
    return TrainResult(step=progress.step, metrics=last, history=list(progress.history),
                       stopped_early=stop, last_logs=logs)


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    # Every rank must stop at the same step, or the next collective hangs.
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)
