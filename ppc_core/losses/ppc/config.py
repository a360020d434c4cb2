"""`PPCConfig`: the `ppc.*` section of the training config, and the input checks of the package.

Every constant of the authors' reference code is a field here; docs/method.md maps each one to
the paper and to the function that reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

IMPLS = ("reference", "fused")


@dataclass
class PPCConfig:
    """The PPC regulariser's knobs, defaults from the reference code."""

    # "fused": the fast engine (fused.py); "reference": the readable autograd terms (terms.py).
    # Same values and gradients (tests/losses/test_impls.py); fused is ~10x faster at 56x56.
    impl: str = "fused"
    tau: float = 0.1
    # K = top_k_ratio * (pixels of one image on the loss grid): 16x16 // 8 = 32 in the reference.
    top_k_ratio: float = 0.125
    bg_threshold: float = 0.20
    # The terms' weights. PPCLoss returns the terms unweighted: `Objective` applies these
    # (as `PPCWeights`, built by experiments/train.py), beside SEAM's weights.
    w_cross_proto: float = 0.1
    w_cross_cam: float = 0.1
    w_intra: float = 0.1
    # Semi-hard prototype mining: drop the `neg_drop` nearest prototypes, keep the next
    # round(neg_keep_ratio * C) of the C prototypes (3 and 10 of 21 in the reference).
    neg_drop: int = 3
    neg_keep_ratio: float = 10 / 21
    # Hard pixel sampling per class: a random share plus a similarity-rank window (hardest first).
    hard_random_ratio: float = 0.5
    hard_rank_lo: float = 0.1
    hard_rank_hi: float = 0.6
    # "complement": background confidence = 1 - max foreground (ours); "reference": the constant
    # bg_threshold channel and unmasked class maps, as the reference ranks them.
    prototype_ranking: str = "complement"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {self.impl!r}")
        check_positive("tau", self.tau)
        for name in ("top_k_ratio", "neg_keep_ratio", "hard_random_ratio", "hard_rank_hi"):
            _check_unit_interval(name, getattr(self, name))
        if not 0.0 <= self.hard_rank_lo < self.hard_rank_hi:
            raise ValueError(
                f"hard_rank_lo must be in [0, hard_rank_hi={self.hard_rank_hi}), got {self.hard_rank_lo}"
            )
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise ValueError(f"bg_threshold must be in [0, 1], got {self.bg_threshold}")
        for name in ("w_cross_proto", "w_cross_cam", "w_intra"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.neg_drop < 0:
            raise ValueError(f"neg_drop must be >= 0, got {self.neg_drop}")
        if self.prototype_ranking not in ("complement", "reference"):
            raise ValueError(
                "prototype_ranking must be 'complement' or 'reference', "
                f"got {self.prototype_ranking!r}"
            )

    def top_k(self, height: int, width: int) -> int:
        """K, the pixels per prototype, for one image's `height x width` loss grid."""
        return top_k_for(height, width, self.top_k_ratio)

    def neg_keep(self, num_classes: int) -> int:
        """How many semi-hard negatives each pixel keeps among `num_classes` prototypes."""
        return max(1, round(self.neg_keep_ratio * num_classes))


def top_k_for(height: int, width: int, ratio: float) -> int:
    """K for one image's `height x width` grid: the reference's h*w // 8 at ratio 1/8."""
    return max(1, int(height * width * ratio))


def check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def check_finite(name: str, x: Tensor) -> None:
    """Raise a ValueError naming `name` if x holds a NaN or inf.

    One reduction instead of an elementwise test: NaN or inf anywhere makes the sum non-finite.
    The sum accumulates in float32 at least: an fp16 sum of finite values overflows past 65504
    (a 16x16 CAM batch of scores around -6 does).
    """
    if not math.isfinite(x.detach().sum(dtype=compute_dtype(x))):
        raise ValueError(f"{name} contains NaN or inf values")


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype if it is float32 or wider, else float32: the dtype of the loss's arithmetic."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def validate_cam_labels(cam: Tensor, labels: Tensor) -> None:
    """cam (B, C, H, W) with channel 0 = background, labels (B, C-1) with a foreground each."""
    if cam.dim() != 4:
        raise ValueError(f"cam must be (B, C, H, W), got shape {tuple(cam.shape)}")
    if labels.dim() != 2 or labels.shape[0] != cam.shape[0] or labels.shape[1] + 1 != cam.shape[1]:
        raise ValueError(
            f"labels must be (B, C-1) = ({cam.shape[0]}, {cam.shape[1] - 1}) to match cam "
            f"{tuple(cam.shape)}, got {tuple(labels.shape)}"
        )
    has_fg = labels.any(dim=1)
    if not has_fg.all():
        bad = (~has_fg).nonzero().flatten().tolist()
        raise ValueError(f"labels: images {bad} have no foreground class")


def check_contrast_inputs(feats: Tensor, y: Tensor, prototypes: Tensor, tau: float) -> None:
    """feats (N, D), y (N,) in [0, C), prototypes (C, D), tau > 0, feats finite."""
    check_positive("tau", tau)
    if feats.dim() != 2 or prototypes.dim() != 2 or feats.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"feats must be (N, D) and prototypes (C, D); got {tuple(feats.shape)} and "
            f"{tuple(prototypes.shape)}"
        )
    if y.shape != feats.shape[:1]:
        raise ValueError(f"y must be (N,) = ({feats.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= prototypes.shape[0]):
        raise ValueError(f"y must be in [0, {prototypes.shape[0]}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    check_finite("feats", feats)
