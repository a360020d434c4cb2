import pytest
import torch
import torchvision
from torch import nn

from ppc_core.models import BACKBONES, build_backbone


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", BACKBONES)
def test_feature_shapes(name: str, output_stride: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, output_stride=output_stride).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    grid = 64 // output_stride
    assert out.fea.shape == (2, net.out_channels, grid, grid)
    assert out.low.shape == (2, net.low_channels, grid, grid)


def test_basic_block_stages_are_dilated_not_just_unstrided() -> None:
    net = build_backbone("resnet18", output_stride=8)
    # The first block of a stage keeps the previous rate, later blocks use the new one.
    assert net.layer3[0].conv1.dilation == (1, 1)
    assert net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv1.dilation == (2, 2)
    assert net.layer4[1].conv1.dilation == (4, 4)
    assert all(m.stride == (1, 1) for m in net.layer4.modules() if isinstance(m, nn.Conv2d))
    net16 = build_backbone("resnet34", output_stride=16)
    assert net16.layer3[0].conv1.stride == (2, 2)
    assert net16.layer4[-1].conv2.dilation == (2, 2)


def test_odd_input_size_keeps_low_on_fea_grid() -> None:
    net = build_backbone("cnn4", output_stride=8).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 70, 53))
    assert out.low.shape[-2:] == out.fea.shape[-2:]


def test_unknown_name_and_stride_are_rejected() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("cnn4", output_stride=32)


def test_local_torchvision_state_dict_round_trips(tmp_path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)  # includes the fc.* classifier keys
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    net = build_backbone("resnet18", output_stride=8, pretrained=str(path))
    loaded = net.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


def test_cnn4_own_state_dict_round_trips(tmp_path) -> None:
    torch.manual_seed(2)
    source = build_backbone("cnn4")
    path = tmp_path / "cnn4.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    torch.manual_seed(3)
    net = build_backbone("cnn4", pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_missing_file_error_names_the_path(tmp_path) -> None:
    path = str(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="nope.pth"):
        build_backbone("resnet18", pretrained=path)


def test_mismatched_keys_error_lists_keys(tmp_path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r50\.pth.*missing.*layer"):
        build_backbone("resnet18", pretrained=str(path))


def test_cnn4_has_no_torchvision_weights() -> None:
    with pytest.raises(ValueError, match="cnn4"):
        build_backbone("cnn4", pretrained="torchvision")


def test_freeze_bn_keeps_batchnorm_in_eval_mode() -> None:
    net = build_backbone("cnn4", freeze_bn=True).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    free = build_backbone("cnn4").train()
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))
