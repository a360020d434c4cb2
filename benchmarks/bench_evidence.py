"""Does PPC help? CAM-only vs CAM + PPC, same budget, paired by seed, on the bundled data.

    python -m benchmarks.bench_evidence --preset digits_pretrained --seeds 5   # the README's table
    python -m benchmarks.bench_evidence                                        # digits preset (4x4 grid)
    python -m benchmarks.bench_evidence --ppc ppc.tau=0.05 --common train.steps=400 --jobs 2
    python -m benchmarks.bench_evidence --oracle-only --step-times --preset digits_pretrained

Each run is `python -m experiments.train` in its own process (`--jobs` at a time, one thread
each; a run whose directory already holds a finished run is read back, not retrained). Prints
markdown tables: per arm, the final CAM mIoU (best background threshold of the 0.00-1.00 sweep,
and how many seeds had it at the sweep's edge) and the pseudo-mask mIoU (fixed threshold), mean
and standard deviation over seeds; then the paired difference PPC - baseline per seed with its
95% interval (paired t); then the oracle ceiling of the loss grids: the val split's ground-truth
masks area-pooled to an n x n grid and upsampled back, scored as mIoU against themselves
(`--step-times`: with each grid's CPU time per training step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.config import compose_config
from ppc_core.metrics import confusion_matrix, iou_per_class
from sweeps.verdict import mean_spread, paired_t

BASELINE, PPC = "CAM only (baseline)", "CAM + PPC"


def _train(out: Path, overrides: list[str]) -> dict:
    if (out / "metrics.json").exists():  # finished earlier: the same command gives the same run
        return json.loads((out / "metrics.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "experiments.train", f"train.output_dir={out}",
           "track.trackers=[]", *overrides]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"training failed ({proc.returncode}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"  {out.name}: CAM {metrics['cam_miou']:.3f}, pseudo {metrics['pseudo_miou']:.3f}, "
          f"{time.perf_counter() - tic:.0f} s", flush=True)
    return metrics


def _stats(values: Sequence[float]) -> str:
    mean, spread = mean_spread(list(values))
    return f"{mean:.3f} ± {spread:.3f}"


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95
                    ) -> tuple[float, float, float]:
    """Mean of the paired differences b - a and its `level` interval (sweeps.verdict's paired
    Student t). a, b: one value per seed, in the same seed order. With one pair the interval is
    (-inf, inf)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_interval: need equally many values, got {len(a)} and {len(b)}")
    d = paired_t(dict(enumerate(b)), dict(enumerate(a)), level)
    return (d.mean, -math.inf, math.inf) if d.n < 2 else (d.mean, d.lo, d.hi)


