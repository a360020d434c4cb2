"""The CAM network trained with PPC: backbone -> CAM head + projector (+ optional PCM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppc_core.models.backbone import Backbone
from ppc_core.models.pcm import PCM, pcm_seed


@dataclass
class CAMOutput:
    """cam: (B, C+1, h, w) raw class scores, channel 0 = background (raw value unused downstream)
    proj: (B, D, h, w) projector output after ReLU, not L2-normalised (None if not asked for)
    cam_rv: (B, C+1, h, w) PCM-refined CAM, or None without PCM (or if not asked for)
    """

    cam: Tensor
    proj: Tensor | None
    cam_rv: Tensor | None = None


class CAMNet(nn.Module):
    """backbone: a `Backbone`; num_classes: C foreground classes; proj_dim: projector width D."""

    def __init__(
        self, backbone: Backbone, num_classes: int, proj_dim: int = 128, pcm: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CAMNet: num_classes must be >= 1, got {num_classes}")
        if proj_dim < 1:
            raise ValueError(f"CAMNet: proj_dim must be >= 1, got {proj_dim}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.cam_head = nn.Conv2d(backbone.out_channels, num_classes + 1, 1, bias=False)
        self.projector = nn.Conv2d(backbone.out_channels, proj_dim, 1, bias=False)
        nn.init.xavier_uniform_(self.cam_head.weight)
        nn.init.xavier_uniform_(self.projector.weight)
        self.pcm = PCM(backbone.low_channels) if pcm else None

    def forward(self, x: Tensor, project: bool = True, refine: bool = True) -> CAMOutput:
        """x: (B, 3, H, W) normalised images -> CAMOutput on the stride-`output_stride` grid.

        project / refine: compute the projector / PCM outputs (else None). Under DDP every
        output must feed the loss, so a step that does not use one must not compute it.
        """
        refine = refine and self.pcm is not None
        feats = self.backbone(x, low=refine)
        if project:
            # Both 1x1 heads in one conv: on small maps a conv call costs more than its arithmetic.
            weight = torch.cat([self.cam_head.weight, self.projector.weight])
            cam, proj = F.conv2d(feats.fea, weight).split(
                [self.cam_head.out_channels, self.projector.out_channels], dim=1)
            proj = F.relu(proj)
        else:
            cam, proj = self.cam_head(feats.fea), None
        cam_rv = self.pcm(pcm_seed(cam), feats.low, x) if refine else None
        return CAMOutput(cam=cam, proj=proj, cam_rv=cam_rv)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Four optimiser groups (the reference's LR multipliers):

        0: backbone weights, lr x1, weight decay  (conv weights and BatchNorm scales)
        1: backbone biases, lr x2, no decay       (BatchNorm shifts; convs carry no bias)
        2: new-layer weights, lr x10, weight decay (CAM head, projector, PCM)
        3: new-layer biases, lr x20, no decay      (empty with the current heads, kept for shape)

        cnn4 has no pretrained weights, yet it stays in groups 0/1 so every backbone follows the
        same schedule; raise its LR through the base LR if it learns too slowly.
        Only parameters with requires_grad are listed.
        """
        if weight_decay < 0:
            raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_new = not name.startswith("backbone.")
            is_bias = name.endswith(".bias")
            groups[2 * is_new + is_bias].append(param)
        return [
            {"params": groups[0], "lr_mult": 1.0, "weight_decay": weight_decay},
            {"params": groups[1], "lr_mult": 2.0, "weight_decay": 0.0},
            {"params": groups[2], "lr_mult": 10.0, "weight_decay": weight_decay},
            {"params": groups[3], "lr_mult": 20.0, "weight_decay": 0.0},
        ]
