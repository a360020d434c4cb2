"""`ppc-train`: the training entry point (Hydra), and `run(cfg, reporter)` for programs that
train a composed config (sweeps, benchmarks, tests).

The config enters here, is validated once (`to_run_config`), and only plain values go below.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from experiments.config import ConfigError, RunConfig, identity_fields, to_run_config
from experiments.run_dir import RunFolderConflict, StopSignals, claim_output_dir
from experiments.tracking import finish_tracking, start_tracking
from ppc_core.data import build_dataset, dataset_info
from ppc_core.data.sampler import EvalShard
from ppc_core.evaluate import EvalResult, evaluate
from ppc_core.losses.ppc import GatherFn, PPCLoss
from ppc_core.models import build_model
from ppc_core.objective import Objective, PPCWeights, SEAMWeights
from ppc_core.optim import build_optimizer
from ppc_core.train import (
    Cadence,
    Data,
    EvalFn,
    Hooks,
    NonFiniteLoss,
    Reporter,
    RunDir,
    Schedule,
    TrainingInterrupted,
    TrainResult,
    train,
)

__all__ = ["RunFolderConflict", "TrainingInterrupted", "NonFiniteLoss", "build_training", "run"]


class DeviceError(RuntimeError):
    """GPUs were expected (or too few for the processes) and `train.cpu` does not allow CPU."""


def _gpus_expected() -> str | None:
    """The variable that says this process was given GPUs, if any: SLURM and torchrun users set
    CUDA_VISIBLE_DEVICES, NVIDIA's CUDA images set NVIDIA_VISIBLE_DEVICES."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = os.environ.get(name, "").strip()
        if value and value.lower() not in ("-1", "none", "void", "no"):
            return f"{name}={value}"
    return None


def train_on_cpu(cpu: bool) -> bool:
    """Where to train: CPU when `cpu` (train.cpu) or when no GPU was expected and none exists.

    Raises DeviceError, naming the fix, where GPUs were expected but CUDA is not available (a
    driver too old for torch's CUDA would otherwise train on CPU for days), or where a node
    runs more processes than it has GPUs (they would share cuda:0, which NCCL rejects).
    """
    if cpu:
        return True
    if not torch.cuda.is_available():
        if (expected := _gpus_expected()) is not None:
            raise DeviceError(
                f"train: {expected} but torch.cuda.is_available() is False (torch built for "
                f"CUDA {torch.version.cuda}; is the NVIDIA driver too old or missing?); fix the "
                f"driver, or set train.cpu=true to train on CPU")
        return True  # a machine without GPUs: CPU, and torchrun's ranks use gloo
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > torch.cuda.device_count():
        raise DeviceError(
            f"train: {local} processes on this node but {torch.cuda.device_count()} GPU(s) "
            f"visible; start at most one process per GPU, or set train.cpu=true")
    return False


def find_unused_parameters(cfg: RunConfig) -> bool:
    """Whether some step leaves a parameter without a gradient, so DDP must search the graph
    for them: the projector before PPC starts (or always without PPC). PCM is trained by SEAM's
    terms whenever it is built (see `build_training`)."""
    return not cfg.loss.use_ppc or cfg.loss.ppc_start_step > 0


def build_accelerator(cfg: RunConfig) -> Accelerator:
    """The Accelerator `cfg.train` describes: device, precision, accumulation, DDP and the
    process-group timeout."""
    t = cfg.train
    return Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        cpu=train_on_cpu(t.cpu), log_with=cfg.track.trackers or None,
        project_dir=t.output_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters(cfg)),
            InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s)),
        ],
    )


def _eval_loader(cfg: RunConfig, accelerator: Accelerator) -> DataLoader:
    """This process's share of the evaluation split (every process evaluates, see EvalShard)."""
    d, e = cfg.data, cfg.eval
    dataset = build_dataset(d.name, d.eval_split, False, d.crop_size, d.root,
                            num_images=d.eval_images, skip_corrupt=d.skip_corrupt)
    shard = EvalShard(len(dataset), e.batch_size, accelerator.process_index,
                      accelerator.num_processes, e.max_batches or None)
    return DataLoader(dataset, batch_sampler=shard, num_workers=d.num_workers,
                      pin_memory=accelerator.device.type == "cuda")


