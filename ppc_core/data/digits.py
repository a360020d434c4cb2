"""Bundled WSSS data set: scikit-learn's 8x8 digits pasted on crops of its two sample photos.

Each canvas holds 1-3 distinct digits, upscaled bilinearly, coloured and alpha-composited onto a
textured photo crop, plus Gaussian noise. Classes are the ten digits (mask value = digit + 1,
0 = background); a pixel belongs to a digit where the upscaled stroke intensity is at least
``FG_ALPHA``, and anti-aliased border pixels with intensity in [IGNORE_ALPHA, FG_ALPHA) are 255.
A digit left with fewer than ``MIN_VISIBLE`` class pixels after later digits overlap it is
turned to 255 and dropped from the image label, so labels always agree with masks.

Generation is deterministic in (split, num_images, canvas, seed, ...) and cached as a compressed
.npz keyed by all of them. Train and val draw from disjoint digit images (index % 5) and from
independent random streams. The test split (for confirming a sweep's choice on data it did not
select on) draws from the val pool's digit images that the default val split (200 canvases of
the same size, seed and style) never uses, so it shares no digit image with train or with any val
split of up to 200 canvases (a smaller val split is a prefix of the default one); train and val
are exactly what they were before the test split existed.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ppc_core.data.transforms import apply_joint, eval_transform, flip_transform

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(d) for d in range(NUM_CLASSES))
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200, "test": 200}
DEFAULT_CANVAS = 64
# Digits of 40-60% of the canvas: a from-scratch CNN learns CAMs in a few hundred steps (at
# 25-50% it needed about 2,000).
DEFAULT_DIGIT_SCALE = (0.4, 0.6)
FG_ALPHA = 0.5
IGNORE_ALPHA = 0.25
MIN_VISIBLE = 8
# Bump when the generator changes so that stale caches are not reused.
GENERATOR_VERSION = 1


class DigitsArrays(NamedTuple):
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8, 0 background, 1..10 digit+1, 255 ignore
    labels: np.ndarray  # (N, 10) uint8 multi-hot


def _hsv_colour(rng: np.random.Generator) -> np.ndarray:
    # Saturated, bright colours keep digits visible on the photos without making them trivial.
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _background_pyramid(canvas: int, contrast: float) -> list[np.ndarray]:
    """The two sample photos at several scales (float32 (h, w, 3)), each at least canvas wide.

    contrast < 1 pulls each photo towards its mean colour: full-contrast photo texture makes the
    from-scratch CAM networks of quick CPU runs learn far more slowly (measured), yet the texture
    remains.
    """
    from sklearn.datasets import load_sample_images

    levels = []
    for photo in load_sample_images().images:
        pil = Image.fromarray(photo)
        short = min(pil.size)
        for factor in (2, 3, 4, 6):
            target = min(short, factor * canvas)
            scale = target / short
            size = (
                max(canvas, round(pil.size[0] * scale)),
                max(canvas, round(pil.size[1] * scale)),
            )
            level = np.asarray(pil.resize(size, Image.Resampling.BOX), dtype=np.float32)
            mean = level.mean((0, 1))
            levels.append(mean + contrast * (level - mean))
    return levels


def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint digit images per split: (M, 8, 8) intensities in [0, 1] and (M,) digit ids."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = np.arange(len(bunch.target))
    keep = idx % 5 == 0 if split in ("val", "test") else idx % 5 != 0
    return bunch.images[keep].astype(np.float32) / 16.0, bunch.target[keep]


def _paste_boxes(
    rng: np.random.Generator, sizes: np.ndarray, canvas: int, tries: int = 20
) -> list[tuple[int, int]]:
    """Top-left corners for square digits of the given sizes, avoiding heavy overlap if possible."""
    corners: list[tuple[int, int]] = []
    for size in sizes:
        best, best_overlap = None, np.inf
        for _ in range(tries):
            y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            overlap = 0.0
            for (py, px), psize in zip(corners, sizes, strict=False):
                oy = max(0, min(y + size, py + psize) - max(y, py))
                ox = max(0, min(x + size, px + psize) - max(x, px))
                overlap = max(overlap, oy * ox / min(size, psize) ** 2)
            if overlap < best_overlap:
                best, best_overlap = (y, x), overlap
            if overlap <= 0.1:
                break
        corners.append(best)
    return corners


def generate_digits(
    split: str,
    num_images: int,
    canvas: int = DEFAULT_CANVAS,
    seed: int = 0,
    max_digits: int = 3,
    digit_scale: tuple[float, float] = DEFAULT_DIGIT_SCALE,
    noise_std: float = 8.0,
    bg_contrast: float = 0.5,
) -> DigitsArrays:
    """Generate a split in memory (no cache). Digit side lengths are digit_scale * canvas."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {sorted(SPLITS)}, got {split!r}")
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if canvas < 16:
        raise ValueError(f"canvas (crop_size) must be >= 16 for the digits data set, got {canvas}")
    if not 1 <= max_digits <= NUM_CLASSES:
        raise ValueError(f"max_digits must be in [1, {NUM_CLASSES}], got {max_digits}")
    if not 0 < digit_scale[0] <= digit_scale[1] <= 1:
        raise ValueError(f"digit_scale must satisfy 0 < lo <= hi <= 1, got {digit_scale}")
    if not 0 <= bg_contrast <= 1:
        raise ValueError(f"bg_contrast must be in [0, 1], got {bg_contrast}")
    style = (canvas, seed, max_digits, digit_scale, noise_std, bg_contrast)
    pool, pool_ids = _digit_pool(split)
    if split == "test":
        free = _test_pool(style, pool, pool_ids)
        pool, pool_ids = pool[free], pool_ids[free]
        missing = sorted(set(range(NUM_CLASSES)) - set(pool_ids.tolist()))
        if missing:
            raise ValueError(f"digits test split: the val split uses every image of digits "
                             f"{missing} at these settings; no disjoint test split exists")
    return _compose(split, num_images, *style, pool, pool_ids)[0]


