import pytest
import torch

from ppc_core.losses.seam import classification_loss
from ppc_core.models import PCM, CAMOutput, build_model, pcm_seed


@pytest.mark.parametrize("pcm", [False, True])
def test_forward_shapes(pcm: bool) -> None:
    torch.manual_seed(0)
    model = build_model("cnn4", num_classes=10, proj_dim=32, pcm=pcm)
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, CAMOutput)
    assert out.cam.shape == (2, 11, 8, 8)
    assert out.proj.shape == (2, 32, 8, 8)
    assert (out.proj >= 0).all()
    if pcm:
        assert out.cam_rv is not None and out.cam_rv.shape == (2, 11, 8, 8)
    else:
        assert out.cam_rv is None


def test_heads_in_one_conv_match_the_separate_heads() -> None:
    torch.manual_seed(0)
    model = build_model("cnn4", num_classes=10, proj_dim=32)
    x = torch.randn(2, 3, 64, 64)
    both = model(x, project=True)
    cam_only = model(x, project=False)
    assert cam_only.proj is None
    assert torch.allclose(both.cam, cam_only.cam, atol=1e-5)
    assert torch.allclose(both.proj, model.projector(model.backbone(x).fea).relu(), atol=1e-5)


def test_backbone_builds_pcm_features_only_when_asked() -> None:
    torch.manual_seed(0)
    net = build_model("cnn4", num_classes=3).backbone
    x = torch.randn(1, 3, 32, 32)
    assert net(x, low=False).low is None
    assert net(x).low is not None


@pytest.mark.parametrize("backbone", ["cnn4", "resnet18"])
def test_param_groups_cover_every_parameter_once(backbone: str) -> None:
    model = build_model(backbone, num_classes=5, pcm=True)
    groups = model.param_groups(weight_decay=5e-4)
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 10.0, 20.0]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone_ids for g in groups[:2] for p in g["params"])
    assert all(id(p) not in backbone_ids for g in groups[2:] for p in g["params"])
    assert id(model.cam_head.weight) in {id(p) for p in groups[2]["params"]}
    assert all(p.dim() == 1 for p in groups[1]["params"])  # BatchNorm shifts
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # empty groups must be accepted


def test_param_groups_reject_negative_decay() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        build_model("cnn4", 3).param_groups(-1.0)


def test_classification_gradient_reaches_backbone_and_pcm_only_learns_affinity() -> None:
    torch.manual_seed(1)
    model = build_model("cnn4", num_classes=4, pcm=True)
    out = model(torch.randn(2, 3, 32, 32))
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    classification_loss(out.cam, labels).backward()
    assert model.backbone.block1[0][0].weight.grad.abs().sum() > 0
    assert model.pcm.embed.weight.grad is None

    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 32, 32))
    (out.cam_rv * torch.randn_like(out.cam_rv)).sum().backward()
    assert model.pcm.embed.weight.grad.abs().sum() > 0
    assert model.pcm.low_proj.weight.grad.abs().sum() > 0
    # The seed CAM and the low features are detached: PCM must not train the backbone.
    assert model.backbone.block1[0][0].weight.grad is None
    assert model.cam_head.weight.grad is None


def test_pcm_affinity_columns_are_convex_weights() -> None:
    torch.manual_seed(2)
    pcm = PCM(low_channels=16, low_dim=8, aff_dim=8)
    low, image = torch.randn(3, 16, 5, 6), torch.randn(3, 3, 40, 48)
    aff = pcm.affinity(low, image)
    assert aff.shape == (3, 30, 30)
    assert (aff >= 0).all()
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(3, 30), atol=1e-4, rtol=0)

    seed = torch.rand(3, 4, 5, 6)
    out = pcm(seed, low, image)
    assert out.shape == seed.shape
    lo = seed.flatten(2).amin(2)[..., None, None]
    hi = seed.flatten(2).amax(2)[..., None, None]
    assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all()
    flat = pcm(torch.full((3, 4, 5, 6), 0.7), low, image)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.7), atol=1e-4, rtol=0)


def test_pcm_rejects_mismatched_grids() -> None:
    pcm = PCM(low_channels=8)
    with pytest.raises(ValueError, match="grid"):
        pcm(torch.rand(1, 3, 4, 4), torch.randn(1, 8, 5, 5), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="batch"):
        pcm(torch.rand(2, 3, 4, 4), torch.randn(1, 8, 4, 4), torch.randn(1, 3, 32, 32))


def test_pcm_seed_is_one_hot_foreground_with_complementary_background() -> None:
    cam = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.5]], [[1.0, 3.0]]]])  # (1, 3, 1, 2), bg first
    seed = pcm_seed(cam)
    # class 1 peaks at 2.0, class 2 at 3.0; per pixel only the larger normalised fg score survives
    expected_fg = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    torch.testing.assert_close(seed[:, 1:], expected_fg, atol=1e-4, rtol=0)
    torch.testing.assert_close(seed[:, 0], 1 - expected_fg.amax(dim=1), atol=1e-4, rtol=0)
