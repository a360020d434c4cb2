import pytest
import torch
import torch.nn.functional as F

from ppc_core.data.views import align_to_target, target_view

STRIDE = 8


def features(images: torch.Tensor) -> torch.Tensor:
    """A stride-8 'network' that commutes with rescaling: mix channels, average 8x8 cells."""
    mix = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.3, 0.3]])
    return F.avg_pool2d(torch.einsum("kc,bchw->bkhw", mix, images), STRIDE)


def ramp_images() -> torch.Tensor:
    """(2, 3, 64, 64) images that are linear in x and y (different per channel and image)."""
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    coeffs = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [0.5, -2.0]], [[-1.0, 3.0], [2.0, 2.0], [0, 1]]]
    )
    return coeffs[..., 0, None, None] * x + coeffs[..., 1, None, None] * y


def test_target_view_shape_and_flip():
    images = torch.randn(2, 3, 40, 56)
    out = target_view(images, 16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(target_view(images, 16, flip=True), out.flip(-1))


@pytest.mark.parametrize("flip", [False, True])
def test_aligned_source_map_equals_target_map_on_linear_images(flip):
    images = ramp_images()
    target_maps = features(target_view(images, 32, flip=flip))
    aligned = align_to_target(features(images), tuple(target_maps.shape[-2:]), flip=flip)
    assert aligned.shape == target_maps.shape == (2, 2, 4, 4)
    # exact for linear images under the align_corners=False cell geometry
    torch.testing.assert_close(aligned, target_maps, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_aligned_source_map_matches_target_map_on_smooth_images(flip):
    gen = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.randn(2, 3, 4, 4, generator=gen), size=(128, 128), mode="bicubic")
    target_maps = features(target_view(images, 64, flip=flip))
    aligned = align_to_target(features(images), (8, 8), flip=flip)
    err = (aligned - target_maps).abs().mean() / target_maps.abs().mean()
    assert err < 0.05
    # pairing each pixel with its mirror instead would be far off
    wrong = (aligned - target_maps.flip(-1)).abs().mean() / target_maps.abs().mean()
    assert wrong > 5 * err


def test_flip_round_trips_and_same_grid_is_identity():
    maps = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(align_to_target(maps, (7, 9)), maps)
    twice = align_to_target(align_to_target(maps, (7, 9), flip=True), (7, 9), flip=True)
    torch.testing.assert_close(twice, maps)
    images = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(target_view(target_view(images, 16, True), 16, True), images)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="maps"):
        align_to_target(torch.zeros(5, 7, 9), (4, 4))
    with pytest.raises(ValueError, match="grid"):
        align_to_target(torch.zeros(1, 5, 7, 9), (0, 4))
    with pytest.raises(ValueError, match="size"):
        target_view(torch.zeros(1, 3, 8, 8), 0)
