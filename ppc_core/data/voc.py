"""PASCAL VOC 2012 (+ SBD "train_aug") from a local folder in the standard layout.

    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png      palette PNG masks (VOC 2012)
    root/SegmentationClassAug/<id>.png   SBD-augmented masks (palette or plain index PNG)
    root/Annotations/<id>.xml            object names (labels for ids without a mask)
    root/ImageSets/Segmentation/{train,val,trainval}.txt
    root/ImageSets/Segmentation/train_aug.txt  (optional; otherwise ids with an Aug mask minus val)

Image-level labels come from the mask (classes 1..20 present) or, for ids without a mask, from
the XML object names; such ids get an all-255 mask. ``train_aug`` prefers SegmentationClassAug,
the other splits prefer SegmentationClass; each falls back to the other folder.

Train items use the reference augmentation (transforms.voc_train_transform) and have size
crop_size. Eval items are the full-resolution image with its original mask (crop_size unused), so
mIoU is measured against the untouched ground truth; evaluate with batch_size=1.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ppc_core.data.transforms import IGNORE_INDEX, apply_joint, eval_transform, voc_train_transform

CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "trainval", "train_aug")
_NAME_TO_CLASS = {name: i for i, name in enumerate(CLASS_NAMES)}
_MASK_MODES = ("P", "L", "I", "I;16")


class VOCDataError(ValueError):
    """A bad file in a VOC folder; the message names the file."""


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"VOC split list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"VOC split list is empty: {path}")
    return ids


def _stems(folder: Path, suffix: str) -> set[str]:
    return {p.stem for p in folder.glob(f"*{suffix}")} if folder.is_dir() else set()


def split_ids(root: Path, split: str) -> list[str]:
    """Image ids of a split; train_aug from its list file, else Aug-mask ids minus val."""
    if split not in SPLITS:
        raise ValueError(f"VOC split must be one of {SPLITS}, got {split!r}")
    lists = root / "ImageSets" / "Segmentation"
    if split != "train_aug" or (lists / "train_aug.txt").is_file():
        return _read_ids(lists / f"{split}.txt")
    val = set(_read_ids(lists / "val.txt"))
    ids = sorted(_stems(root / "SegmentationClassAug", ".png") - val)
    if not ids:
        raise ValueError(
            f"VOC split train_aug is empty: no {lists / 'train_aug.txt'} and no masks outside val "
            f"in {root / 'SegmentationClassAug'}"
        )
    return ids


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; VOCDataError naming the file if missing or undecodable."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise VOCDataError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 class indices from a palette or index PNG, checked against the image shape."""
    try:
        with Image.open(path) as img:
            if img.mode not in _MASK_MODES:
                raise VOCDataError(
                    f"mask {path} has mode {img.mode}; expected a palette or single-channel index "
                    f"PNG (one of {_MASK_MODES})"
                )
            mask = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise VOCDataError(f"cannot read mask {path}: {exc}") from exc
    if mask.shape != shape:
        raise VOCDataError(f"mask {path} has size {mask.shape}, its image has {shape}")
    values = np.unique(mask)
    bad = values[((values > NUM_CLASSES) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        raise VOCDataError(
            f"mask {path} contains unknown class indices {bad.tolist()} "
            f"(allowed 0..{NUM_CLASSES} and {IGNORE_INDEX})"
        )
    return mask.astype(np.uint8)


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """mask: (H, W) -> (20,) float32 multi-hot of the foreground classes present."""
    counts = np.bincount(mask.ravel(), minlength=IGNORE_INDEX + 1)
    return (counts[1 : NUM_CLASSES + 1] > 0).astype(np.float32)


def labels_from_xml(path: Path) -> np.ndarray:
    """(20,) float32 multi-hot of the object names in a VOC annotation file."""
    try:
        names = [(obj.findtext("name") or "").strip() for obj in ET.parse(path).iter("object")]
    except (OSError, ET.ParseError) as exc:
        raise VOCDataError(f"cannot read annotation {path}: {exc}") from exc
    unknown = sorted(set(names) - _NAME_TO_CLASS.keys())
    if unknown:
        raise VOCDataError(f"annotation {path} has unknown class names {unknown}")
    label = np.zeros(NUM_CLASSES, dtype=np.float32)
    label[[_NAME_TO_CLASS[n] for n in names]] = 1.0
    return label


class VOCDataset(Dataset):
    """VOC items as in the data contract.

    num_images > 0 keeps a seeded random subset (sorted by id). With skip_corrupt, ids whose files
    are missing are dropped at construction and unreadable/invalid items are replaced by the next
    item at load time, each with a warning; ``skipped`` lists their ids (per process).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        train: bool,
        crop_size: int = 448,
        seed: int = 0,
        num_images: int = 0,
        skip_corrupt: bool = False,
        long_range: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"VOC root is not a directory: {self.root}")
        self.split = split
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []
        ids = split_ids(self.root, split)

        jpegs = _stems(self.root / "JPEGImages", ".jpg")
        missing = [i for i in ids if i not in jpegs]
        if missing:
            first = self.root / "JPEGImages" / f"{missing[0]}.jpg"
            if not skip_corrupt:
                raise ValueError(
                    f"image not found: {first} ({len(missing)} ids of {split} missing)"
                )
            warnings.warn(
                f"skipping {len(missing)} ids without an image, e.g. {first}", stacklevel=2
            )
            self.skipped.extend(missing)
            ids = [i for i in ids if i in jpegs]
            if not ids:
                raise ValueError(f"VOC split {split} has no images in {self.root / 'JPEGImages'}")
        if num_images > 0 and num_images < len(ids):
            pick = np.random.default_rng(seed).choice(len(ids), size=num_images, replace=False)
            ids = [ids[i] for i in np.sort(pick)]
        self.ids = ids

        folders = ["SegmentationClass", "SegmentationClassAug"]
        if split == "train_aug":
            folders.reverse()
        stems = [_stems(self.root / f, ".png") for f in folders]
        self._mask_paths: dict[str, Path] = {}
        for i in ids:
            for folder, have in zip(folders, stems, strict=True):
                if i in have:
                    self._mask_paths[i] = self.root / folder / f"{i}.png"
                    break
        self.transform = voc_train_transform(crop_size, long_range) if train else eval_transform()

    def __len__(self) -> int:
        return len(self.ids)

    def mask_path(self, index: int) -> Path | None:
        return self._mask_paths.get(self.ids[index])

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name = self.ids[index]
        image = read_image(self.root / "JPEGImages" / f"{name}.jpg")
        mask_path = self._mask_paths.get(name)
        if mask_path is not None:
            mask = read_mask(mask_path, image.shape[:2])
            return image, mask, labels_from_mask(mask)
        xml = self.root / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            raise VOCDataError(f"no mask and no annotation for {name}: {xml} not found")
        return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8), labels_from_xml(xml)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.ids)):
            i = (index + attempt) % len(self.ids)
            try:
                image, mask, label = self._load(i)
            except VOCDataError as exc:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping {self.ids[i]}: {exc}", stacklevel=2)
                self.skipped.append(self.ids[i])
                continue
            image_t, mask_t = apply_joint(self.transform, image, mask)
            return {
                "image": image_t,
                "label": torch.from_numpy(label),
                "mask": mask_t,
                "name": self.ids[i],
            }
        raise ValueError(f"every item of VOC split {self.split} in {self.root} is unreadable")