class _Float32Forward(nn.Module):
    """`net` run through its class's forward: Accelerate patches a mixed-precision model's
    forward with the training autocast, which evaluation must not inherit (the reported mIoU
    would depend on train.mixed_precision). Parameters are fp32 under autocast, so this is fp32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.train(net.training)

    def forward(self, x: torch.Tensor, **flags: bool):  # noqa: ANN201 (the model's output)
        return type(self.net).forward(self.net, x, **flags)


def eval_fn(cfg: RunConfig, accelerator: Accelerator, last: list[EvalResult]) -> EvalFn:
    """The evaluation the loop calls on every process: each evaluates its share in fp32, the
    counts are summed over processes, every process gets the global metrics; the full result
    (with rank 0's overlay samples) is kept in `last`."""
    info, e = dataset_info(cfg.data.name), cfg.eval
    loader = _eval_loader(cfg, accelerator)
    several = accelerator.num_processes > 1

    def evaluate_model(model: nn.Module) -> dict[str, float]:
        net = _Float32Forward(accelerator.unwrap_model(model))
        result = evaluate(net, loader, info.num_classes, scales=e.scales, flip=e.flip,
                          bg_threshold=e.bg_threshold, num_samples=e.num_samples,
                          device=accelerator.device,
                          progress=accelerator.is_local_main_process,
                          reduce=(lambda t: accelerator.reduce(t, "sum")) if several else None)
        last[:] = [result]
        return {"cam_miou": result.cam_miou, "pseudo_miou": result.pseudo_miou,
                "best_threshold": result.best_threshold}

    return evaluate_model


def build_training(
    cfg: RunConfig, gather: GatherFn | None = None
) -> tuple[Dataset, nn.Module, torch.optim.Optimizer, Objective]:
    """The training data set, model, optimiser and objective that `cfg` describes (the model on
    CPU, not yet prepared by Accelerate). gather: see `PPCLoss`."""
    d, m, o, loss = cfg.data, cfg.model, cfg.optim, cfg.loss
    train_set = build_dataset(d.name, d.train_split, True, d.crop_size, d.root,
                              num_images=d.num_images, skip_corrupt=d.skip_corrupt)
    # PCM learns only from SEAM's terms (PPC reads its map without gradient): without SEAM an
    # untrained PCM would feed PPC a random refinement and stall DDP, so PPC uses the plain CAM
    # (docs: method.md, "Without SEAM, use the plain CAM").
    pcm = m.pcm and loss.seam
    if m.pcm and not pcm:
        warnings.warn("model.pcm=true with loss.seam=false: nothing trains PCM, so it is not "
                      "built and PPC uses the plain CAM", stacklevel=2)
    model = build_model(m.backbone, dataset_info(d.name).num_classes, m.output_stride,
                        m.proj_dim, pcm, m.pretrained, m.freeze_bn)
    optimizer = build_optimizer(model.param_groups(o.weight_decay), o.name, o.lr, o.momentum,
                                o.group_lr_mults)
    seam = SEAMWeights(loss.w_er, loss.w_ecr, loss.w_min_pool) if loss.seam else None
    p = cfg.ppc
    objective = Objective(PPCLoss(p, gather) if loss.use_ppc else None,
                          d.target_size, d.target_flip, seam,
                          PPCWeights(p.w_cross_proto, p.w_cross_cam, p.w_intra))
    return train_set, model, optimizer, objective


def run(cfg: RunConfig, reporter: Reporter | None = None) -> dict:
    """Train and evaluate one configuration; returns the final metrics (also in metrics.json).

    Raises `RunFolderConflict` (before writing anything) when `train.output_dir` holds another
    run's checkpoints, `NonFiniteLoss` when a step fails, `TrainingInterrupted` after SIGTERM or
    SIGINT (the step in progress finished and was checkpointed; the same call resumes).
    """
    out = Path(cfg.train.output_dir)
    t = cfg.train
    accelerator = build_accelerator(cfg)
    identity = identity_fields(cfg)
    try:
        with claim_output_dir(accelerator, out, identity, t.resume), StopSignals() as stop:
            return _train_and_report(accelerator, cfg, identity, reporter, stop)
    finally:
        accelerator.end_training()
        # Accelerate keeps mixed precision and accumulation in process-wide singletons; clear
        # them so the next in-process run (a sweep's next trial) gets its own settings.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train_and_report(accelerator: Accelerator, cfg: RunConfig, identity: dict,
                      reporter: Reporter | None, stop: StopSignals) -> dict:
    out, t = Path(cfg.train.output_dir), cfg.train
    # Model initialisation is the same on every rank (DDP broadcasts rank 0's anyway); the
    # per-step randomness is per rank (ppc_core.seeding).
    set_seed(t.seed)
    info = dataset_info(cfg.data.name)
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    train_set, model, optimizer, objective = build_training(cfg, gather)
    last_eval: list[EvalResult] = []
    evaluate_model = eval_fn(cfg, accelerator, last_eval)

    start_tracking(accelerator, cfg)
    schedule = Schedule(steps=t.steps, lr=cfg.optim.lr, poly_power=cfg.optim.poly_power,
                        ppc_start_step=cfg.loss.ppc_start_step,
                        ppc_ramp_steps=cfg.loss.ppc_ramp_steps, grad_accum=t.grad_accum,
                        seed=t.seed)
    cadence = Cadence(log_every=t.log_every, eval_every=cfg.eval.every,
                      checkpoint_every=t.checkpoint_every)
    result = train(accelerator, model, optimizer, objective,
                   Data(train_set, t.batch_size, cfg.data.num_workers), schedule, cadence,
                   RunDir(out, identity, t.resume), Hooks(evaluate_model, reporter, stop))
    metrics = _summarise(result)
    if not last_eval:  # resumed after the final step: evaluate the restored model once
        evaluate_model(model)  # on every rank: the evaluation reduces over them
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        finish_tracking(accelerator, out, metrics, last_eval[0], info.num_classes)
    return metrics


def _summarise(result: TrainResult) -> dict:
    return {"step": result.step, "stopped_early": result.stopped_early, **result.metrics,
            "best_cam_miou": max((h["cam_miou"] for h in result.history), default=float("nan")),
            "history": result.history, "last_logs": result.last_logs}


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        metrics = run(to_run_config(cfg))
    except TrainingInterrupted as err:  # the shell's convention: 128 + the signal's number
        print(f"ppc-train: {err}", file=sys.stderr)
        sys.exit(128 + signal.Signals[err.signal].value if err.signal in signal.Signals.__members__
                 else 1)
    except (ConfigError, NonFiniteLoss) as err:
        sys.exit(f"ppc-train: {err}")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "last_logs")},
                     indent=2))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
