"""`ppc-train`: the training entry point (Hydra), and `run(cfg, reporter)` for programs that
train a composed config (sweeps, benchmarks, tests).

The config enters here, is validated once (`to_run_config`), and only plain values go below.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from experiments.config import ConfigError, RunConfig, identity_fields, to_run_config
from experiments.run_dir import RunFolderConflict, StopSignals, claim_output_dir
from experiments.tracking import finish_tracking, start_tracking
from ppc_core.data import build_dataset, dataset_info
from ppc_core.evaluate import EvalResult, evaluate
from ppc_core.losses.ppc import GatherFn, PPCLoss
from ppc_core.models import build_model
from ppc_core.objective import Objective, PPCWeights, SEAMWeights
from ppc_core.optim import build_optimizer
from ppc_core.train import (
    Cadence,
    Data,
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


def _eval_loader(cfg: RunConfig) -> DataLoader:
    d = cfg.data
    dataset = build_dataset(d.name, d.eval_split, False, d.crop_size, d.root,
                            num_images=d.eval_images, skip_corrupt=d.skip_corrupt)
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False,
                      num_workers=d.num_workers)


def build_training(
    cfg: RunConfig, gather: GatherFn | None = None
) -> tuple[Dataset, nn.Module, torch.optim.Optimizer, Objective]:
    """The training data set, model, optimiser and objective that `cfg` describes (the model on
    CPU, not yet prepared by Accelerate). gather: see `PPCLoss`."""
    d, m, o, loss = cfg.data, cfg.model, cfg.optim, cfg.loss
    train_set = build_dataset(d.name, d.train_split, True, d.crop_size, d.root,
                              num_images=d.num_images, skip_corrupt=d.skip_corrupt)
    model = build_model(m.backbone, dataset_info(d.name).num_classes, m.output_stride,
                        m.proj_dim, m.pcm, m.pretrained, m.freeze_bn)
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
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        cpu=t.cpu or not torch.cuda.is_available(),  # else torchrun on CPU starts N lone ranks
        log_with=cfg.track.trackers or None, project_dir=str(out),
        # Before PPC starts (and without SEAM) the projector / PCM get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
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
    set_seed(t.seed)
    info = dataset_info(cfg.data.name)
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    train_set, model, optimizer, objective = build_training(cfg, gather)
    eval_loader = _eval_loader(cfg) if accelerator.is_main_process else None
    last_eval: list[EvalResult] = []

    def evaluate_model(net: torch.nn.Module) -> dict[str, float]:
        e = cfg.eval
        result = evaluate(net, eval_loader, info.num_classes, e.scales, e.flip, e.bg_threshold,
                          max_batches=e.max_batches or None, num_samples=e.num_samples,
                          progress=True, device=accelerator.device)
        last_eval[:] = [result]
        return {"cam_miou": result.cam_miou, "pseudo_miou": result.pseudo_miou,
                "best_threshold": result.best_threshold}

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
    if accelerator.is_main_process:
        if not last_eval:  # resumed after the final step: evaluate the restored model once
            evaluate_model(model)
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
