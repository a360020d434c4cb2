"""SEAM's pixel correlation module (PCM): refine a CAM by propagating it along a pixel affinity.

The affinity comes from low-level backbone features plus the (resized) image, so the refined
map follows colour and texture edges the coarse CAM misses. Each refined pixel is a convex
combination of the seed CAM's pixels (affinity columns sum to ~1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pcm_seed(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """The CAM SEAM feeds to PCM: relu, per-image max normalisation, background = 1 - max fg,
    and every foreground score below that pixel's top foreground score zeroed.

    cam: (B, C+1, h, w) raw scores, channel 0 = background (its raw value is ignored)
    returns (B, C+1, h, w) in [0, 1], no gradient (PCM learns only the affinity).
    """
    if cam.dim() != 4 or cam.shape[1] < 2:
        raise ValueError(
            f"pcm_seed: cam must be (B, C+1, h, w) with C >= 1, got {tuple(cam.shape)}"
        )
    with torch.no_grad():
        fg = F.relu(cam[:, 1:].detach())
        peak = fg.flatten(2).amax(dim=2)[..., None, None] + eps
        fg = F.relu(fg - eps) / peak
        top = fg.amax(dim=1, keepdim=True)
        fg = torch.where(fg < top, torch.zeros_like(fg), fg)
        return torch.cat([1.0 - top, fg], dim=1)


class PCM(nn.Module):
    """Pixel correlation module.

    low_channels: channels of the backbone's `low` features.
    low_dim: width each pixel's low-level features are projected to before the image is appended.
    aff_dim: width of the embedding whose cosine similarity gives the affinity.
    """

    def __init__(self, low_channels: int, low_dim: int = 192, aff_dim: int = 192) -> None:
        super().__init__()
        if low_channels < 1:
            raise ValueError(f"PCM: low_channels must be >= 1, got {low_channels}")
        self.low_proj = nn.Conv2d(low_channels, low_dim, 1, bias=False)
        self.embed = nn.Conv2d(low_dim + 3, aff_dim, 1, bias=False)
        nn.init.kaiming_normal_(self.low_proj.weight)
        # A large initial gain makes the cosine affinity sharp from the start (as in SEAM).
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def affinity(self, low: Tensor, image: Tensor, eps: float = 1e-5) -> Tensor:
        """low: (B, Cl, h, w), image: (B, 3, H, W) -> (B, h*w, h*w) affinity A, where A[b, i, j] is
        the weight of source pixel i in refined pixel j; every column sums to ~1.

        `low` is detached: the affinity should not reshape the backbone's features.
        """
        b, _, h, w = low.shape
        img = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)
        f = torch.cat([img, F.relu(self.low_proj(low.detach()))], dim=1)
        f = self.embed(f).flatten(2)  # (B, D, hw)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        aff = F.relu(torch.bmm(f.transpose(1, 2), f))  # (B, hw, hw), cosine similarity >= 0
        return aff / (aff.sum(dim=1, keepdim=True) + eps)

    def forward(self, cam: Tensor, low: Tensor, image: Tensor) -> Tensor:
        """cam: (B, K, h, w) seed map (see `pcm_seed`), low: (B, Cl, h, w), image: (B, 3, H, W)
        -> cam_rv: (B, K, h, w)."""
        if cam.dim() != 4 or low.dim() != 4 or image.dim() != 4:
            raise ValueError("PCM: cam, low and image must be 4-d (B, C, h, w) tensors")
        if cam.shape[0] != low.shape[0] or cam.shape[0] != image.shape[0]:
            raise ValueError(
                f"PCM: batch sizes differ: cam {cam.shape[0]}, low {low.shape[0]}, "
                f"image {image.shape[0]}"
            )
        if cam.shape[-2:] != low.shape[-2:]:
            raise ValueError(
                f"PCM: cam grid {tuple(cam.shape[-2:])} != low grid {tuple(low.shape[-2:])}"
            )
        if image.shape[1] != 3:
            raise ValueError(f"PCM: image must have 3 channels, got {image.shape[1]}")
        b, k, h, w = cam.shape
        aff = self.affinity(low, image)
        return torch.bmm(cam.flatten(2), aff).view(b, k, h, w)
