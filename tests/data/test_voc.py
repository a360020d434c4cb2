from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ppc_core.data import build_dataset, dataset_info
from ppc_core.data.voc import CLASS_NAMES, VOCDataset, split_ids


def voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved class index)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_jpeg(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_mask(path: Path, mask: np.ndarray, palette: bool = True) -> None:
    img = Image.fromarray(mask.astype(np.uint8))
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def block_mask(h: int, w: int, classes: list[int]) -> np.ndarray:
    """Background with one vertical band per class, each band outlined by 255."""
    mask = np.zeros((h, w), np.uint8)
    band = w // (len(classes) + 1)
    for k, cls in enumerate(classes):
        mask[2 : h - 2, k * band + 1 : (k + 1) * band] = 255
        mask[3 : h - 3, k * band + 2 : (k + 1) * band - 1] = cls
    return mask


def write_xml(path: Path, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objects}</annotation>")


MASKS = {  # id -> (h, w, classes, folder, palette)
    "2007_000001": (40, 48, [1, 15], "SegmentationClass", True),
    "2007_000002": (20, 30, [7], "SegmentationClass", True),
    "2008_000003": (36, 44, [3, 12], "SegmentationClassAug", False),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations"):
        (root / sub).mkdir(parents=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for seed, (name, (h, w, classes, folder, palette)) in enumerate(MASKS.items()):
        write_jpeg(root / "JPEGImages" / f"{name}.jpg", h, w, seed)
        write_mask(root / folder / f"{name}.png", block_mask(h, w, classes), palette)
    # val id also in Aug (must be excluded from a derived train_aug), and the train id with an
    # Aug mask that differs from its VOC mask (train_aug prefers Aug)
    write_mask(root / "SegmentationClassAug" / "2007_000002.png", block_mask(20, 30, [7]), False)
    write_mask(root / "SegmentationClassAug" / "2007_000001.png", block_mask(40, 48, [2]), False)
    write_jpeg(root / "JPEGImages" / "2008_000004.jpg", 30, 26, 9)
    write_xml(root / "Annotations" / "2008_000004.xml", ["dog", "person", "dog"])
    (lists / "train.txt").write_text("2007_000001\n2008_000004\n")
    (lists / "val.txt").write_text("2007_000002\n")
    (lists / "trainval.txt").write_text("2007_000001\n2007_000002\n2008_000004\n")
    return root


def multi_hot(classes: list[int]) -> torch.Tensor:
    label = torch.zeros(20)
    label[torch.tensor(classes) - 1] = 1
    return label


def test_labels_and_masks_from_palette_pngs(voc_root):
    ds = VOCDataset(voc_root, "trainval", train=False)
    items = {ds[i]["name"]: ds[i] for i in range(len(ds))}
    first = items["2007_000001"]
    np.testing.assert_array_equal(first["mask"].numpy(), block_mask(40, 48, [1, 15]))
    assert first["mask"].dtype == torch.int64 and first["image"].shape == (3, 40, 48)
    torch.testing.assert_close(first["label"], multi_hot([1, 15]))
    torch.testing.assert_close(items["2007_000002"]["label"], multi_hot([7]))


def test_labels_from_xml_when_no_mask(voc_root):
    ds = VOCDataset(voc_root, "train", train=False)
    item = ds[ds.ids.index("2008_000004")]
    torch.testing.assert_close(item["label"], multi_hot([12, 15]))  # dog, person
    assert (item["mask"] == 255).all() and item["mask"].shape == (30, 26)
    assert CLASS_NAMES[11] == "dog" and CLASS_NAMES[14] == "person"


def test_train_aug_derived_and_from_list(voc_root):
    assert split_ids(voc_root, "train_aug") == ["2007_000001", "2008_000003"]
    ds = VOCDataset(voc_root, "train_aug", train=False)
    # train_aug prefers the SBD mask; plain index PNGs are read as class indices
    torch.testing.assert_close(ds[0]["label"], multi_hot([2]))
    torch.testing.assert_close(ds[1]["label"], multi_hot([3, 12]))
    (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000003\n")
    assert split_ids(voc_root, "train_aug") == ["2008_000003"]


def test_train_transform_crops_and_pads(voc_root):
    ds = VOCDataset(voc_root, "train", train=True, crop_size=64, long_range=(32, 32))
    torch.manual_seed(0)
    item = ds[0]
    image, mask = item["image"], item["mask"]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 15, 255}
    assert (mask != 255).any()
    padded = (image == 0).all(0)
    # the resized image is at most 32x32, so at least 3/4 of the crop is padding: 0 image, 255 mask
    assert padded.sum() >= 64 * 64 - 32 * 32
    assert (mask[padded] == 255).all()
    torch.manual_seed(0)
    torch.testing.assert_close(ds[0]["image"], image)


def test_default_train_pipeline_collates(voc_root):
    ds = build_dataset("voc", "trainval", train=True, crop_size=32, root=str(voc_root))
    torch.manual_seed(1)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["label"].shape == (3, 20)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 7, 12, 15, 255}


def test_subset_is_seeded(voc_root):
    a = build_dataset("voc", "trainval", False, 32, root=str(voc_root), seed=3, num_images=2)
    b = build_dataset("voc", "trainval", False, 32, root=str(voc_root), seed=3, num_images=2)
    assert len(a) == 2 and a.ids == b.ids
    assert dataset_info("voc").num_classes == 20


def test_missing_image_names_the_file(voc_root):
    (voc_root / "JPEGImages" / "2008_000004.jpg").unlink()
    with pytest.raises(ValueError, match=r"JPEGImages/2008_000004\.jpg"):
        VOCDataset(voc_root, "train", train=False)
    with pytest.warns(UserWarning, match="2008_000004"):
        ds = VOCDataset(voc_root, "train", train=False, skip_corrupt=True)
    assert ds.ids == ["2007_000001"] and ds.skipped == ["2008_000004"]


@pytest.mark.parametrize("truncate", [False, True])
def test_corrupt_image_names_the_file_or_is_skipped(voc_root, truncate):
    path = voc_root / "JPEGImages" / "2007_000001.jpg"
    path.write_bytes(path.read_bytes()[:300] if truncate else b"garbage bytes")
    ds = VOCDataset(voc_root, "train", train=False)
    with pytest.raises(ValueError, match=r"2007_000001\.jpg"):
        ds[0]
    skipping = VOCDataset(voc_root, "train", train=False, skip_corrupt=True)
    with pytest.warns(UserWarning, match="2007_000001"):
        item = skipping[0]
    assert item["name"] == "2008_000004" and skipping.skipped == ["2007_000001"]


def test_bad_masks_name_the_file(voc_root):
    mask_path = voc_root / "SegmentationClass" / "2007_000002.png"
    write_mask(mask_path, block_mask(21, 30, [7]))
    with pytest.raises(ValueError, match=r"2007_000002\.png.*size"):
        VOCDataset(voc_root, "val", train=False)[0]
    write_mask(mask_path, block_mask(20, 30, [30]))
    with pytest.raises(ValueError, match=r"2007_000002\.png.*unknown class indices \[30\]"):
        VOCDataset(voc_root, "val", train=False)[0]
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match=r"2007_000002\.png has mode RGB"):
        VOCDataset(voc_root, "val", train=False)[0]


def test_bad_annotation_names_the_file(voc_root):
    write_xml(voc_root / "Annotations" / "2008_000004.xml", ["dog", "unicorn"])
    ds = VOCDataset(voc_root, "train", train=False)
    with pytest.raises(ValueError, match=r"2008_000004\.xml.*unicorn"):
        ds[1]


def test_empty_or_unknown_split(voc_root):
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty: .*val\.txt"):
        VOCDataset(voc_root, "val", train=False)
    with pytest.raises(ValueError, match="split must be one of"):
        VOCDataset(voc_root, "test", train=False)
    with pytest.raises(ValueError, match="root"):
        build_dataset("voc", "val", False, 32)


# Image sizes (h, w) of the VOC-shaped folder: landscape, portrait and square, as VOC's 500x375,
# 375x500, 500x333, ... at a tenth of the size.
VOC_LIKE_SIZES = [(38, 50), (50, 38), (34, 50), (50, 34), (44, 44), (36, 48), (48, 36), (50, 42)]


def write_voc_like(root: Path, n: int = 36, n_train: int = 12, n_val: int = 8) -> Path:
    """A VOC2012 + SBD folder with VOC's variety: `n` images of several sizes in both
    orientations, 1-3 of the 20 classes each (every class occurs), objects outlined by 255
    (VOC's ignore border) and painted in a class colour, VOC palette masks for the train and
    val lists (val = the last `n_val` ids), SBD index masks (SegmentationClassAug) for every
    id outside val, so train_aug (derived) = train + the extra ids, and covers all 20 classes."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (21, 3))
    ids = [f"20{8 + i // 12:02d}_{i:06d}" for i in range(n)]
    for i, name in enumerate(ids):
        h, w = VOC_LIKE_SIZES[i % len(VOC_LIKE_SIZES)]
        classes = sorted({1 + i % 20, *(1 + rng.choice(20, size=i % 3, replace=False))})
        mask = block_mask(h, w, classes)
        image = colours[np.where(mask == 255, 0, mask)] + rng.integers(-20, 21, (h, w, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg", quality=90)
        is_val = i >= n - n_val
        if i < n_train or is_val:
            write_mask(root / "SegmentationClass" / f"{name}.png", mask, palette=True)
        if not is_val:
            write_mask(root / "SegmentationClassAug" / f"{name}.png", mask, palette=False)
    train, val = ids[:n_train], ids[n - n_val :]
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in train + val))
    return root


@pytest.fixture
def voc_like_root(tmp_path: Path) -> Path:
    return write_voc_like(tmp_path / "VOC2012")


def test_voc_like_folder_has_the_variety_of_voc(voc_like_root):
    train_aug = VOCDataset(voc_like_root, "train_aug", train=False)
    assert len(train_aug) == 28 and len(VOCDataset(voc_like_root, "val", train=False)) == 8
    items = [train_aug[i] for i in range(len(train_aug))]
    shapes = {tuple(it["mask"].shape) for it in items}
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes) and len(shapes) >= 6
    assert torch.stack([it["label"] for it in items]).sum(0).min() >= 1  # all 20 classes
    assert all((it["mask"] == 255).any() for it in items)
    with Image.open(voc_like_root / "SegmentationClassAug" / f"{train_aug.ids[-1]}.png") as m:
        assert m.mode == "L"  # SBD's masks are plain index PNGs
