"""SEAM loss terms (Wang et al., CVPR 2020) as used by the PPC reference, channel 0 = background.

All maps of two views must already lie on a common grid (see ppc_core.data.views.align_to_target).
The reference max-normalises the source view before resizing it; here the caller aligns first and
normalisation follows, which differs only by interpolation at the per-class extremes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_cam(cam: Tensor, arg: str, fn: str) -> None:
    if cam.dim() != 4 or cam.shape[1] < 2:
        raise ValueError(f"{fn}: {arg} must be (B, C+1, h, w) with C >= 1, got {tuple(cam.shape)}")


def _check_labels(cam: Tensor, labels: Tensor, fn: str) -> None:
    b, k = cam.shape[:2]
    if labels.shape != (b, k - 1):
        raise ValueError(
            f"{fn}: labels must be (B, C) = {(b, k - 1)} to match a (B, C+1, h, w) map, "
            f"got {tuple(labels.shape)}"
        )


def _check_same(a: Tensor, b: Tensor, names: str, fn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {names} must have the same shape (align the views first), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _with_background(labels: Tensor) -> Tensor:
    """labels: (B, C) -> (B, C+1, 1, 1) with a leading 1 for the always-present background."""
    ones = torch.ones_like(labels[:, :1])
    return torch.cat([ones, labels], dim=1)[..., None, None]


def max_norm(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """cam: (B, K, h, w) -> (B, K, h, w): relu, then per image and channel min-max to [0, 1]
    (values at the minimum become 0)."""
    if cam.dim() != 4:
        raise ValueError(f"max_norm: cam must be (B, K, h, w), got {tuple(cam.shape)}")
    flat = F.relu(cam).flatten(2)
    lo, hi = flat.aminmax(dim=2, keepdim=True)
    return (F.relu(flat - lo - eps) / (hi - lo + eps)).view_as(cam)


def classification_loss(cam: Tensor, labels: Tensor) -> Tensor:
    """cam: (B, C+1, h, w) raw scores, labels: (B, C) multi-hot -> scalar multilabel soft margin
    loss on the global average pool of the foreground channels 1..C."""
    _check_cam(cam, "cam", "classification_loss")
    _check_labels(cam, labels, "classification_loss")
    logits = cam[:, 1:].mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def min_pool_loss(cam_rv: Tensor, labels: Tensor | None = None, ratio: float = 0.25) -> Tensor:
    """SEAM's adaptive min-pooling: mean of relu over the lowest `ratio` of the per-pixel
    max-over-class scores, i.e. push the least confident pixels towards zero.

    cam_rv: (B, K, h, w). With labels (B, C) the map must be (B, C+1, h, w) and, as in the
    reference, only the foreground channels of present classes are pooled.
    """
    if cam_rv.dim() != 4:
        raise ValueError(f"min_pool_loss: cam_rv must be (B, K, h, w), got {tuple(cam_rv.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"min_pool_loss: ratio must be in (0, 1], got {ratio}")
    if labels is not None:
        _check_cam(cam_rv, "cam_rv", "min_pool_loss")
        _check_labels(cam_rv, labels, "min_pool_loss")
        cam_rv = cam_rv[:, 1:] * labels[..., None, None].to(cam_rv.dtype)
    score = cam_rv.amax(dim=1).flatten(1)  # (B, hw)
    k = max(1, int(score.shape[1] * ratio))
    lowest = torch.topk(score, k, dim=1, largest=False).values
    return F.relu(lowest).mean()


def equivariant_reg(cam_a: Tensor, cam_b: Tensor, labels: Tensor) -> Tensor:
    """SEAM's equivariant regularisation (ER).

    cam_a: (B, C+1, h, w) view a's CAM aligned onto b's grid, cam_b: (B, C+1, h, w),
    labels: (B, C) -> scalar mean |max_norm(a) - max_norm(b)| over the foreground channels,
    absent classes zeroed.
    """
    _check_cam(cam_a, "cam_a", "equivariant_reg")
    _check_same(cam_a, cam_b, "cam_a and cam_b", "equivariant_reg")
    _check_labels(cam_a, labels, "equivariant_reg")
    lab = labels[..., None, None].to(cam_a.dtype)
    a = max_norm(cam_a)[:, 1:] * lab
    b = max_norm(cam_b)[:, 1:] * lab
    return (a - b).abs().mean()


def _normalised_with_background(cam: Tensor, label_bg: Tensor) -> Tensor:
    """cam: (B, C+1, h, w) -> max-normalised, label-masked map whose channel 0 is 1 - max fg."""
    norm = max_norm(cam) * label_bg
    return torch.cat([1.0 - norm[:, 1:].amax(dim=1, keepdim=True), norm[:, 1:]], dim=1)


def max_onehot(cam: Tensor) -> Tensor:
    """cam: (B, C+1, h, w) -> same map with every foreground score except each pixel's largest
    one set to 0; the background channel is kept."""
    fg = cam[:, 1:]
    top = fg.amax(dim=1, keepdim=True)
    return torch.cat([cam[:, :1], torch.where(fg == top, fg, torch.zeros_like(fg))], dim=1)


def equivariant_cross_reg(
    cam_a: Tensor,
    cam_b: Tensor,
    cam_rv_a: Tensor,
    cam_rv_b: Tensor,
    labels: Tensor,
    top_ratio: float = 0.2,
) -> Tensor:
    """SEAM's equivariant cross regularisation (ECR): each view's PCM output should match the
    other view's (detached) CAM turned into a hard map; only the worst `top_ratio` of the
    (C+1)*h*w errors per image count. Both directions are summed, as in the reference.

    cam_a, cam_b, cam_rv_a, cam_rv_b: (B, C+1, h, w) on a common grid; labels: (B, C).
    Returns a scalar; gradients reach only cam_rv_a and cam_rv_b.
    """
    fn = "equivariant_cross_reg"
    _check_cam(cam_a, "cam_a", fn)
    for other, name in ((cam_b, "cam_b"), (cam_rv_a, "cam_rv_a"), (cam_rv_b, "cam_rv_b")):
        _check_same(cam_a, other, f"cam_a and {name}", fn)
    _check_labels(cam_a, labels, fn)
    if not 0.0 < top_ratio <= 1.0:
        raise ValueError(f"{fn}: top_ratio must be in (0, 1], got {top_ratio}")
    label_bg = _with_background(labels.to(cam_a.dtype))
    target_for_a = max_onehot(_normalised_with_background(cam_b.detach(), label_bg))
    target_for_b = max_onehot(_normalised_with_background(cam_a.detach(), label_bg))
    rv_a = max_norm(cam_rv_a) * label_bg
    rv_b = max_norm(cam_rv_b) * label_bg
    err = torch.stack([(target_for_a - rv_a).abs(), (target_for_b - rv_b).abs()])  # (2, B, K, h, w)
    err = err.flatten(2)
    k = max(1, int(err.shape[2] * top_ratio))
    return torch.topk(err, k, dim=2).values.mean(dim=(1, 2)).sum()
