"""The first thing to run on a lent GPU: `make gpu-check` (`python -m benchmarks.gpu_check`).

On one CUDA device, in a few minutes: fp32 and bf16 step times of the VOC recipe's model at
the recipe's sizes on synthetic data (CAM only and CAM + PPC, so PPC's added share of a step),
the PPC loss at 16x16 and 56x56 against the loop reference on the GPU, peak memory, and the
host-device synchronisations of one training step (CUDA's sync debug mode). Prints a markdown
table and writes the same as JSON (`--out`, default runs/gpu_check.json). Without CUDA it
exits with one line saying so (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

RECIPE = "voc_seam_ppc"


def recipe_sizes() -> dict[str, object]:
    """Model and sizes of the VOC recipe (experiments/conf/preset/voc_seam_ppc.yaml)."""
    from experiments.config import compose_config
    from ppc_core.data import dataset_info

    cfg = compose_config(RECIPE, ["data.root=/none"])
    return {"backbone": cfg.model.backbone, "size": cfg.data.crop_size,
            "target": cfg.data.target_size, "batch": cfg.train.batch_size,
            "classes": dataset_info(cfg.data.name).num_classes}


def step_times(sizes: dict, bf16: bool, steps: int, warmup: int) -> dict[str, object]:
    """Median seconds per step, CAM only and CAM + PPC (bench_train's interleaved blocks), and
    the peak memory of those steps."""
    from benchmarks.bench_train import synthetic_steps

    torch.cuda.reset_peak_memory_stats()
    args = argparse.Namespace(device="cuda", steps=steps, warmup=warmup, bf16=bf16, **sizes)
    times = synthetic_steps(args)
    cam, ppc = (statistics.median(times[k]) for k in ("CAM only", "CAM + PPC"))
    return {"cam_only_ms": cam * 1e3, "cam_ppc_ms": ppc * 1e3, "ppc_added": ppc / cam - 1,
            "steps": len(times["CAM + PPC"]), "peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def syncs_per_step(sizes: dict, bf16: bool, steps: int = 3) -> float:
    """Host-device synchronisations per CAM + PPC training step (forward, backward, optimiser
    step; no timer), counted by CUDA's sync debug mode over `steps` steps after a warm-up."""
    from ppc_core.losses.ppc import PPCConfig, PPCLoss
    from ppc_core.models import build_model
    from ppc_core.objective import Objective

    device = torch.device("cuda")
    model = build_model(sizes["backbone"], sizes["classes"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(sizes["batch"], 3, sizes["size"], sizes["size"], device=device)
    labels = (torch.rand(sizes["batch"], sizes["classes"], device=device) < 0.2).float()
    objective = Objective(PPCLoss(PPCConfig()), sizes["target"])

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            terms = objective(model, images, labels, 1.0, torch.Generator().manual_seed(i))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()

    step(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                step(i + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught) / steps


def loss_parity(grid: int, seed: int = 0) -> dict[str, object]:
    """PPCLoss against the loop reference (benchmarks/ppc_reference.py) on the GPU: largest
    difference of the terms and of the feature gradients, and each one's time."""
    from benchmarks.bench_ppc_loss import (
        forward_backward,
        make_inputs,
        max_differences,
        ours,
        reference,
    )
    from ppc_core.losses.ppc import PPCConfig

    cfg = PPCConfig()
    x = {k: v.detach().cuda().requires_grad_(v.requires_grad)
         for k, v in make_inputs(2, grid, 20, 128, seed).items()}
    row: dict[str, object] = {"grid": f"{grid}x{grid}"}
    try:
        row["term_diff"], row["grad_diff"] = max_differences(ours(cfg, seed), reference(cfg, seed), x)
    except RuntimeError as err:  # e.g. a CPU generator handed to a CUDA op
        row["error"] = str(err).splitlines()[0]
    for name, fn in (("ours_ms", ours(cfg)), ("reference_ms", reference(cfg))):
        forward_backward(fn, x)
        torch.cuda.synchronize()
        tic = time.perf_counter()
        forward_backward(fn, x)
        torch.cuda.synchronize()
        row[name] = (time.perf_counter() - tic) * 1e3
    return row


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']} (torch {result['torch']}, CUDA {result['cuda']})",
             f"model: {result['sizes']}", "",
             "| precision | CAM only ms | CAM + PPC ms | PPC adds | peak MiB | syncs/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result["steps"].items():
        lines.append(f"| {name} | {r['cam_only_ms']:.1f} | {r['cam_ppc_ms']:.1f} | "
                     f"{r['ppc_added']:+.1%} | {r['peak_mib']:.0f} | {r['syncs_per_step']:.1f} |")
    lines += ["", "| PPC loss grid | max term diff | max grad diff | ours ms | reference ms |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["loss"]:
        diff = (f"{r['term_diff']:.2e} | {r['grad_diff']:.2e}" if "error" not in r
                else f"error: {r['error']} | -")
        lines.append(f"| {r['grid']} | {diff} | {r['ours_ms']:.1f} | {r['reference_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per objective and precision")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="runs/gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    sizes = recipe_sizes()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cuda": torch.version.cuda, "recipe": RECIPE, "sizes": sizes, "steps": {}, "loss": []}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        row = step_times(sizes, bf16, args.steps, args.warmup)
        row["syncs_per_step"] = syncs_per_step(sizes, bf16)
        result["steps"][name] = row
    result["loss"] = [loss_parity(grid) for grid in (16, 56)]
    result["seconds"] = time.monotonic() - start
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
