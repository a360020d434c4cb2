from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppc_core.cam import cams_to_masks, infer_cams


@dataclass
class _Out:
    cam: Tensor


class _ConvCAM(nn.Module):
    """A stand-in CAM network: one conv on the image, then average pooling (stride 2)."""

    def __init__(self, kernel: int, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes + 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: Tensor, project: bool = True, refine: bool = True) -> _Out:
        return _Out(F.avg_pool2d(self.conv(x), 2))


def _images(seed: int = 0, size=(2, 3, 20, 24)) -> Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def test_infer_cams_single_scale_matches_hand_computation():
    model = _ConvCAM(kernel=1)
    x = _images()
    got = infer_cams(model, x, scales=(1.0,), flip=False)
    fg = F.relu(model(x).cam[:, 1:])
    fg = F.interpolate(fg, size=x.shape[2:], mode="bilinear", align_corners=False)
    expected = fg / (fg.amax(dim=(2, 3), keepdim=True) + 1e-5)
    assert got.shape == (2, 3, 20, 24)
    torch.testing.assert_close(got, expected)


def test_infer_cams_max_is_one_for_active_classes_and_zero_class_stays_zero():
    model = _ConvCAM(kernel=1, num_classes=2)
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.weight[1, 0] = 1.0  # class 1 = red channel, has positive pixels
        # class 2 stays all zero: relu(0) everywhere, must not become NaN
    cams = infer_cams(model, _images(), scales=(0.5, 1.0, 1.5), flip=True)
    assert torch.isfinite(cams).all()
    assert cams.min() >= 0
    torch.testing.assert_close(cams[:, 0].amax(dim=(1, 2)), torch.ones(2), atol=1e-4, rtol=0)
    assert cams[:, 1].abs().max() == 0


def test_infer_cams_is_flip_consistent_even_for_an_asymmetric_model():
    model = _ConvCAM(kernel=3, seed=1)
    x = _images(seed=2, size=(2, 3, 24, 32))
    scales = (0.5, 1.0, 1.5)
    cams = infer_cams(model, x, scales=scales, flip=True)
    cams_of_flipped = infer_cams(model, x.flip(-1), scales=scales, flip=True)
    torch.testing.assert_close(cams_of_flipped, cams.flip(-1), atol=1e-5, rtol=1e-4)
    # without flip averaging the same model is not mirror-symmetric: the check above has teeth
    no_flip = infer_cams(model, x, scales=scales, flip=False)
    no_flip_of_flipped = infer_cams(model, x.flip(-1), scales=scales, flip=False)
    assert (no_flip_of_flipped - no_flip.flip(-1)).abs().max() > 1e-2


def test_infer_cams_keeps_caller_mode_and_needs_no_grad():
    model = _ConvCAM(kernel=1)
    model.train()
    cams = infer_cams(model, _images(), scales=(1.0,))
    assert model.training
    assert not cams.requires_grad


def test_infer_cams_rejects_bad_input():
    with pytest.raises(ValueError, match="images must be"):
        infer_cams(_ConvCAM(kernel=1), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="scales"):
        infer_cams(_ConvCAM(kernel=1), torch.zeros(2, 3, 8, 8), scales=(0.0,))


def test_cams_to_masks_hand_example():
    # one image, 2 classes, 1x4 pixels
    cams = torch.tensor([[[[0.9, 0.1, 0.5, 0.3]], [[0.2, 0.05, 0.6, 0.3]]]])
    both = cams_to_masks(cams, torch.tensor([[1.0, 1.0]]), bg_threshold=0.3)
    # pixel 3: class 1 ties with background at 0.3 -> background
    assert both.tolist() == [[[1, 0, 2, 0]]]
    only_first = cams_to_masks(cams, torch.tensor([[1.0, 0.0]]), bg_threshold=0.3)
    assert only_first.tolist() == [[[1, 0, 1, 0]]]
    assert both.dtype == torch.int64


def test_cams_to_masks_rejects_label_shape():
    with pytest.raises(ValueError, match="labels must be"):
        cams_to_masks(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4), 0.2)


def test_infer_cams_does_not_run_pcm():
    # (and asks for no projector output: see test_evaluate's flags test)
    from ppc_core.models import build_model

    model = build_model("cnn4", 3, pcm=True).eval()
    calls = []
    model.pcm.register_forward_hook(lambda *_: calls.append("pcm"))
    infer_cams(model, _images(size=(2, 3, 32, 32)), scales=(0.5, 1.0), flip=True)
    assert not calls
    model(torch.zeros(1, 3, 32, 32))  # the default forward runs PCM: the hook is live
    assert calls == ["pcm"]
