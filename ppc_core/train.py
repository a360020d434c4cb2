"""The training loop on Hugging Face Accelerate: `train_step`, and `train`, which reads as its
phases (step, log, evaluate-and-decide, checkpoint).

Checkpoints hold the model, optimiser and step; batches and sampling are functions of
(seed, step), so a killed run restarted with the same command ends where an uninterrupted one
would. A failed step (a non-finite loss, or an error raised by the objective, on any rank) stops
every rank together after saving the state from before that step. A stop request (a signal seen
by the caller) is honoured after the step in progress, with a checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ppc_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ppc_core.data.sampler import step_batches
from ppc_core.objective import Objective
from ppc_core.schedules import poly_lr, ppc_ramp
from ppc_core.seeding import step_seeds

# (step, metrics) -> True to stop the run now (a sweep's pruner decided).
Reporter = Callable[[int, dict[str, float]], bool]
# model -> metrics, run on every process (each evaluates its share, the counts are reduced):
# the same global metrics on each.
EvalFn = Callable[[nn.Module], dict[str, float]]
# -> the name of a stop request received (e.g. "SIGTERM"), or None; asked once per micro-batch.
StopFn = Callable[[], str | None]


class NonFiniteLoss(FloatingPointError):
    """A step's loss was NaN or inf (or the objective raised) on some rank; every rank stopped.

    step: the failed step; terms: this rank's named terms (NaN where they were lost);
    ranks: the ranks that failed; checkpoint: the state from before the step, or the last good
    checkpoint when that state was itself not finite (None if there is none).
    """

    def __init__(self, message: str, step: int, terms: dict[str, float], ranks: list[int],
                 checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.terms, self.ranks, self.checkpoint = step, terms, ranks, checkpoint


class TrainingInterrupted(Exception):
    """A stop request (SIGTERM, SIGINT) was honoured: the step finished and was checkpointed.

    signal: the request's name; step: steps completed; checkpoint: the folder to resume from.
    """

    def __init__(self, signal: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal}: stopped after step {step}; checkpoint {checkpoint} "
                         "(the same command resumes from it)")
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


@dataclass
class Schedule:
    """The optimisation schedule; each field has its config field's name (`optim.lr` -> `lr`,
    `loss.ppc_start_step` -> `ppc_start_step`, `train.grad_accum` -> `grad_accum`)."""

    steps: int
    lr: float
    poly_power: float = 0.9
    ppc_start_step: int = 0
    ppc_ramp_steps: int = 0
    grad_accum: int = 1
    seed: int = 0


@dataclass
class Cadence:
    """How often the loop logs, evaluates (`eval.every`) and checkpoints, in optimiser steps."""

    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100

    def due(self, every: int, step: int, last: int) -> bool:
        return step % every == 0 or step == last


@dataclass
class Data:
    dataset: Dataset
    batch_size: int  # the global batch: N processes take a share each
    num_workers: int = 0


@dataclass
class RunDir:
    """Where checkpoints go, the run identity saved with them, and whether to resume."""

    output_dir: Path
    identity: dict[str, Any] | None = None
    resume: bool = True


@dataclass
class Hooks:
    evaluate: EvalFn
    reporter: Reporter | None = None
    should_stop: StopFn | None = None


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    last_logs: dict[str, float] = field(default_factory=dict)


@dataclass
class StepOutput:
    terms: dict[str, Tensor]  # the last micro-batch's named terms, this rank
    total: float  # the last micro-batch's loss, mean over ranks
    lr: float
    ppc_scale: float
    images: int  # images of every rank in this step
    stop: str | None  # a stop request some rank received during the step


class _Progress:
    """The loop position and evaluation history, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], state["history"]


class _StepFailed(Exception):
    def __init__(self, step: int, terms: dict[str, float], ranks: list[int], why: str) -> None:
        super().__init__(why)
        self.step, self.terms, self.ranks, self.why = step, terms, ranks, why


def seed_micro_batch(seed: int, step: int, grad_accum: int, micro: int,
                     rank: int = 0) -> torch.Generator:
    """Seed augmentation for micro-batch `micro` of `step` on process `rank`; returns PPC's
    sampling generator. Seeds of (seed, step, rank): resumption replays them, ranks differ."""
    augment, sampling = step_seeds(seed, step, micro, rank, grad_accum)
    torch.manual_seed(augment)
    return torch.Generator().manual_seed(sampling)


