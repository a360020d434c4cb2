"""Evaluation of CAMs and pseudo masks against ground-truth masks (no logging here)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppc_core.cam import cams_to_masks, infer_cams
from ppc_core.metrics import confusion_matrix, iou_per_class, threshold_confusions

__all__ = ["DEFAULT_THRESHOLDS", "EvalResult", "best_threshold_index", "evaluate"]

# Background thresholds swept for the CAM mIoU: the whole range a max-normalised CAM can take.
# The reference sweeps 0.00-0.59, which caps the score whenever the best threshold lies above.
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101))


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
        "cams" (N,C,H,W), "masks" (N,H,W) at bg_threshold.
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


@torch.no_grad()
def evaluate(
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
    reduce: Callable[[Tensor], Tensor] | None = None,
    ignore_index: int = 255,
) -> EvalResult:
    """CAM mIoU (best background threshold) and pseudo-mask mIoU over a loader.

    model: CAM network, model(x).cam is (B, C+1, h, w); set to eval for the run, then restored.
    loader: yields dicts with "image" (B,3,H,W), "label" (B,C) multi-hot, "mask" (B,H,W) int.
    num_classes: C, the number of foreground classes (matrices are (C+1, C+1)).
    thresholds: (T,) background thresholds swept for cam_miou; default DEFAULT_THRESHOLDS
        (0.00, 0.01, ..., 1.00). A best threshold at either end of the sweep sets
        best_threshold_at_edge and warns.
    reduce: sums a tensor over processes (e.g. accelerator.reduce); applied once to the
        accumulated confusion counts, so every process returns the global scores. Samples stay
        local to each process.
    """
    if num_classes < 1:
        raise ValueError(f"evaluate: num_classes must be >= 1, got {num_classes}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"evaluate: max_batches must be >= 1 or None, got {max_batches}")
    if thresholds is None:
        thresholds = torch.tensor(DEFAULT_THRESHOLDS)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if thresholds.numel() == 0:
        raise ValueError("evaluate: thresholds must not be empty")
    device = torch.device(device) if device is not None else _model_device(model)
    k = num_classes + 1

    sweep = torch.zeros(thresholds.numel(), k, k, dtype=torch.long, device=device)
    pseudo = torch.zeros(k, k, dtype=torch.long, device=device)
    samples: dict[str, list[Tensor]] = {"images": [], "targets": [], "cams": [], "masks": []}
    taken = num_images = 0

    was_training = model.training
    model.eval()
    try:
        batches = islice(loader, max_batches) if max_batches is not None else loader
        bar = tqdm(batches, total=_total(loader, max_batches), disable=not progress,
                   desc="eval", leave=False)
        for batch in bar:
            images = batch["image"].to(device)
            labels = batch["label"].to(device)
            target = batch["mask"].to(device)
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
            if taken < num_samples:
                n = min(num_samples - taken, images.shape[0])
                for key, value in zip(samples, (images, target, cams, masks), strict=True):
                    samples[key].append(value[:n].cpu())
                taken += n
    finally:
        model.train(was_training)

    if reduce is not None:
        # one collective for both accumulators
        both = reduce(torch.cat([sweep, pseudo[None]], dim=0))
        sweep, pseudo = both[:-1], both[-1]
        num_images = int(reduce(torch.tensor([num_images], device=device)).item())
    sweep_iou = iou_per_class(sweep.cpu())
    sweep_miou = sweep_iou.nanmean(dim=-1)
    best, at_edge = best_threshold_index(thresholds, sweep_miou)
    if at_edge:
        warnings.warn(f"evaluate: the best background threshold {float(thresholds[best]):.2f} is "
                      "at the edge of the sweep; the CAM mIoU may be a lower bound", stacklevel=3)
    pseudo_iou = iou_per_class(pseudo.cpu())
    return EvalResult(
        cam_miou=float(sweep_miou[best]),
        best_threshold=round(float(thresholds[best]), 6),
        pseudo_miou=float(pseudo_iou.nanmean()),
        per_class_iou=_none_for_nan(sweep_iou[best]),
        pseudo_per_class_iou=_none_for_nan(pseudo_iou),
        thresholds=[round(float(t), 6) for t in thresholds],
        threshold_mious=sweep_miou.tolist(),
        best_threshold_at_edge=at_edge,
        num_images=num_images,
        samples={key: torch.cat(parts) for key, parts in samples.items() if parts},
    )
