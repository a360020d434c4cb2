"""Training throughput with PPC on and off, and PPC's share of a step.

`python -m benchmarks.bench_train` (CPU, the default `digits` preset's model and sizes on random
tensors, SGD), `--preset` (the default preset's whole step: a batch from its data loader, both
views, the objective, AdamW), `--breakdown` (that step, PPC's stages added one at a time),
`--loop` (the real training loop, whole runs), or
`python -m benchmarks.bench_train --device cuda --backbone resnet50 --size 448 --target 128
--batch 8` on a GPU. Prints a markdown table. Target: PPC adds at most 10% to a step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ppc_core.data.views import align_to_target, target_view
from ppc_core.losses.ppc import PPCConfig, PPCLoss
from ppc_core.losses.seam import classification_loss
from ppc_core.models import build_model
from ppc_core.objective import Objective

Batch = Callable[[], tuple[Tensor, Tensor]]
# (model, images, labels, ppc_scale, generator) -> named loss terms, as `Objective`
StepObjective = Callable[..., dict[str, Tensor]]
_BLOCK = 5
_LOOP_RUNS = 5
_RESAMPLES = 2000


def interleaved_steps(objectives: dict[str, StepObjective], model: nn.Module,
                      optimizer: torch.optim.Optimizer, next_batch: Batch, steps: int,
                      warmup: int, device: torch.device, bf16: bool = False) -> dict[str, list[float]]:
    """Seconds per optimiser step (next_batch(), both views, the objective, backward, step) for
    each objective. They take turns in blocks of `_BLOCK` timed steps, each block after one
    untimed step, so that background load and drift fall on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for block in range(-(-warmup // _BLOCK) + -(-steps // _BLOCK)):
        for name, objective in objectives.items():
            for i in range(1 + _BLOCK):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                images, labels = next_batch()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    terms = objective(model, images, labels, 1.0, torch.Generator().manual_seed(i))
                optimizer.zero_grad()
                sum(terms.values()).backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i > 0 and block * _BLOCK >= warmup:
                    times[name].append(time.perf_counter() - tic)
    return times


def added_interval(base: Sequence[float], other: Sequence[float], group: int,
                   level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of median(other) / median(base) - 1 over paired groups: group j of
    both lists ran side by side (a block of interleaved steps, or one run each), so resampling
    the groups together keeps what a slow minute did to both. Seeded: the same times give the
    same interval."""
    a = np.asarray(base).reshape(-1, group)
    b = np.asarray(other).reshape(-1, group)
    pick = np.random.default_rng(0).integers(0, len(a), size=(_RESAMPLES, len(a)))
    ratios = np.median(b[pick].reshape(_RESAMPLES, -1), axis=1) / np.median(
        a[pick].reshape(_RESAMPLES, -1), axis=1) - 1
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


class ProjectorOnly:
    """The CAM-only step plus what PPC computes before its loss: the projector of both views
    and, with `align`, the source maps resized onto the target grid; the projections feed a
    term of weight 1e-9, so that their backward runs too (with a cheaper gradient than the
    loss's: the split of PPC's time between these stages is approximate)."""

    def __init__(self, target_size: int, target_flip: bool, align: bool) -> None:
        self.target_size, self.target_flip, self.align = target_size, target_flip, align

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, ppc_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        src = model(images, project=True, refine=False)
        tgt = model(target_view(images, self.target_size, self.target_flip), project=True,
                    refine=False)
        proj = src.proj
        if self.align:
            grid = tuple(tgt.cam.shape[2:])
            proj = align_to_target(src.proj, grid, self.target_flip)
            align_to_target(src.cam, grid, self.target_flip)  # PPC reads the source CAM too
        return {"cls": (classification_loss(src.cam, labels) + classification_loss(tgt.cam, labels)) / 2,
                "proj": 1e-9 * (proj.sum() + tgt.proj.sum())}


def synthetic_steps(args: argparse.Namespace) -> dict[str, list[float]]:
    """The model and sizes from the command line, one fixed random batch, SGD."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.backbone, args.classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = (torch.rand(args.batch, args.classes, device=device) < 0.2).float()
    labels[:, 0] = 1
    objectives = {"CAM only": Objective(None, args.target),
                  "CAM + PPC": Objective(PPCLoss(PPCConfig()), args.target)}
    return interleaved_steps(objectives, model, opt, lambda: (images, labels), args.steps,
                             args.warmup, device, args.bf16)


def _preset(overrides: Sequence[str] = ()):  # noqa: ANN202 - experiments.config.RunConfig
    from experiments.config import compose_config

    return compose_config("digits", list(overrides))


def preset_steps(args: argparse.Namespace) -> tuple[dict[str, list[float]], int]:
    """The default preset's step, built by `experiments.train.build_training` (its data set and
    loader, model, optimiser and objective; CPU), without Accelerate's bookkeeping. Returns the
    times and the batch size."""
    from torch.utils.data import DataLoader

    from experiments.train import build_training

    cfg = _preset()
    d = cfg.data
    torch.manual_seed(0)
    train_set, model, opt, with_ppc = build_training(cfg)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=d.num_workers)
    batches = iter(())

    def next_batch() -> tuple[Tensor, Tensor]:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        return batch["image"], batch["label"]

    objectives: dict[str, StepObjective] = {
        "CAM only": Objective(None, d.target_size, d.target_flip)}
    if args.breakdown:
        objectives["+ projector"] = ProjectorOnly(d.target_size, d.target_flip, align=False)
        objectives["+ source maps aligned"] = ProjectorOnly(d.target_size, d.target_flip, align=True)
    objectives["CAM + PPC"] = with_ppc
    times = interleaved_steps(objectives, model, opt, next_batch, args.steps, args.warmup,
                              torch.device("cpu"))
    return times, cfg.train.batch_size


def loop_step_seconds(use_ppc: bool, steps: int) -> float:
    """Seconds per step of the real training loop at the default preset (data loading, AdamW,
    Accelerate), PPC on from the first step: `steps` timed steps after as many warm-up steps;
    evaluation and checkpoints fall outside the timed steps."""
    from experiments.train import run

    with tempfile.TemporaryDirectory() as out:
        cfg = _preset([f"train.output_dir={out}", f"train.steps={2 * steps}",
                       f"train.log_every={steps}", "eval.every=1000000",
                       "train.checkpoint_every=1000000", "track.trackers=[]",
                       "loss.ppc_start_step=0", "loss.ppc_ramp_steps=0",
                       f"loss.use_ppc={str(use_ppc).lower()}"])
        logs = run(cfg)["last_logs"]  # throughput over the last log interval: the timed steps
    return cfg.train.batch_size / logs["images_per_s"]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="cnn4")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="source view (crop) size")
    p.add_argument("--target", type=int, default=32, help="target view size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--preset", action="store_true",
                      help="the default preset's whole step (its data loader and AdamW; CPU)")
    mode.add_argument("--breakdown", action="store_true",
                      help="--preset with two intermediate settings: + the projector, + the "
                           "source maps aligned (then + the loss = CAM + PPC)")
    mode.add_argument("--loop", action="store_true",
                      help="the real training loop at the default preset (CPU; --steps steps "
                           f"after as many warm-up steps, {_LOOP_RUNS} runs of each setting)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = args.batch
    if args.loop:
        # Whole runs take turns, so background load falls on both settings alike; their
        # progress bars are not what this prints.
        runs: dict[str, list[float]] = {"CAM only": [], "CAM + PPC": []}
        with contextlib.redirect_stderr(io.StringIO()):
            for _ in range(_LOOP_RUNS):
                runs["CAM only"].append(loop_step_seconds(False, args.steps))
                runs["CAM + PPC"].append(loop_step_seconds(True, args.steps))
        batch = _preset().train.batch_size
        print(f"training loop, default preset (cpu), {args.threads} threads, "
              f"medians of {_LOOP_RUNS} runs")
    elif args.preset or args.breakdown:
        runs, batch = preset_steps(args)
        print(f"default preset's step (data loader, AdamW; cpu), {args.threads} threads")
    else:
        runs = synthetic_steps(args)
        print(f"device {args.device}, {args.backbone}, batch {args.batch}, {args.size}px -> "
              f"{args.target}px target view, {args.threads} threads, bf16={args.bf16}")
    base = statistics.median(runs["CAM only"])
    group = 1 if args.loop else _BLOCK
    print("| setting | ms / step (median) | images / s | added to a CAM-only step (95% interval) "
          "| PPC share of step |")
    print("|---|---|---|---|---|")
    for name, times in runs.items():
        med = statistics.median(times)
        added = "(baseline)"
        if name != "CAM only":
            lo, hi = added_interval(runs["CAM only"], times, group)
            added = f"{(med - base) / base * 100:.1f}% ({lo * 100:.1f} to {hi * 100:.1f}%)"
        print(f"| {name} | {med * 1e3:.1f} | {batch / med:.1f} | {added} "
              f"| {(med - base) / med * 100:.1f}% |")


if __name__ == "__main__":
    main()