def _stop_code(stop: str | None) -> float:
    if stop is None:
        return 0.0
    return float(signal.Signals[stop].value if stop in signal.Signals.__members__ else 1000)


def _stop_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return "stop requested"


def _agree(accelerator: Accelerator, loss: Tensor | None, stop: str | None
           ) -> tuple[float, list[int], str | None]:
    """One collective and one host read per micro-batch: every rank learns the mean loss, the
    ranks whose loss is not finite (NaN stands for an error) and the stop request any rank
    received, so that all ranks take the same branch."""
    value = loss.detach().float() if loss is not None else torch.tensor(math.nan)
    local = torch.stack([value.to(accelerator.device),
                         torch.tensor(_stop_code(stop), device=accelerator.device)])
    rows = accelerator.gather(local).view(-1, 2).cpu()
    failed = torch.nonzero(~torch.isfinite(rows[:, 0])).flatten().tolist()
    code = int(rows[:, 1].max())
    return float(rows[:, 0].mean()), failed, None if code == 0 else stop or _stop_name(code)


def train_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
               objective: Objective, batches: Iterator[dict], s: Schedule, step: int,
               should_stop: StopFn | None = None) -> StepOutput:
    """One optimiser step of `s.grad_accum` micro-batches. On a failure on any rank, the
    model's buffers (BatchNorm statistics) are put back as they were before the step and
    `_StepFailed` is raised on every rank; the optimiser has not stepped."""
    lr = poly_lr(step, s.steps, s.lr, s.poly_power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    scale = ppc_ramp(step, s.ppc_start_step, s.ppc_ramp_steps)
    before = [b.detach().clone() for b in model.buffers()]  # the forward updates BN statistics
    images, stop = 0, None
    for micro in range(s.grad_accum):
        gen = seed_micro_batch(s.seed, step, s.grad_accum, micro, accelerator.process_index)
        batch = next(batches)
        copy = accelerator.device.type == "cuda"  # from pinned memory, asynchronously
        x = batch["image"].to(accelerator.device, non_blocking=copy)
        y = batch["label"].to(accelerator.device, non_blocking=copy)
        with accelerator.accumulate(model):
            terms, loss, why = {}, None, "non-finite loss"
            try:
                terms = objective(model, x, y, scale, gen)
                loss = sum(terms.values())
            except (ValueError, FloatingPointError) as err:
                # e.g. the PPC loss's "feats_s contains NaN": this rank must still reach the
                # collective below, or the other ranks wait for it forever.
                why = f"{type(err).__name__}: {err}"
            stop = stop or (should_stop() if should_stop else None)
            total, failed, agreed = _agree(accelerator, loss, stop)
            if failed:
                with torch.no_grad():
                    for b, old in zip(model.buffers(), before, strict=True):
                        b.copy_(old)
                values = {k: float(v.detach()) for k, v in terms.items()}
                mine = accelerator.process_index in failed
                raise _StepFailed(step, values, failed, why if mine else "another rank failed")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        images += x.shape[0] * accelerator.num_processes
        stop = stop or agreed
    return StepOutput(terms, total, lr, scale, images, stop)


def _finite_everywhere(accelerator: Accelerator, model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> bool:
    """Weights, buffers (BatchNorm statistics) and optimiser state finite on every rank. A
    diverging run can keep a finite loss while its statistics are already inf."""
    tensors = [*model.parameters(), *model.buffers(),
               *(v for st in optimizer.state.values() for v in st.values()
                 if isinstance(v, Tensor))]
    ok = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    return bool(accelerator.gather(torch.tensor([float(ok)], device=accelerator.device)).all())


def _save(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
          run: RunDir, step: int) -> Path:
    """Checkpoint the state after `step` steps; a state that is not finite is never saved: the
    run stops, naming the last good checkpoint."""
    if not _finite_everywhere(accelerator, model, optimizer):
        last = latest_checkpoint(run.output_dir)
        raise NonFiniteLoss(f"the state after step {step} is not finite (weights or BatchNorm "
                            f"statistics diverged; the loss was finite); last good checkpoint: "
                            f"{last}", step, {}, [], last)
    return save_checkpoint(accelerator, run.output_dir, step, run.identity)


def _fail(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
          run: RunDir, err: _StepFailed) -> NonFiniteLoss:
    """Save the state from before the failed step (when finite) and describe the failure."""
    if _finite_everywhere(accelerator, model, optimizer):
        path = save_checkpoint(accelerator, run.output_dir, err.step, run.identity)
        saved = f"state before the step saved to {path}"
    else:  # the previous update already diverged: the last checkpoint is the last good state
        path = latest_checkpoint(run.output_dir)
        saved = f"the state before the step is not finite; last good checkpoint: {path}"
    where = f"rank {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
    ranks = f" on rank(s) {err.ranks}" if accelerator.num_processes > 1 else ""
    msg = f"{where}step {err.step} failed{ranks}: {err.why}; terms {err.terms}; {saved}"
    return NonFiniteLoss(msg, err.step, err.terms, err.ranks, path)


def _evaluate_and_decide(accelerator: Accelerator, model: nn.Module, hooks: Hooks,
                         progress: _Progress, bar: tqdm) -> bool:
    """Every rank evaluates its share (the global metrics on each, see EvalFn); the main
    process logs and reports; every rank learns whether to stop (a sweep's pruner)."""
    step = progress.step
    metrics = {"step": step, **hooks.evaluate(accelerator.unwrap_model(model))}
    progress.history.append(metrics)
    decision = [False]
    if accelerator.is_main_process:
        bar.write(f"step {step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "step"}, step=step)
        decision = [bool(hooks.reporter and hooks.reporter(step, metrics))]
    broadcast_object_list(decision)  # every rank stops together
    model.train()
    return decision[0]


def _log(accelerator: Accelerator, out: StepOutput, step: int, seconds: float, images: int,
         bar: tqdm) -> dict[str, float]:
    logs = {f"loss/{k}": float(accelerator.reduce(v.detach(), "mean")) for k, v in out.terms.items()}
    logs["loss/total"] = out.total
    logs["lr"] = out.lr
    logs["ppc_scale"] = out.ppc_scale
    logs["images_per_s"] = images / seconds
    accelerator.log(logs, step=step)
    bar.set_postfix(loss=f"{out.total:.3f}")
    return logs


def train(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
          objective: Objective, data: Data, schedule: Schedule, cadence: Cadence, run: RunDir,
          hooks: Hooks) -> TrainResult:
    """Train `model` for `schedule.steps` optimiser steps; log, evaluate, report, checkpoint."""
    s, c, out_dir = schedule, cadence, Path(run.output_dir)
    run = RunDir(out_dir, run.identity, run.resume)
    progress = _Progress()
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(progress)
    if run.resume and (ckpt := load_checkpoint(accelerator, out_dir)) is not None:
        accelerator.print(f"resumed from {ckpt} at step {progress.step}")
    batches = step_batches(data.dataset, data.batch_size, s.seed, progress.step * s.grad_accum,
                           accelerator.process_index, accelerator.num_processes,
                           data.num_workers, pin_memory=accelerator.device.type == "cuda")
    bar = tqdm(total=s.steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    stop, images, tic, logs = False, 0, time.perf_counter(), {}
    model.train()
    with bar:
        # Stopped by a signal at an evaluation step, a run resumes owing that evaluation.
        if (progress.step and c.due(c.eval_every, progress.step, s.steps)
                and (not progress.history or progress.history[-1]["step"] != progress.step)):
            stop = _evaluate_and_decide(accelerator, model, hooks, progress, bar)
        while progress.step < s.steps and not stop:
            try:
                out = train_step(accelerator, model, optimizer, objective, batches, s,
                                 progress.step, hooks.should_stop)
            except _StepFailed as err:
                raise _fail(accelerator, model, optimizer, run, err) from None
            progress.step = step = progress.step + 1
            bar.update(1)
            images += out.images
            if c.due(c.log_every, step, s.steps):
                logs = _log(accelerator, out, step, time.perf_counter() - tic, images, bar)
                images, tic = 0, time.perf_counter()
            interrupted = out.stop is not None and step < s.steps  # at the end: just finish
            if c.due(c.eval_every, step, s.steps) and not interrupted:  # owed on resume
                stop = _evaluate_and_decide(accelerator, model, hooks, progress, bar)
            if c.due(c.checkpoint_every, step, s.steps) or stop or interrupted:
                path = _save(accelerator, model, optimizer, run, step)
            if interrupted:
                raise TrainingInterrupted(out.stop, step, path)
    last = progress.history[-1] if progress.history else {}
    return TrainResult(step=progress.step, metrics=last, history=list(progress.history),
                       stopped_early=stop, last_logs=logs)
