"""Segmentation metrics: confusion matrices, IoU and the background-threshold sweep.

Confusion matrices are (K, K) int64 counts with rows = ground truth and columns = prediction,
so results from several batches (or processes) combine by plain addition.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "iou_per_class", "miou", "threshold_confusions"]


def _check_int(name: str, x: Tensor) -> None:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"metrics: {name} must be an integer tensor, got dtype {x.dtype}")


def _check_range(name: str, x: Tensor, num_classes: int) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
        raise ValueError(
            f"metrics: {name} values must lie in [0, {num_classes}) (ignore label excepted), "
            f"got min {int(x.min())}, max {int(x.max())}"
        )


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Count (target, prediction) pairs.

    pred: (...,) int class ids in [0, num_classes)
    target: (...,) int class ids in [0, num_classes) or ignore_index, same shape as pred
    returns: (num_classes, num_classes) int64 on pred's device, rows = target, columns = pred.
    Pixels whose target is ignore_index are skipped (their prediction is not checked).
    """
    if num_classes < 1:
        raise ValueError(f"metrics.confusion_matrix: num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(
            f"metrics.confusion_matrix: pred shape {tuple(pred.shape)} != target shape "
            f"{tuple(target.shape)}"
        )
    _check_int("pred", pred)
    _check_int("target", target)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    _check_range("pred", pred, num_classes)
    _check_range("target", target, num_classes)
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU = TP / (TP + FP + FN) of every class, batched over leading dims.

    conf: (..., K, K) counts, rows = target
    returns: (..., K) float64; NaN where the class is absent from both target and prediction.
    """
    if conf.ndim < 2 or conf.shape[-1] != conf.shape[-2]:
        raise ValueError(f"metrics: conf must be (..., K, K), got shape {tuple(conf.shape)}")
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def miou(conf: Tensor) -> tuple[float, Tensor]:
    """Mean IoU over the classes that occur in the target or the prediction.

    conf: (K, K) counts, rows = target
    returns: (mean, per_class (K,) float64 with NaN for absent classes). mean is NaN when no
    class occurs at all.
    """
    if conf.ndim != 2:
        raise ValueError(f"metrics.miou: conf must be (K, K), got shape {tuple(conf.shape)}")
    per_class = iou_per_class(conf)
    return float(per_class.nanmean()), per_class


def threshold_confusions(
    cams: Tensor,
    labels: Tensor,
    target: Tensor,
    thresholds: Tensor,
    ignore_index: int = 255,
) -> Tensor:
    """Confusion matrices of the CAM pseudo masks for every background threshold at once.

    cams: (B, C, H, W) foreground CAMs in [0, 1]
    labels: (B, C) multi-hot image labels
    target: (B, H, W) int ground truth in [0, C] or ignore_index
    thresholds: (T,) background scores
    returns: (T, C+1, C+1) int64, entry t equal to
        confusion_matrix(cams_to_masks(cams, labels, thresholds[t]), target, C + 1).

    The foreground winner of a pixel does not depend on the threshold; only whether it beats
    the background does. So each pixel falls into one bucket "number of thresholds strictly
    below its best foreground score", one bincount builds a (T+1, C+1, C+1) histogram, and
    prefix/suffix sums over the buckets give every threshold's matrix. Memory is
    O(B*H*W + T*C^2) instead of the O(T*B*H*W) of materialising T masks.
    """
    if cams.ndim != 4:
        raise ValueError(f"metrics: cams must be (B, C, H, W), got shape {tuple(cams.shape)}")
    b, c, h, w = cams.shape
    if labels.shape != (b, c):
        raise ValueError(f"metrics: labels must be ({b}, {c}), got {tuple(labels.shape)}")
    if target.shape != (b, h, w):
        raise ValueError(f"metrics: target must be ({b}, {h}, {w}), got {tuple(target.shape)}")
    if thresholds.ndim != 1 or thresholds.numel() == 0:
        raise ValueError(f"metrics: thresholds must be (T,), T >= 1, got {tuple(thresholds.shape)}")
    _check_int("target", target)
    k = c + 1
    scores = cams * labels.to(cams.dtype)[:, :, None, None]
    # argmax picks the first maximum, exactly as in cams_to_masks.
    fg_score, fg_idx = scores.max(dim=1)
    target = target.to(cams.device).long()
    keep = target != ignore_index
    fg_score, fg_idx, target = fg_score[keep], fg_idx[keep] + 1, target[keep]
    _check_range("target", target, k)

    thr = thresholds.to(device=cams.device, dtype=cams.dtype)
    sorted_thr, order = thr.sort()
    t = thr.numel()
    # bucket = #thresholds strictly below the score; a tie goes to background, like argmax.
    bucket = torch.bucketize(fg_score.contiguous(), sorted_thr, right=False)
    hist = torch.bincount((bucket * k + target) * k + fg_idx, minlength=(t + 1) * k * k)
    hist = hist.reshape(t + 1, k, k)
    # threshold j (sorted) keeps the foreground of buckets > j, the rest becomes background.
    fg_kept = hist.flip(0).cumsum(0).flip(0)[1:]
    bg = hist.sum(-1).cumsum(0)[:-1]
    conf = fg_kept.clone()
    conf[:, :, 0] = bg
    out = torch.empty_like(conf)
    out[order] = conf
    return out
