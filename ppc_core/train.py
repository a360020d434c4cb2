"""The training loop: one readable function on Hugging Face Accelerate.

Checkpoints hold the model, optimiser and step; batches and sampling are functions of
(seed, step), so a killed run restarted with the same command ends where an uninterrupted one
would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ppc_core.checkpoint import latest_checkpoint, save_checkpoint
from ppc_core.data.sampler import step_batches
from ppc_core.objective import Objective
from ppc_core.schedules import poly_lr, ppc_ramp
from ppc_core.seeding import step_seeds

# (step, metrics) -> True to stop the run now (a sweep's pruner decided).
Reporter = Callable[[int, dict[str, float]], bool]
# model -> metrics, run on every process (each evaluates its share and the counts are reduced),
# the same global metrics on each.
EvalFn = Callable[[nn.Module], dict[str, float]]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; the state before the step was saved."""


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
    rank, on_gpu = accelerator.process_index, accelerator.device.type == "cuda"
    batches = step_batches(dataset, batch_size, s.seed, progress.step * s.grad_accum, rank,
                           accelerator.num_processes, num_workers, pin_memory=on_gpu)
    bar = tqdm(total=s.steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    stop, seen, tic, logs = False, 0, time.perf_counter(), {}
    model.train()
    while progress.step < s.steps and not stop:
        step = progress.step
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(step, s.steps, s.base_lr, s.poly_power) * group["lr_mult"]
        scale = ppc_ramp(step, s.ppc_start, s.ppc_ramp)
        for micro in range(s.grad_accum):
            # Seeds of (seed, step, rank): resumption replays them, ranks draw differently.
            augment_seed, sampling_seed = step_seeds(s.seed, step, micro, rank, s.grad_accum)
            torch.manual_seed(augment_seed)
            batch = next(batches)
            images = batch["image"].to(accelerator.device, non_blocking=on_gpu)
            labels = batch["label"].to(accelerator.device, non_blocking=on_gpu)
            gen = torch.Generator().manual_seed(sampling_seed)
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
            # Every rank evaluates its share and gets the global metrics (EvalFn).
            metrics = {"step": step, **evaluate(accelerator.unwrap_model(model))}
            progress.history.append(metrics)
            decision = [False]
            if accelerator.is_main_process:
                bar.write(f"step {step}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
                accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"},
                                step=step)
                decision = [bool(reporter and reporter(step, metrics))]
            broadcast_object_list(decision)  # every rank stops together
            stop = decision[0]
            model.train()
        if step % s.checkpoint_every == 0 or step == s.steps or stop:
            save_checkpoint(accelerator, output_dir, step)
    bar.close()
    last = progress.history[-1] if progress.history else {}
    return TrainResult(step=progress.step, metrics=last, history=list(progress.history),
                       stopped_early=stop, last_logs=logs)
