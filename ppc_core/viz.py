"""Overlay grids for eyeballing CAMs and pseudo masks: image | truth | CAM | pseudo mask."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ppc_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["overlay_figure", "overlay_grid", "save_png", "voc_palette"]

_ALPHA = 0.5


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, class i coloured by spreading its bits over RGB."""
    if not 1 <= n <= 256:
        raise ValueError(f"viz.voc_palette: n must be in [1, 256], got {n}")
    ids = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            rgb[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return rgb.astype(np.uint8)


def _colour_masks(masks: Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    """masks: (N, H, W) ids in [0, num_classes] or ignore_index -> (N, H, W, 3) float in [0, 1]."""
    m = masks.detach().cpu().long()
    valid = (m == ignore_index) | ((m >= 0) & (m <= num_classes))
    if not bool(valid.all()):
        raise ValueError(
            f"viz: mask values must be in [0, {num_classes}] or {ignore_index}, "
            f"got min {int(m.min())}, max {int(m.max())}"
        )
    lut = np.zeros((num_classes + 2, 3), dtype=np.float32)
    lut[: num_classes + 1] = voc_palette(min(num_classes + 1, 256)) / 255.0
    lut[-1] = 1.0  # ignore shown white
    idx = torch.where(m == ignore_index, num_classes + 1, m).numpy()
    return lut[idx]


def overlay_grid(
    images: Tensor,
    targets: Tensor,
    cams: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """One row per item: image, ground-truth overlay, CAM heat map, pseudo-mask overlay.

    images: (N, 3, H, W) normalised with mean/std (ImageNet by default)
    targets, masks: (N, H, W) ids in [0, num_classes] or ignore_index
    cams: (N, C, H, W) in [0, 1]; the heat map shows the max over classes
    returns: (N*H, 4*W, 3) uint8
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"viz.overlay_grid: images must be (N, 3, H, W), got {tuple(images.shape)}"
        )
    n, _, h, w = images.shape
    for name, t in (("targets", targets), ("masks", masks)):
        if tuple(t.shape) != (n, h, w):
            raise ValueError(
                f"viz.overlay_grid: {name} must be ({n}, {h}, {w}), got {tuple(t.shape)}"
            )
    if cams.ndim != 4 or cams.shape[0] != n or tuple(cams.shape[2:]) != (h, w):
        raise ValueError(
            f"viz.overlay_grid: cams must be ({n}, C, {h}, {w}), got {tuple(cams.shape)}"
        )

    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    rgb = (images.detach().cpu().float() * std_t + mean_t).clamp(0, 1)
    rgb = rgb.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)

    heat = cams.detach().cpu().float().amax(dim=1).clamp(0, 1).numpy()
    heat_rgb = matplotlib.colormaps["jet"](heat)[..., :3]
    panels = [
        rgb,
        (1 - _ALPHA) * rgb + _ALPHA * _colour_masks(targets, num_classes, ignore_index),
        (1 - _ALPHA) * rgb + _ALPHA * heat_rgb,
        (1 - _ALPHA) * rgb + _ALPHA * _colour_masks(masks, num_classes, ignore_index),
    ]
    grid = np.concatenate(panels, axis=2).reshape(n * h, 4 * w, 3)
    return (grid * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG, creating parent folders; returns the path."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"viz.save_png: array must be (H, W, 3) uint8, got {array.shape} {array.dtype}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


COLUMNS = ("image", "ground truth", "CAM (max over classes)", "pseudo mask")


def overlay_figure(grid: np.ndarray, class_names: Sequence[str], path: str | Path,
                   tile_px: int = 160) -> Path:
    """Save an `overlay_grid` array readable: tiles scaled to about `tile_px` wide (nearest),
    the column titles above, and a legend of the class colours (background, classes, ignore)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if grid.ndim != 3 or grid.shape[1] % len(COLUMNS):
        raise ValueError(f"viz.overlay_figure: grid must be (H, 4*W, 3), got {grid.shape}")
    tile_w = grid.shape[1] // len(COLUMNS)
    scale = tile_px / tile_w
    dpi = 100
    width, height = grid.shape[1] * scale / dpi, grid.shape[0] * scale / dpi
    fig = plt.figure(figsize=(width, height + 0.7), dpi=dpi)
    ax = fig.add_axes((0, 0.7 / (height + 0.7), 1, height / (height + 0.7)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([(i + 0.5) * tile_w for i in range(len(COLUMNS))], COLUMNS)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=11)
    ax.set_yticks([])
    colours = voc_palette(len(class_names) + 1) / 255.0
    handles = [Patch(facecolor=colours[i], edgecolor="k", label=name)
               for i, name in enumerate(("background", *class_names))]
    handles.append(Patch(facecolor="white", edgecolor="k", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=9,
               frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
