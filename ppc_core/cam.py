"""CAM inference (multi-scale + horizontal flip) and pseudo masks from CAMs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cams_to_masks", "infer_cams"]


@torch.no_grad()
def infer_cams(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    flip: bool = True,
) -> Tensor:
    """Foreground CAMs summed over scales and flips, max-normalised per image and class.

    model: model(x, project=False, refine=False) maps (B, 3, h, w) to an object whose .cam is
        (B, C+1, h', w'), channel 0 background (CAMNet's flags: CAMs need neither the projector
        nor PCM, so neither runs at any scale); run in whatever train/eval mode the caller set.
    images: (B, 3, H, W)
    returns: (B, C, H, W) in [0, 1) (divided by max + 1e-5; an all-zero class stays 0).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"cam.infer_cams: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ValueError(f"cam.infer_cams: scales must be a non-empty list of > 0, got {scales}")
    b, _, h, w = images.shape
    total: Tensor | None = None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images if size == (h, w) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )
        if flip:
            # one forward pass for both orientations
            x = torch.cat([x, x.flip(-1)], dim=0)
        cam = model(x, project=False, refine=False).cam
        if cam.ndim != 4 or cam.shape[0] != x.shape[0] or cam.shape[1] < 2:
            raise ValueError(
                f"cam.infer_cams: model(x).cam must be (B, C+1, h, w) with C >= 1, "
                f"got {tuple(cam.shape)}"
            )
        fg = F.interpolate(
            F.relu(cam[:, 1:].float()), size=(h, w), mode="bilinear", align_corners=False
        )
        if flip:
            fg = fg[:b] + fg[b:].flip(-1)
        total = fg if total is None else total + fg
    assert total is not None
    peak = total.amax(dim=(2, 3), keepdim=True)
    return total / (peak + 1e-5)


def cams_to_masks(cams: Tensor, labels: Tensor, bg_threshold: float) -> Tensor:
    """Pseudo masks: the best present class, background where no class beats bg_threshold.

    cams: (B, C, H, W) foreground CAMs in [0, 1]
    labels: (B, C) multi-hot image labels (absent classes are zeroed)
    returns: (B, H, W) int64, 0 = background, c = class c (1-based). Ties go to background.
    """
    if cams.ndim != 4:
        raise ValueError(f"cam.cams_to_masks: cams must be (B, C, H, W), got {tuple(cams.shape)}")
    b, c, h, w = cams.shape
    if labels.shape != (b, c):
        raise ValueError(f"cam.cams_to_masks: labels must be ({b}, {c}), got {tuple(labels.shape)}")
    scores = cams * labels.to(cams.dtype)[:, :, None, None]
    bg = torch.full((b, 1, h, w), bg_threshold, dtype=cams.dtype, device=cams.device)
    return torch.cat([bg, scores], dim=1).argmax(dim=1)