def oracle_miou(masks: torch.Tensor, num_classes: int, grid: int, ignore_index: int = 255
                ) -> float:
    """mIoU of ground-truth masks seen through an n x n grid: the best a grid-level label can do.

    masks: (N, H, W) int, 0 background, 1..C classes, ignore_index ignored. Each class's share
    of a cell (ignored pixels count for none) is area-pooled to (grid, grid), upsampled
    bilinearly back to (H, W), and each pixel takes the class with the largest share.
    """
    k = num_classes + 1
    valid = masks != ignore_index
    onehot = F.one_hot(torch.where(valid, masks, 0).long(), k).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    pooled = F.adaptive_avg_pool2d(onehot, grid)
    back = F.interpolate(pooled, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    conf = confusion_matrix(back.argmax(1), masks.long(), k, ignore_index)
    return float(iou_per_class(conf).nanmean())


def step_cpu_ms(preset: str, overrides: list[str], steps: int = 20, warmup: int = 5) -> float:
    """Median process CPU milliseconds of one training step (model, both views, the objective,
    backward, optimiser; one thread) of `preset` with `overrides`. CPU time, not wall time: on a
    shared machine the ratios between settings survive the other jobs' load."""
    from torch.utils.data import DataLoader

    from experiments.train import build_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set, model, optimizer, objective = build_training(compose_config(preset, overrides))
        loader = iter(DataLoader(train_set, batch_size=16, shuffle=True))
        times = []
        for i in range(warmup + steps):
            batch = next(loader)
            tic = time.process_time()
            terms = objective(model, batch["image"], batch["label"], 1.0,
                              torch.Generator().manual_seed(i))
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.process_time() - tic)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def _oracle_table(preset: str, common: list[str], step_times: bool = False) -> list[str]:
    from ppc_core.data import build_dataset, dataset_info

    cfg = compose_config(preset, common)
    d = cfg.data
    stride = cfg.model.output_stride
    grid = -(-d.target_size // stride)
    data = build_dataset(d.name, d.eval_split, False, d.crop_size, d.root, num_images=d.eval_images)
    masks = torch.stack([data[i]["mask"] for i in range(len(data))]).long()
    num_classes = dataset_info(d.name).num_classes
    head = f"| loss grid ({d.eval_split}, {len(data)} images) | oracle mIoU |"
    lines = [head + (" CPU ms per step (1 thread) |" if step_times else ""),
             "|---|---|" + ("---|" if step_times else "")]
    for n in sorted({4, 8, 16, grid}):
        mark = f" (preset {preset}: target view {d.target_size} px)" if n == grid else ""
        row = f"| {n}x{n}{mark} | {oracle_miou(masks, num_classes, n):.3f} |"
        if step_times:
            ms = step_cpu_ms(preset, [*common, f"data.target_size={n * stride}",
                                      "train.output_dir=runs/evidence/step_times"])
            row += f" {ms:.0f} |"
        lines.append(row)
    return lines


def _arm_rows(by_arm: dict[str, list[dict]]) -> list[str]:
    lines = ["| arm | CAM mIoU | pseudo-mask mIoU | best threshold (at sweep edge) | per seed (CAM) |",
             "|---|---|---|---|---|"]
    for arm, runs in by_arm.items():
        cam = [m["cam_miou"] for m in runs]
        thr = [m["best_threshold"] for m in runs]
        edge = sum(t <= 0.0 or t >= 1.0 for t in thr)
        lines.append(f"| {arm} | {_stats(cam)} | {_stats([m['pseudo_miou'] for m in runs])} | "
                     f"{min(thr):.2f}-{max(thr):.2f} ({edge}/{len(thr)}) | "
                     f"{', '.join(f'{v:.3f}' for v in cam)} |")
    return lines


def _paired_rows(by_arm: dict[str, list[dict]]) -> list[str]:
    lines = ["| PPC - baseline, paired by seed | mean | 95% interval (paired t) | per seed |",
             "|---|---|---|---|"]
    for key, name in (("cam_miou", "CAM mIoU"), ("pseudo_miou", "pseudo-mask mIoU")):
        a = [m[key] for m in by_arm[BASELINE]]
        b = [m[key] for m in by_arm[PPC]]
        mean, lo, hi = paired_interval(a, b)
        per = ", ".join(f"{y - x:+.3f}" for x, y in zip(a, b, strict=True))
        lines.append(f"| {name} | {mean:+.3f} | {lo:+.3f} to {hi:+.3f} | {per} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits", help="Hydra preset of both arms")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", default="", help="run folders (default runs/evidence/<preset>)")
    p.add_argument("--common", nargs="*", default=[], help="overrides for both arms")
    p.add_argument("--ppc", nargs="*", default=[], help="overrides for the PPC arm only")
    p.add_argument("--oracle-only", action="store_true", help="print the oracle table only")
    p.add_argument("--step-times", action="store_true",
                   help="add each grid's CPU time per training step to the oracle table")
    args = p.parse_args(argv)
    oracle = _oracle_table(args.preset, args.common, args.step_times)
    if args.oracle_only:
        print("\n".join(oracle))
        return
    root = Path(args.root or f"runs/evidence/{args.preset}")
    arms = {BASELINE: ["loss.use_ppc=false"], PPC: ["loss.use_ppc=true", *args.ppc]}
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    tic = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda job: _train(root / f"{'ppc' if job[0] == PPC else 'base'}_seed{job[1]}",
                               [f"preset={args.preset}", *args.common, *arms[job[0]],
                                f"train.seed={job[1]}"]), jobs))
    by_arm: dict[str, list[dict]] = {arm: [] for arm in arms}
    for (arm, _), metrics in zip(jobs, results, strict=True):
        by_arm[arm].append(metrics)
    print(f"\npreset {args.preset}, {args.seeds} seeds, overrides: common {args.common or '-'}, "
          f"PPC {args.ppc or '-'}; {time.perf_counter() - tic:.0f} s wall\n")
    print("\n".join(_arm_rows(by_arm)), end="\n\n")
    if args.seeds > 1:
        print("\n".join(_paired_rows(by_arm)), end="\n\n")
    print("\n".join(oracle))


if __name__ == "__main__":
    main()
