import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ppc_core.data import build_dataset, dataset_info
from ppc_core.data.digits import (
    DEFAULT_DIGIT_SCALE,
    MIN_VISIBLE,
    NUM_CLASSES,
    DigitsDataset,
    _compose,
    _digit_pool,
    _test_pool,
    cache_path,
    default_cache_dir,
    generate_digits,
    load_digits_split,
)
from ppc_core.data.transforms import denormalise

N = 48


@pytest.fixture(scope="module")
def train_arrays():
    return generate_digits("train", N, canvas=64, seed=3)


def test_same_seed_gives_identical_arrays(train_arrays):
    again = generate_digits("train", N, canvas=64, seed=3)
    for a, b in zip(train_arrays, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = generate_digits("train", N, canvas=64, seed=4)
    assert not np.array_equal(train_arrays.images, other_seed.images)
    val = generate_digits("val", N, canvas=64, seed=3)
    assert not np.array_equal(train_arrays.images, val.images)


def test_shapes_and_dtypes(train_arrays):
    images, masks, labels = train_arrays
    assert images.shape == (N, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (N, 64, 64) and masks.dtype == np.uint8
    assert labels.shape == (N, NUM_CLASSES)


def test_masks_hold_only_classes_and_ignore(train_arrays):
    values = np.unique(train_arrays.masks)
    assert set(values.tolist()) <= set(range(NUM_CLASSES + 1)) | {255}
    # anti-aliased stroke borders are marked ignore, strokes themselves are foreground
    assert 255 in values and (values[(values > 0) & (values < 255)]).size > 0


def test_labels_agree_with_masks(train_arrays):
    masks, labels = train_arrays.masks, train_arrays.labels
    counts = np.stack([np.bincount(m.ravel(), minlength=256) for m in masks])
    present = counts[:, 1 : NUM_CLASSES + 1] > 0
    np.testing.assert_array_equal(present, labels.astype(bool))
    per_image = labels.sum(1)
    assert per_image.min() >= 1 and per_image.max() <= 3
    assert len(set(per_image.tolist())) > 1


def test_occluded_digits_are_ignored_and_unlabelled():
    # digits as large as the canvas overlap heavily, so some are nearly hidden by later ones
    arrays = generate_digits("train", 64, canvas=16, seed=0, digit_scale=(1.0, 1.0))
    counts = np.stack([np.bincount(m.ravel(), minlength=256) for m in arrays.masks])
    fg_counts = counts[:, 1 : NUM_CLASSES + 1]
    np.testing.assert_array_equal(fg_counts > 0, arrays.labels.astype(bool))
    assert fg_counts[fg_counts > 0].min() >= MIN_VISIBLE


def test_digits_stand_out_from_a_textured_background(train_arrays):
    images, masks = train_arrays.images.astype(np.float32), train_arrays.masks
    fg = (masks > 0) & (masks < 255)
    bg = masks == 0
    # backgrounds are photo crops, not flat colour
    bg_std = np.array([img[m].std() for img, m in zip(images, bg, strict=True)])
    assert np.median(bg_std) > 10
    # digit pixels differ in colour from the mean background of their image
    diff = [
        np.abs(img[f] - img[b].mean(0)).sum(1).mean()
        for img, f, b in zip(images, fg, bg, strict=True)
    ]
    assert np.median(diff) > 40


def test_cache_is_written_once_and_reused(tmp_path):
    first = load_digits_split("val", 12, canvas=32, seed=1, root=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind
    # Replace the cached images: a second load must return them, proving it read the file.
    marked = first.images.copy()
    marked[0] = 7
    with open(files[0], "wb") as fh:
        np.savez_compressed(fh, images=marked, masks=first.masks, labels=first.labels)
    mtime = files[0].stat().st_mtime_ns
    second = load_digits_split("val", 12, canvas=32, seed=1, root=tmp_path)
    assert (second.images[0] == 7).all()
    assert files[0].stat().st_mtime_ns == mtime
    # A different parameter set gets its own file.
    load_digits_split("val", 13, canvas=32, seed=1, root=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_corrupt_cache_is_regenerated(tmp_path):
    reference = load_digits_split("val", 10, canvas=32, seed=2, root=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable digits cache"):
        again = load_digits_split("val", 10, canvas=32, seed=2, root=tmp_path)
    np.testing.assert_array_equal(again.images, reference.images)
    with np.load(path) as data:  # rewritten in full
        np.testing.assert_array_equal(data["masks"], reference.masks)


def test_concurrent_builders_leave_a_valid_cache(tmp_path):
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(load_digits_split("val", 16, 32, 5, tmp_path))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for r in results[1:]:
        np.testing.assert_array_equal(r.images, results[0].images)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PPC_DATA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "digits"
    path = cache_path(None, split="val", num_images=5, canvas=32, seed=0)
    assert path.parent == tmp_path / "digits"


def test_items_follow_the_contract(tmp_path):
    ds = build_dataset("digits", "val", train=False, crop_size=32, root=str(tmp_path), num_images=8)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (NUM_CLASSES,) and item["label"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert isinstance(item["name"], str)
    raw = torch.from_numpy(ds.arrays.images[3]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(denormalise(item["image"]), raw, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(item["mask"].numpy(), ds.arrays.masks[3])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)


def test_train_items_are_flipped_jointly(tmp_path):
    ev = DigitsDataset("val", train=False, crop_size=32, root=tmp_path, num_images=4)
    tr = DigitsDataset("val", train=True, crop_size=32, root=tmp_path, num_images=4)
    ref = ev[0]
    torch.manual_seed(0)
    flips = []
    for _ in range(16):
        item = tr[0]
        flipped = torch.equal(item["mask"], ref["mask"].flip(-1))
        if flipped:
            torch.testing.assert_close(item["image"], ref["image"].flip(-1))
        else:
            torch.testing.assert_close(item["image"], ref["image"])
            assert torch.equal(item["mask"], ref["mask"])
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_default_sizes(tmp_path):
    ds = build_dataset("digits", "val", train=False, crop_size=64, root=str(tmp_path))
    assert len(ds) == 200


def test_dataset_info_and_bad_names():
    info = dataset_info("digits")
    assert info.num_classes == 10 and len(info.class_names) == 10
    with pytest.raises(ValueError, match="allowed.*digits.*voc"):
        dataset_info("cifar")
    with pytest.raises(ValueError, match="allowed"):
        build_dataset("cifar", "train", True, 64)
    with pytest.raises(ValueError, match="split"):
        generate_digits("holdout", 4)
    with pytest.raises(ValueError, match="crop_size"):
        generate_digits("train", 4, canvas=8)


def _sha(arrays) -> str:
    import hashlib

    return hashlib.sha1(arrays.images.tobytes() + arrays.masks.tobytes()).hexdigest()[:12]


def test_train_and_val_are_unchanged_by_the_test_split():
    # Hashes of the splits before the test split existed: results measured on them still hold.
    assert _sha(generate_digits("train", 300, 64, 0)) == "e3c500d48754"
    assert _sha(generate_digits("val", 200, 64, 0)) == "77c2216d840a"


def test_test_split_shares_no_digit_image_with_train_or_val():
    style = (64, 0, 3, DEFAULT_DIGIT_SCALE, 8.0, 0.5)
    pool, ids = _digit_pool("val")
    free = _test_pool(style, pool, ids)
    _, test_used = _compose("test", 200, *style, pool[free], ids[free])
    test_glyphs = pool[free][test_used].reshape(len(test_used), -1)
    for n in (16, 200):  # a smaller val split is a prefix of the default one
        _, val_used = _compose("val", n, *style, pool, ids)
        val_glyphs = pool[val_used].reshape(len(val_used), -1)
        assert not (test_glyphs[:, None] == val_glyphs[None]).all(-1).any()
    train_pool, _ = _digit_pool("train")
    train_glyphs = train_pool.reshape(len(train_pool), -1)
    assert not (test_glyphs[:, None] == train_glyphs[None]).all(-1).any()
    arrays = generate_digits("test", 40, 64, 0)
    assert arrays.labels.sum(0).min() > 0  # every digit appears
    assert not np.array_equal(arrays.images, generate_digits("val", 40, 64, 0).images)
    assert len(build_dataset("digits", "test", False, 32, num_images=8)) == 8
