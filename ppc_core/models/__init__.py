"""CAM network construction: `build_model(...) -> CAMNet`."""

from __future__ import annotations

from ppc_core.models.backbone import BACKBONES, Backbone, BackboneFeatures, build_backbone
from ppc_core.models.cam_net import CAMNet, CAMOutput
from ppc_core.models.pcm import PCM, pcm_seed

__all__ = [
    "BACKBONES",
    "PCM",
    "Backbone",
    "BackboneFeatures",
    "CAMNet",
    "CAMOutput",
    "build_backbone",
    "build_model",
    "pcm_seed",
]


def build_model(
    backbone: str,
    num_classes: int,
    output_stride: int = 8,
    proj_dim: int = 128,
    pcm: bool = False,
    pretrained: str = "",
    freeze_bn: bool = False,
) -> CAMNet:
    """backbone: one of BACKBONES; num_classes: C foreground classes (the CAM has C+1 channels);
    output_stride: 8 or 16; proj_dim: projector width; pcm: add SEAM's PCM (cam_rv output);
    pretrained: "" (random), "torchvision" (online only) or a local state-dict path;
    freeze_bn: keep backbone BatchNorm in eval mode while training (sensible with pretrained).
    """
    net = build_backbone(backbone, output_stride, pretrained, freeze_bn=freeze_bn)
    return CAMNet(net, num_classes, proj_dim=proj_dim, pcm=pcm)
