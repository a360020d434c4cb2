import pytest
import torch
import torch.nn.functional as F

from ppc_core.losses.seam import (
    classification_loss,
    equivariant_cross_reg,
    equivariant_reg,
    max_norm,
    max_onehot,
    min_pool_loss,
)


def _labels(b: int = 2, c: int = 4) -> torch.Tensor:
    return torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])[:b, :c]


def test_max_norm_range_per_image_and_class() -> None:
    torch.manual_seed(0)
    cam = torch.randn(2, 3, 5, 5) * 4 + 1
    out = max_norm(cam)
    flat = out.flatten(2)
    assert (flat >= 0).all()
    torch.testing.assert_close(flat.amax(2), torch.ones(2, 3), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.amin(2), torch.zeros(2, 3))


def test_classification_loss_matches_definition_and_prefers_right_labels() -> None:
    torch.manual_seed(1)
    cam = torch.randn(2, 5, 4, 4, requires_grad=True)
    labels = _labels()
    loss = classification_loss(cam, labels)
    pooled = cam[:, 1:].mean((2, 3))
    expected = -(labels * F.logsigmoid(pooled) + (1 - labels) * F.logsigmoid(-pooled)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert cam.grad[:, 0].abs().sum() == 0  # background channel is not classified
    assert cam.grad[:, 1:].abs().sum() > 0
    good = torch.cat(
        [torch.zeros(2, 1, 4, 4), (labels * 20 - 10)[..., None, None].expand(2, 4, 4, 4)], 1
    )
    assert classification_loss(good, labels) < 1e-3


def test_min_pool_loss_uses_lowest_quarter_of_pixel_maxima() -> None:
    score = torch.arange(16.0).view(1, 1, 4, 4) - 2.0  # per-pixel max over one channel
    cam = torch.cat([score, score - 5.0], dim=1)
    # the lowest 4 maxima are -2, -1, 0, 1 -> relu -> mean 0.25
    torch.testing.assert_close(min_pool_loss(cam), torch.tensor(0.25))
    assert min_pool_loss(-torch.rand(2, 3, 4, 4)) == 0


def test_min_pool_loss_with_labels_ignores_background_and_absent_classes() -> None:
    cam = torch.zeros(1, 3, 2, 2)
    cam[:, 0] = 5.0  # background
    cam[:, 2] = 7.0  # absent class
    cam[:, 1] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(min_pool_loss(cam, labels), torch.tensor(1.0))
    with pytest.raises(ValueError, match="labels"):
        min_pool_loss(cam, torch.ones(1, 3))


def test_equivariant_reg_zero_when_views_agree_positive_otherwise() -> None:
    torch.manual_seed(2)
    labels = _labels()
    cam = torch.randn(2, 5, 6, 6)
    assert equivariant_reg(cam, cam.clone(), labels) == 0
    # only present classes count: perturbing an absent class changes nothing
    other = cam.clone()
    other[0, 2] += torch.randn(6, 6)
    assert equivariant_reg(cam, other, labels) == 0
    a = torch.randn(2, 5, 6, 6, requires_grad=True)
    b = torch.randn(2, 5, 6, 6, requires_grad=True)
    loss = equivariant_reg(a, b, labels)
    assert loss > 0
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def _hard_cam(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """A CAM whose foreground is already one-hot (every class present somewhere) and whose
    background channel is constant, i.e. a fixed point of the ECR target construction."""
    cls = torch.arange(h * w).view(1, h, w).expand(b, h, w) % c
    fg = F.one_hot(cls, c).permute(0, 3, 1, 2).float()
    return torch.cat([torch.full((b, 1, h, w), 0.3), fg], dim=1)


def test_equivariant_cross_reg_zero_when_refined_maps_match_hard_cams() -> None:
    labels = torch.ones(2, 4)
    cam = _hard_cam(2, 4, 4, 4)
    loss = equivariant_cross_reg(cam, cam, cam.clone(), cam.clone(), labels)
    assert loss < 1e-4


def test_equivariant_cross_reg_positive_and_only_trains_refined_maps() -> None:
    torch.manual_seed(3)
    labels = _labels()
    cam_a = torch.randn(2, 5, 6, 6, requires_grad=True)
    cam_b = torch.randn(2, 5, 6, 6, requires_grad=True)
    rv_a = torch.rand(2, 5, 6, 6, requires_grad=True)
    rv_b = torch.rand(2, 5, 6, 6, requires_grad=True)
    loss = equivariant_cross_reg(cam_a, cam_b, rv_a, rv_b, labels)
    assert loss > 0
    loss.backward()
    assert rv_a.grad.abs().sum() > 0 and rv_b.grad.abs().sum() > 0
    assert cam_a.grad is None and cam_b.grad is None


def test_equivariant_cross_reg_averages_worst_errors() -> None:
    labels = torch.ones(1, 1)
    cam = torch.zeros(1, 2, 2, 5)
    cam[:, 1, 0] = 1.0  # fg on the top row -> target: top row fg 1, bottom row bg 1
    rv = torch.zeros(1, 2, 2, 5)  # refined map all 0 -> 10 errors of 1, 10 errors of 0
    # top 20% of the 20 errors per direction are all 1; two directions summed
    loss = equivariant_cross_reg(cam, cam, rv, rv, labels)
    torch.testing.assert_close(loss, torch.tensor(2.0), atol=1e-4, rtol=0)
    everything = equivariant_cross_reg(cam, cam, rv, rv, labels, top_ratio=1.0)
    torch.testing.assert_close(everything, torch.tensor(1.0), atol=1e-4, rtol=0)


def test_max_onehot_keeps_background_and_top_foreground() -> None:
    cam = torch.tensor([[[[0.9]], [[0.2]], [[0.5]], [[0.1]]]])
    out = max_onehot(cam)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.9, 0.0, 0.5, 0.0]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: classification_loss(torch.randn(2, 5, 4, 4), torch.ones(2, 5)),
        lambda: classification_loss(torch.randn(2, 5, 4), torch.ones(2, 4)),
        lambda: equivariant_reg(torch.randn(2, 5, 4, 4), torch.randn(2, 5, 8, 8), torch.ones(2, 4)),
        lambda: equivariant_cross_reg(
            *(torch.randn(2, 5, 4, 4) for _ in range(3)), torch.randn(2, 5, 3, 4), torch.ones(2, 4)
        ),
        lambda: equivariant_cross_reg(
            *(torch.randn(2, 5, 4, 4) for _ in range(4)), torch.ones(3, 4)
        ),
        lambda: min_pool_loss(torch.randn(2, 5)),
    ],
)
def test_shape_mismatches_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()
