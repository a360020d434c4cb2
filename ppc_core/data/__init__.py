"""Data sets: the bundled digits task and PASCAL VOC 2012 (+SBD), plus the two-view helpers."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from ppc_core.data import digits, voc


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int  # foreground classes C (background excluded)
    class_names: tuple[str, ...]


_INFOS = {
    "digits": DatasetInfo(digits.NUM_CLASSES, digits.CLASS_NAMES),
    "voc": DatasetInfo(voc.NUM_CLASSES, voc.CLASS_NAMES),
}


def _check_name(name: str) -> None:
    if name not in _INFOS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(_INFOS)}")


def dataset_info(name: str) -> DatasetInfo:
    """Foreground class count and names of a data set."""
    _check_name(name)
    return _INFOS[name]


def build_dataset(
    name: str,
    split: str,
    train: bool,
    crop_size: int,
    root: str = "",
    seed: int = 0,
    num_images: int = 0,
    skip_corrupt: bool = False,
) -> Dataset:
    """A data set whose items follow the data contract.

    digits: split in {"train", "val", "test"}; crop_size is the canvas size (digits are 1/4..1/2 of it);
        root is the cache directory ("" -> $PPC_DATA_CACHE/digits or ~/.cache/ppc_sweeps/digits);
        seed selects the generated images; num_images 0 -> 2000 (train) / 200 (val).
    voc: split in {"train", "val", "trainval", "train_aug"}; root is the VOC folder (required);
        train items are crop_size crops, eval items full images (use batch_size=1);
        num_images > 0 keeps a random subset chosen by seed; skip_corrupt warns about and skips
        unreadable images instead of raising.
    """
    _check_name(name)
    if crop_size <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0 (0 = all), got {num_images}")
    if name == "digits":
        return digits.DigitsDataset(split, train, crop_size, root or None, seed, num_images)
    if not root:
        raise ValueError("the voc dataset needs root= pointing at a VOC2012 folder")
    return voc.VOCDataset(root, split, train, crop_size, seed, num_images, skip_corrupt)


__all__ = ["DatasetInfo", "build_dataset", "dataset_info"]
