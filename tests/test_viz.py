import numpy as np
import pytest
import torch
from PIL import Image

from ppc_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ppc_core.viz import overlay_grid, save_png, voc_palette

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def test_voc_palette_known_colours():
    pal = voc_palette(256)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[20].tolist() == [0, 64, 128]  # tv monitor
    assert len({tuple(c) for c in pal.tolist()}) == 256
    with pytest.raises(ValueError, match="n must be"):
        voc_palette(0)


def _inputs(n=2, c=3, h=8, w=10):
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(n, 3, h, w, generator=g)
    images = (rgb - MEAN) / STD
    targets = torch.randint(0, c + 1, (n, h, w), generator=g)
    targets[:, 0, 0] = 255
    cams = torch.rand(n, c, h, w, generator=g)
    masks = torch.randint(0, c + 1, (n, h, w), generator=g)
    return rgb, images, targets, cams, masks


def test_overlay_grid_layout_and_content(tmp_path):
    rgb, images, targets, cams, masks = _inputs()
    grid = overlay_grid(images, targets, cams, masks, num_classes=3)
    assert grid.shape == (2 * 8, 4 * 10, 3) and grid.dtype == np.uint8
    # first column: the de-normalised image of each row
    expected = (rgb.permute(0, 2, 3, 1).numpy() * 255).round()
    np.testing.assert_allclose(grid[8:16, :10].astype(float), expected[1], atol=1)
    # ignored truth pixel blends half way to white
    white_blend = 0.5 * expected[0, 0, 0] + 0.5 * 255
    np.testing.assert_allclose(grid[0, 10].astype(float), white_blend, atol=1)
    # pseudo-mask column uses the palette colour of the mask value
    cls = int(masks[0, 3, 4])
    colour = voc_palette(4)[cls].astype(float)
    np.testing.assert_allclose(grid[3, 30 + 4].astype(float),
                               0.5 * expected[0, 3, 4] + 0.5 * colour, atol=1)

    path = save_png(grid, tmp_path / "sub" / "grid.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (40, 16)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), grid)


def test_overlay_grid_rejects_bad_input(tmp_path):
    _, images, targets, cams, masks = _inputs()
    with pytest.raises(ValueError, match="mask values"):
        overlay_grid(images, targets, cams, masks + 5, num_classes=3)
    with pytest.raises(ValueError, match="targets must be"):
        overlay_grid(images, targets[:1], cams, masks, num_classes=3)
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 3), dtype=np.float32), tmp_path / "x.png")
