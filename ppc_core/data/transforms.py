"""Joint image/mask transforms built on torchvision.transforms.v2.

Every pipeline takes a ``tv_tensors.Image`` (uint8, (3, H, W)) and a ``tv_tensors.Mask`` (uint8,
(H, W)) and returns the ImageNet-normalised float image and the mask; geometric steps move both,
photometric steps touch the image only (v2 dispatches on the tensor type).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

# Reference recipe (SEAM/PPC on VOC): long side resized to 448..768, then a 448 crop.
REFERENCE_CROP = 448
REFERENCE_LONG_RANGE = (448, 768)
REFERENCE_JITTER = (0.3, 0.3, 0.3, 0.1)


class RandomResizeLong(v2.Transform):
    """Resize so that the longer side is a random integer in [min_long, max_long] (aspect kept).

    Masks are resized with nearest neighbour (v2's mask kernel), images bilinearly.
    """

    def __init__(self, min_long: int, max_long: int) -> None:
        super().__init__()
        if not 0 < min_long <= max_long:
            raise ValueError(
                f"RandomResizeLong needs 0 < min_long <= max_long, got ({min_long}, {max_long})"
            )
        self.min_long = min_long
        self.max_long = max_long

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"long": int(torch.randint(self.min_long, self.max_long + 1, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, None, max_size=params["long"], antialias=True)


def _normalise() -> list[v2.Transform]:
    # A plain dtype converts only images/videos, so masks stay uint8 through this step.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform() -> v2.Compose:
    """No geometry: the image is only normalised, the mask is returned as is."""
    return v2.Compose(_normalise())


def flip_transform() -> v2.Compose:
    """Random horizontal flip (p=0.5) of image and mask, then normalisation."""
    return v2.Compose([v2.RandomHorizontalFlip(), *_normalise()])


def voc_train_transform(
    crop_size: int,
    long_range: tuple[int, int] | None = None,
    jitter: tuple[float, float, float, float] = REFERENCE_JITTER,
) -> v2.Compose:
    """The reference VOC training augmentation.

    Random long-side resize (default 448..768 scaled by crop_size/448), horizontal flip, colour
    jitter (brightness, contrast, saturation, hue), normalisation, then a random crop_size crop.
    Cropping after normalisation makes the image padding 0 in normalised space (the mean colour),
    as in the reference; the mask is padded with 255 (ignore).
    """
    if crop_size <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if long_range is None:
        scale = crop_size / REFERENCE_CROP
        long_range = (
            round(REFERENCE_LONG_RANGE[0] * scale),
            round(REFERENCE_LONG_RANGE[1] * scale),
        )
    brightness, contrast, saturation, hue = jitter
    return v2.Compose(
        [
            RandomResizeLong(*long_range),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness, contrast, saturation, hue),
            *_normalise(),
            v2.RandomCrop(
                crop_size,
                pad_if_needed=True,
                fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX},
            ),
        ]
    )


def apply_joint(
    transform: v2.Transform, image: np.ndarray, mask: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a joint transform on numpy arrays.

    image: (H, W, 3) uint8; mask: (H, W) uint8 -> image (3, H', W') float32 normalised,
    mask (H', W') int64.
    """
    img = tv_tensors.Image(
        torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    )
    msk = tv_tensors.Mask(torch.from_numpy(np.require(mask, requirements=["C", "W"])))
    img, msk = transform(img, msk)
    return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()


def denormalise(image: torch.Tensor) -> torch.Tensor:
    """image: (..., 3, H, W) normalised -> same shape in [0, 1] (for visualisation)."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)
