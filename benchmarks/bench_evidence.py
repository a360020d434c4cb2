"""Does PPC help? CAM-only vs CAM + PPC, same budget, several seeds, on the bundled data.

    python -m benchmarks.bench_evidence                       # digits preset, 3 seeds
    python -m benchmarks.bench_evidence --ppc ppc.tau=0.05 loss.ppc_start_step=200
    python -m benchmarks.bench_evidence --common train.steps=400 --jobs 2

Each run is `python -m experiments.train` in its own process (`--jobs` at a time, one thread
each); prints a markdown table of final CAM mIoU (best background threshold) and pseudo-mask
mIoU (fixed threshold), mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _train(out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "experiments.train", f"train.output_dir={out}",
           "track.trackers=[]", *overrides]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"training failed ({proc.returncode}); see {log}")
    return json.loads((out / "metrics.json").read_text())


def _stats(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", default="runs/evidence")
    p.add_argument("--common", nargs="*", default=[], help="overrides for both arms")
    p.add_argument("--ppc", nargs="*", default=[], help="overrides for the PPC arm only")
    args = p.parse_args(argv)
    root = Path(args.root)
    arms = {"CAM only (baseline)": ["loss.use_ppc=false"],
            "CAM + PPC": ["loss.use_ppc=true", *args.ppc]}
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    tic = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda job: _train(root / f"{'ppc' if 'PPC' in job[0] else 'base'}_seed{job[1]}",
                               [*args.common, *arms[job[0]], f"train.seed={job[1]}"]), jobs))
    by_arm: dict[str, list[dict]] = {arm: [] for arm in arms}
    for (arm, _), metrics in zip(jobs, results, strict=True):
        by_arm[arm].append(metrics)
    print(f"{args.seeds} seeds, overrides: common {args.common or '-'}, PPC {args.ppc or '-'}; "
          f"{time.perf_counter() - tic:.0f} s wall")
    print("| arm | final CAM mIoU | pseudo-mask mIoU | best CAM mIoU during training | per seed (CAM) |")
    print("|---|---|---|---|---|")
    for arm, runs in by_arm.items():
        cam = [m["cam_miou"] for m in runs]
        print(f"| {arm} | {_stats(cam)} | {_stats([m['pseudo_miou'] for m in runs])} | "
              f"{_stats([m['best_cam_miou'] for m in runs])} | "
              f"{', '.join(f'{v:.3f}' for v in cam)} |")


if __name__ == "__main__":
    main()
