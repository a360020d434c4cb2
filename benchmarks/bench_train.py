"""Training throughput with PPC on and off, and PPC's share of a step.

`python -m benchmarks.bench_train` (CPU, the default `digits` preset's model and sizes), or
`python -m benchmarks.bench_train --device cuda --backbone resnet50 --size 448 --target 128
--batch 8` on a GPU. Prints a markdown table. Target: PPC adds at most 10% to a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

from ppc_core.losses.ppc import PPCConfig, PPCLoss
from ppc_core.models import build_model
from ppc_core.objective import Objective


def time_steps(objective: Objective, args: argparse.Namespace) -> list[float]:
    """Seconds per optimiser step (forward of both views, loss, backward, SGD step)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.backbone, args.classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = (torch.rand(args.batch, args.classes, device=device) < 0.2).float()
    labels[:, 0] = 1
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            terms = objective(model, images, labels, 1.0, torch.Generator().manual_seed(i))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - tic)
    return times


def loop_step_seconds(use_ppc: bool, steps: int) -> float:
    """Seconds per step of the real training loop at the default preset (data loading, AdamW,
    Accelerate), PPC on from the first step: `steps` timed steps after as many warm-up steps;
    evaluation and checkpoints fall outside the timed steps."""
    from hydra import compose, initialize_config_module

    from experiments.config import to_run_config
    from experiments.train import run

    with tempfile.TemporaryDirectory() as out:
        overrides = [f"train.output_dir={out}", f"train.steps={2 * steps}", f"train.log_every={steps}",
                     "eval.every=1000000", "train.checkpoint_every=1000000", "track.trackers=[]",
                     "loss.ppc_start_step=0", "loss.ppc_ramp_steps=0",
                     f"loss.use_ppc={str(use_ppc).lower()}"]
        with initialize_config_module("experiments.conf", version_base=None):
            cfg = to_run_config(compose("config", overrides=overrides))
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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--loop", action="store_true",
                   help="time the real training loop at the default preset instead (CPU; "
                        "--steps steps after as many warm-up steps, 3 runs of each setting)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    # Interleave the two settings so background load hits both alike.
    runs: dict[str, list[float]] = {"CAM only": [], "CAM + PPC": []}
    for _ in range(3 if args.loop else 2):
        if args.loop:
            runs["CAM only"].append(loop_step_seconds(False, args.steps))
            runs["CAM + PPC"].append(loop_step_seconds(True, args.steps))
        else:
            runs["CAM only"] += time_steps(Objective(None, args.target), args)
            runs["CAM + PPC"] += time_steps(Objective(PPCLoss(PPCConfig()), args.target), args)
    base = statistics.median(runs["CAM only"])
    for name, times in runs.items():
        med = statistics.median(times)
        rows.append((name, med * 1e3, args.batch / med, (med - base) / med * 100))
    if args.loop:
        print(f"training loop, default preset (cpu), {args.threads} threads, medians of 3 runs")
    else:
        print(f"device {args.device}, {args.backbone}, batch {args.batch}, {args.size}px -> "
              f"{args.target}px target view, {args.threads} threads, bf16={args.bf16}")
    print("| setting | ms / step (median) | images / s | PPC share of step |")
    print("|---|---|---|---|")
    for name, ms, ips, share in rows:
        print(f"| {name} | {ms:.1f} | {ips:.1f} | {share:.1f}% |")


if __name__ == "__main__":
    main()
