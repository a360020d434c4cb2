"""Feature extractors for the CAM network: a small CPU-friendly CNN and dilated torchvision ResNets.

Every backbone returns a `BackboneFeatures` with
  fea: (B, out_channels, h, w)  the last stage, stride `output_stride` (8 or 16)
  low: (B, low_channels, h, w)  the two stages before it, concatenated on fea's grid; PCM builds
                                its pixel affinity from these (SEAM uses ResNet38's conv4 + conv5).
                                None when not asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

BACKBONES = ("cnn4", "resnet18", "resnet34", "resnet50", "resnet101")
OUTPUT_STRIDES = (8, 16)


@dataclass
class BackboneFeatures:
    fea: Tensor
    low: Tensor | None


def _to_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """x: (B, C, H, W) with H >= size[0], W >= size[1] -> (B, C, *size) by area averaging."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)


class Backbone(nn.Module):
    """Common base: subclasses set `out_channels`, `low_channels` and implement `stages`."""

    out_channels: int
    low_channels: int

    def __init__(self, freeze_bn: bool = False) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn

    def stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, 3, H, W) -> (stage2, stage3, last stage) feature maps."""
        raise NotImplementedError

    def forward(self, x: Tensor, low: bool = True) -> BackboneFeatures:
        """low: build the `low` features (only PCM reads them; else None)."""
        s2, s3, fea = self.stages(x)
        if not low:
            return BackboneFeatures(fea=fea, low=None)
        size = tuple(fea.shape[-2:])
        return BackboneFeatures(fea=fea, low=torch.cat([_to_grid(s2, size), _to_grid(s3, size)], 1))

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and self.freeze_bn:
            # Small per-device batches make BN statistics noisy; pretrained backbones keep theirs.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CNN4(Backbone):
    """Four conv-BN-ReLU blocks (two convs each); strides 2, 2, 2 and then 1 (dilated) or 2."""

    def __init__(self, output_stride: int = 8, width: int = 32, freeze_bn: bool = False) -> None:
        super().__init__(freeze_bn)
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 4 * width
        last_stride, last_dil = (1, 2) if output_stride == 8 else (2, 1)
        self.block1 = nn.Sequential(_conv_bn_relu(3, c1, 2), _conv_bn_relu(c1, c1))
        self.block2 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c2))
        self.block3 = nn.Sequential(_conv_bn_relu(c2, c3, 2), _conv_bn_relu(c3, c3))
        self.block4 = nn.Sequential(
            _conv_bn_relu(c3, c4, last_stride, last_dil), _conv_bn_relu(c4, c4, 1, last_dil)
        )
        self.out_channels = c4
        self.low_channels = c2 + c3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s2 = self.block2(self.block1(x))
        s3 = self.block3(s2)
        return s2, s3, self.block4(s3)


def _dilate_basic_stage(layer: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Turn a stride-2 stage of BasicBlocks into a stride-1 dilated one, in place.

    torchvision's BasicBlock refuses dilation at construction, but its convs read stride/padding/
    dilation at call time, so we set them afterwards with the rule torchvision's _make_layer uses:
    the first block keeps the previous rate, every later block uses the new one.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for i, block in enumerate(layer):
        rate = previous_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.dilation = conv.padding = (rate, rate)


class ResNet(Backbone):
    """torchvision ResNet without avgpool/fc; layer3/layer4 dilated to reach the output stride.

    Parameter names equal torchvision's (conv1, bn1, layer1..4), so torchvision state dicts load.
    """

    def __init__(self, name: str, output_stride: int = 8, freeze_bn: bool = False) -> None:
        super().__init__(freeze_bn)
        dilate = [False, output_stride == 8, True]  # layer2, layer3, layer4
        if name in ("resnet18", "resnet34"):
            net = getattr(torchvision.models, name)(weights=None)
            if output_stride == 8:
                _dilate_basic_stage(net.layer3, dilation=2, previous_dilation=1)
                _dilate_basic_stage(net.layer4, dilation=4, previous_dilation=2)
            else:
                _dilate_basic_stage(net.layer4, dilation=2, previous_dilation=1)
        else:
            net = getattr(torchvision.models, name)(
                weights=None, replace_stride_with_dilation=dilate
            )
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.out_channels = 512 * expansion
        self.low_channels = (128 + 256) * expansion

    def stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        s2 = self.layer2(self.layer1(x))
        s3 = self.layer3(s2)
        return s2, s3, self.layer4(s3)


def _torchvision_state_dict(name: str) -> dict[str, Tensor]:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # download errors come as URLError, OSError, RuntimeError, ...
        raise RuntimeError(
            f"pretrained='torchvision': could not download ImageNet weights for {name} ({err}). "
            "Without internet access pass a local file path instead, e.g. a state dict saved with "
            f"torch.save(torchvision.models.{name}(weights='DEFAULT').state_dict(), 'r.pth')."
        ) from err


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"pretrained: weights file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"pretrained: cannot read a state dict from {path!r}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_pretrained(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` (torchvision key format) into `backbone`; classifier keys ("fc.*") are dropped.

    Raises ValueError naming `source` and a few offending keys when the keys or shapes disagree.
    """
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"pretrained weights {source!r} do not match the backbone: "
            f"{len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}), "
            f"{len(wrong_shape)} with another shape (e.g. {wrong_shape[:5]})"
        )
    backbone.load_state_dict(state)


def build_backbone(
    name: str, output_stride: int = 8, pretrained: str = "", freeze_bn: bool = False
) -> Backbone:
    """Build a backbone by name.

    name: one of BACKBONES. output_stride: 8 or 16.
    pretrained: "" random init, "torchvision" ImageNet weights (needs internet, ResNets only), or
    the path of a local state dict in torchvision key format (or this backbone's own keys).
    freeze_bn: keep BatchNorm layers in eval mode during training (for pretrained backbones).
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: unknown name {name!r}; allowed: {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"backbone: output_stride must be 8 or 16, got {output_stride}")
    backbone: Backbone
    if name == "cnn4":
        backbone = CNN4(output_stride, freeze_bn=freeze_bn)
    else:
        backbone = ResNet(name, output_stride, freeze_bn=freeze_bn)
    if pretrained == "torchvision":
        if name == "cnn4":
            raise ValueError("pretrained='torchvision': cnn4 has no ImageNet weights; use ''")
        load_pretrained(backbone, _torchvision_state_dict(name), "torchvision")
    elif pretrained:
        load_pretrained(backbone, _read_state_dict(pretrained), pretrained)
    return backbone
