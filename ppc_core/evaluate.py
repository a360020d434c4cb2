"""Evaluation of CAMs and pseudo masks against ground-truth masks (no logging here)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppc_core.cam import cams_to_masks, infer_cams
from ppc_core.metrics import confusion_matrix, iou_per_class, threshold_confusions

__all__ = ["DEFAULT_THRESHOLDS", "EvalCounts", "EvalResult", "accumulate", "best_threshold_index",
           "evaluate", "summarise", "threshold_grid"]

# Background thresholds swept for the CAM mIoU: the whole range a max-normalised CAM can take.
# The reference sweeps 0.00-0.59, which caps the score whenever the best threshold lies above.
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101))


def threshold_grid() -> Tensor:
    """The background thresholds swept for cam_miou by default: DEFAULT_THRESHOLDS as (T,)."""
    return torch.tensor(DEFAULT_THRESHOLDS)


@dataclass
class EvalResult:
    """Scores in [0, 1]; IoU lists have C+1 entries (background first), None for absent classes.

    cam_miou / per_class_iou / best_threshold: CAM masks at the best background threshold of the
    sweep (the "curve" number reference evaluations report).
    pseudo_miou / pseudo_per_class_iou: masks at the fixed bg_threshold.
    threshold_mious: mIoU for each swept threshold, in the order of `thresholds`.
    best_threshold_at_edge: the best threshold is the lowest or highest swept one, so cam_miou
        may be a lower bound (a wider sweep could score higher).
    num_images: images evaluated (over all processes when a reduce is given).
    samples: CPU tensors of the first items: "images" (N,3,H,W), "targets" (N,H,W),
        "cams" (N,C,H,W), "masks" (N,H,W) at bg_threshold; items of another size than the
        first are scaled to fit its (H, W) and padded (see `_fit`).
    """

    cam_miou: float
    best_threshold: float
    pseudo_miou: float
    per_class_iou: list[float | None]
    pseudo_per_class_iou: list[float | None] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    threshold_mious: list[float] = field(default_factory=list)
    best_threshold_at_edge: bool = False
    num_images: int = 0
    samples: dict[str, Tensor] = field(default_factory=dict)


def _none_for_nan(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def best_threshold_index(thresholds: Tensor, mious: Tensor) -> tuple[int, bool]:
    """thresholds, mious: (T,). The index of the best mIoU (NaN never wins, ties go to the first)
    and whether that threshold is the sweep's lowest or highest (T > 1 only)."""
    best = int(torch.nan_to_num(mious, nan=-1.0).argmax())
    value = thresholds[best]
    at_edge = thresholds.numel() > 1 and bool(value == thresholds.min() or value == thresholds.max())
    return best, at_edge


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _total(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _fit(x: Tensor, size: tuple[int, int], fill: float) -> Tensor:
    """x: (h, w) int map or (K, h, w) float maps -> the same on `size`: scaled to fit inside it
    with its aspect kept (nearest for int maps, bilinear otherwise), padded right/bottom with
    `fill`. VOC's images differ in size and orientation; the overlay grid needs one size."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    ratio = min(size[0] / h, size[1] / w)
    new = (max(1, min(size[0], round(h * ratio))), max(1, min(size[1], round(w * ratio))))
    if x.dtype.is_floating_point:
        y = F.interpolate(x[None], size=new, mode="bilinear", align_corners=False)[0]
    else:
        y = F.interpolate(x[None, None].float(), size=new, mode="nearest")[0, 0].to(x.dtype)
    out = x.new_full((*x.shape[:-2], *size), fill)
    out[..., : new[0], : new[1]] = y
    return out


@dataclass
class EvalCounts:
    """What `accumulate` adds up over a loader (one process's share of the evaluation).

    sweep: (T, C+1, C+1) int64 confusion counts (truth rows, prediction columns), one matrix per
        background threshold; pseudo: (C+1, C+1) the same at the fixed bg_threshold.
    num_images: images counted; samples: see `EvalResult.samples` (local, never reduced).
    """

    sweep: Tensor
    pseudo: Tensor
    num_images: int
    samples: dict[str, Tensor] = field(default_factory=dict)

    def reduced(self, reduce: Callable[[Tensor], Tensor]) -> EvalCounts:
        """The counts summed over processes by `reduce` (e.g. accelerator.reduce with "sum"),
        in one collective; samples stay this process's."""
        k = self.pseudo.shape[0]
        flat = torch.cat([self.sweep.flatten(), self.pseudo.flatten(),
                          self.pseudo.new_tensor([self.num_images])])
        flat = reduce(flat)
        t = self.sweep.shape[0]
        return EvalCounts(flat[: t * k * k].view(t, k, k), flat[t * k * k : -1].view(k, k),
                          int(flat[-1]), self.samples)


@torch.no_grad()
def accumulate(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    bg_threshold: float = 0.2,
    thresholds: Tensor | None = None,
    max_batches: int | None = None,
    num_samples: int = 8,
    progress: bool = True,
    device: torch.device | str | None = None,
    ignore_index: int = 255,
) -> EvalCounts:
    """Confusion counts of CAM masks (per background threshold) and pseudo masks over a loader.

    model: CAM network, model(x, project=False, refine=False).cam is (B, C+1, h, w); set to
        eval for the run, then restored.
    loader: yields dicts with "image" (B,3,H,W), "label" (B,C) multi-hot, "mask" (B,H,W) int.
    num_classes: C, the number of foreground classes (matrices are (C+1, C+1)).
    thresholds: (T,) background thresholds; default `threshold_grid()` (0.00, 0.01, ..., 1.00).
    """
    if num_classes < 1:
        raise ValueError(f"evaluate: num_classes must be >= 1, got {num_classes}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"evaluate: max_batches must be >= 1 or None, got {max_batches}")
    thresholds = _thresholds(thresholds)
    device = torch.device(device) if device is not None else _model_device(model)
    k = num_classes + 1
    sweep = torch.zeros(thresholds.numel(), k, k, dtype=torch.long, device=device)
    pseudo = torch.zeros(k, k, dtype=torch.long, device=device)
    samples: dict[str, list[Tensor]] = {"images": [], "targets": [], "cams": [], "masks": []}
    num_images, fill = 0, {"images": 0.0, "targets": ignore_index, "cams": 0.0,
                           "masks": ignore_index}
    copy = device.type == "cuda"  # pinned host memory copies asynchronously

    was_training = model.training
    model.eval()
    try:
        batches = islice(loader, max_batches) if max_batches is not None else loader
        bar = tqdm(batches, total=_total(loader, max_batches), disable=not progress,
                   desc="eval", leave=False)
        for batch in bar:
            images = batch["image"].to(device, non_blocking=copy)
            labels = batch["label"].to(device, non_blocking=copy)
            target = batch["mask"].to(device, non_blocking=copy)
            cams = infer_cams(model, images, scales=scales, flip=flip)
            if cams.shape[1] != num_classes:
                raise ValueError(
                    f"evaluate: model gives {cams.shape[1]} foreground CAM channels, "
                    f"num_classes is {num_classes}"
                )
            masks = cams_to_masks(cams, labels, bg_threshold)
            pseudo += confusion_matrix(masks, target, k, ignore_index)
            sweep += threshold_confusions(cams, labels, target, thresholds.to(device),
                                          ignore_index)
            num_images += images.shape[0]
            taken = sum(len(part) for part in samples["images"])
            for i in range(min(num_samples - taken, images.shape[0])):
                size = tuple((samples["images"] or [images])[0].shape[-2:])
                for key, value in zip(samples, (images, target, cams, masks), strict=True):
                    samples[key].append(_fit(value[i].cpu(), size, fill[key])[None])
    finally:
        model.train(was_training)
    return EvalCounts(sweep, pseudo, num_images,
                      {key: torch.cat(parts) for key, parts in samples.items() if parts})


def _thresholds(thresholds: Tensor | None) -> Tensor:
    grid = threshold_grid() if thresholds is None else thresholds
    grid = torch.as_tensor(grid, dtype=torch.float32).reshape(-1)
    if grid.numel() == 0:
        raise ValueError("evaluate: thresholds must not be empty")
    return grid


def summarise(counts: EvalCounts, thresholds: Tensor | None = None) -> EvalResult:
    """Scores of (already reduced) counts: the best background threshold's mIoU, the pseudo
    masks' mIoU, per-class IoUs. thresholds: those `counts` were accumulated with."""
    thresholds = _thresholds(thresholds)
    if thresholds.numel() != counts.sweep.shape[0]:
        raise ValueError(f"evaluate: {thresholds.numel()} thresholds for "
                         f"{counts.sweep.shape[0]} confusion matrices")
    sweep_iou = iou_per_class(counts.sweep.cpu())
    sweep_miou = sweep_iou.nanmean(dim=-1)
    best, at_edge = best_threshold_index(thresholds, sweep_miou)
    if at_edge:
        warnings.warn(f"evaluate: the best background threshold {float(thresholds[best]):.2f} is "
                      "at the edge of the sweep; the CAM mIoU may be a lower bound", stacklevel=3)
    pseudo_iou = iou_per_class(counts.pseudo.cpu())
    return EvalResult(
        cam_miou=float(sweep_miou[best]),
        best_threshold=round(float(thresholds[best]), 6),
        pseudo_miou=float(pseudo_iou.nanmean()),
        per_class_iou=_none_for_nan(sweep_iou[best]),
        pseudo_per_class_iou=_none_for_nan(pseudo_iou),
        thresholds=[round(float(t), 6) for t in thresholds],
        threshold_mious=sweep_miou.tolist(),
        best_threshold_at_edge=at_edge,
        num_images=counts.num_images,
        samples=counts.samples,
    )


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    thresholds: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> EvalResult:
    """CAM mIoU (best background threshold) and pseudo-mask mIoU: `accumulate` over this
    process's loader, `reduce` the counts over processes, `summarise`.

    reduce: sums a tensor over processes (e.g. accelerator.reduce(t, "sum")); every process then
        returns the global scores. Give each process its share of the split (sampler.EvalShard):
        the counts are integers, so any split of the images gives the one-process scores exactly.
    options: `accumulate`'s keyword arguments (scales, flip, bg_threshold, max_batches,
        num_samples, progress, device, ignore_index).
    """
    thresholds = _thresholds(thresholds)
    counts = accumulate(model, loader, num_classes, thresholds=thresholds, **options)
    if reduce is not None:
        counts = counts.reduced(reduce)
    return summarise(counts, thresholds)
