"""The second (target) view and the alignment of source-view maps onto it.

The reference builds the target view by bilinearly resizing the source crop to 128x128; any map
of the source view (CAM, projected features) is then resized to the target's feature grid so that
pixel i of both maps looks at the same image location. A horizontal flip can be composed on top
(invertible, so both maps stay in correspondence).

Convention: ``align_corners=False`` everywhere. It treats a map of size h over an image of size H
as h cells of H/h pixels with centres at (i + 0.5) * H/h, which is the geometry of a stride-s
feature map (H = s*h); with it, resizing the image and resizing its feature map commute. The
reference code uses ``align_corners=True``; the two differ by under half a feature cell.
No antialiasing, as in the reference (the downscale 448 -> 128 aliases a little).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_view(images: torch.Tensor, size: int, flip: bool = False) -> torch.Tensor:
    """images: (B, 3, H, W) -> (B, 3, size, size) bilinear rescale, mirrored left-right if flip."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return out.flip(-1) if flip else out


def align_to_target(maps: torch.Tensor, grid: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """maps: (B, K, h, w) source-view maps -> (B, K, *grid) on the target view's feature grid.

    Use the same ``flip`` as for ``target_view`` so that pixel i of the result corresponds to
    pixel i of the target view's map.
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (B, K, h, w), got shape {tuple(maps.shape)}")
    if len(grid) != 2 or min(grid) <= 0:
        raise ValueError(f"grid must be two positive ints (h, w), got {grid}")
    out = maps
    if tuple(maps.shape[-2:]) != tuple(grid):
        out = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
    return out.flip(-1) if flip else out