def _test_pool(style: tuple, pool: np.ndarray, pool_ids: np.ndarray) -> np.ndarray:
    """Indices into the val pool that the default val split at `style` never pastes."""
    _, used = _compose("val", DEFAULT_NUM_IMAGES["val"], *style, pool, pool_ids)
    return np.setdiff1d(np.arange(len(pool_ids)), used)


def _compose(
    split: str,
    num_images: int,
    canvas: int,
    seed: int,
    max_digits: int,
    digit_scale: tuple[float, float],
    noise_std: float,
    bg_contrast: float,
    pool: np.ndarray,
    pool_ids: np.ndarray,
) -> tuple[DigitsArrays, np.ndarray]:
    """The canvases of a split from a digit pool, and the pool indices they used."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], GENERATOR_VERSION]))
    backgrounds = _background_pyramid(canvas, bg_contrast)
    by_class = [np.flatnonzero(pool_ids == c) for c in range(NUM_CLASSES)]
    lo, hi = (max(8, round(s * canvas)) for s in digit_scale)
    used: list[int] = []
    images = np.empty((num_images, canvas, canvas, 3), dtype=np.uint8)
    masks = np.empty((num_images, canvas, canvas), dtype=np.uint8)
    labels = np.zeros((num_images, NUM_CLASSES), dtype=np.uint8)
    n = 0
    while n < num_images:
        bg = backgrounds[rng.integers(len(backgrounds))]
        y0 = rng.integers(0, bg.shape[0] - canvas + 1)
        x0 = rng.integers(0, bg.shape[1] - canvas + 1)
        img = bg[y0 : y0 + canvas, x0 : x0 + canvas].copy()
        if rng.random() < 0.5:
            img = img[:, ::-1]
        mask = np.zeros((canvas, canvas), dtype=np.uint8)

        classes = rng.choice(NUM_CLASSES, size=rng.integers(1, max_digits + 1), replace=False)
        sizes = rng.integers(lo, hi + 1, size=len(classes))
        for cls, size, (y, x) in zip(classes, sizes, _paste_boxes(rng, sizes, canvas), strict=True):
            used.append(int(rng.choice(by_class[cls])))
            glyph = pool[used[-1]]
            alpha = np.asarray(
                Image.fromarray(glyph).resize((size, size), Image.Resampling.BILINEAR)
            ).clip(0.0, 1.0)
            region = img[y : y + size, x : x + size]
            region += alpha[..., None] * (_hsv_colour(rng) - region)
            mregion = mask[y : y + size, x : x + size]
            mregion[alpha >= IGNORE_ALPHA] = 255
            mregion[alpha >= FG_ALPHA] = cls + 1

        counts = np.bincount(mask.ravel(), minlength=256)[1 : NUM_CLASSES + 1]
        hidden = (counts > 0) & (counts < MIN_VISIBLE)
        if hidden.any():
            mask[np.isin(mask, np.flatnonzero(hidden) + 1)] = 255
        present = counts >= MIN_VISIBLE
        if not present.any():
            continue  # every digit was occluded: draw the canvas again
        img += rng.normal(0.0, noise_std, size=img.shape).astype(np.float32)
        images[n] = img.clip(0, 255).round().astype(np.uint8)
        masks[n] = mask
        labels[n] = present
        n += 1
    return DigitsArrays(images, masks, labels), np.unique(used)


def default_cache_dir() -> Path:
    """$PPC_DATA_CACHE/digits if set, else ~/.cache/ppc_sweeps/digits."""
    base = os.environ.get("PPC_DATA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "ppc_sweeps") / "digits"


def cache_path(root: str | os.PathLike | None, **params: object) -> Path:
    """Cache file for a parameter set: readable prefix plus a hash of every parameter."""
    key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{params['split']}_n{params['num_images']}_c{params['canvas']}_s{params['seed']}"
    return Path(root or default_cache_dir()) / f"{name}_{digest}.npz"


def _read_cache(path: Path, num_images: int, canvas: int) -> DigitsArrays | None:
    try:
        with np.load(path) as data:
            arrays = DigitsArrays(data["images"], data["masks"], data["labels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable digits cache {path}: {exc}", stacklevel=3)
        return None
    expected = (num_images, canvas, canvas)
    if arrays.images.shape[:3] != expected or arrays.masks.shape != expected:
        warnings.warn(f"ignoring digits cache {path} with unexpected shapes", stacklevel=3)
        return None
    return arrays


def _write_cache(path: Path, arrays: DigitsArrays) -> None:
    # Write to a temp file in the same directory and rename, so concurrent readers never see a
    # half-written file and racing writers simply replace each other with identical content.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays._asdict())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_digits_split(
    split: str,
    num_images: int = 0,
    canvas: int = DEFAULT_CANVAS,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    max_digits: int = 3,
    digit_scale: tuple[float, float] = DEFAULT_DIGIT_SCALE,
    noise_std: float = 8.0,
    bg_contrast: float = 0.5,
) -> DigitsArrays:
    """Arrays for a split, from the cache if present, else generated and cached.

    num_images 0 means the split default (train 2000, val 200, test 200).
    """
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {sorted(SPLITS)}, got {split!r}")
    num_images = num_images or DEFAULT_NUM_IMAGES[split]
    params = dict(
        split=split,
        num_images=num_images,
        canvas=canvas,
        seed=seed,
        max_digits=max_digits,
        digit_scale=list(digit_scale),
        noise_std=noise_std,
        bg_contrast=bg_contrast,
        fg_alpha=FG_ALPHA,
        ignore_alpha=IGNORE_ALPHA,
        min_visible=MIN_VISIBLE,
    )
    path = cache_path(root, **params)
    if path.exists():
        cached = _read_cache(path, num_images, canvas)
        if cached is not None:
            return cached
    arrays = generate_digits(
        split, num_images, canvas, seed, max_digits, digit_scale, noise_std, bg_contrast
    )
    _write_cache(path, arrays)
    return arrays



def single_digit_scenes(
    split: str,
    num_images: int,
    canvas: int = DEFAULT_CANVAS,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> DigitsArrays:
    """Scenes with exactly one digit, drawn from `split`'s digit pool (cached like any split).

    For classification pretraining: labels are one-hot. The same seed draws other scenes than
    the multi-digit split, yet the same digit images: a "train" pool never holds a "val" digit.
    """
    return load_digits_split(split, num_images, canvas, seed, root, max_digits=1)


class DigitsDataset(Dataset):
    """Items as in the data contract; train adds a random horizontal flip, eval nothing."""

    def __init__(
        self,
        split: str,
        train: bool,
        crop_size: int = DEFAULT_CANVAS,
        root: str | os.PathLike | None = None,
        seed: int = 0,
        num_images: int = 0,
    ) -> None:
        self.split = split
        self.arrays = load_digits_split(split, num_images, crop_size, seed, root)
        self.transform = flip_transform() if train else eval_transform()

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, index: int) -> dict:
        image, mask = apply_joint(
            self.transform, self.arrays.images[index], self.arrays.masks[index]
        )
        return {
            "image": image,
            "label": torch.from_numpy(self.arrays.labels[index].astype(np.float32)),
            "mask": mask,
            "name": f"digits_{self.split}_{index:05d}",
        }
