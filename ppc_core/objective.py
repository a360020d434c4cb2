"""The CAM-training objective: classification (+ SEAM terms) + the PPC regulariser.

It returns a dict of named, already weighted loss terms; the loop sums and logs them under the
same names. Every weight lives here (`SEAMWeights`, `PPCWeights`): the losses return their terms
unweighted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ppc_core.data.views import align_to_target, target_view
from ppc_core.losses import seam
from ppc_core.losses.ppc import TERMS, PPCLoss


@dataclass
class SEAMWeights:
    er: float = 1.0
    ecr: float = 1.0
    min_pool: float = 1.0


@dataclass
class PPCWeights:
    """One weight per PPC term, by the term's name (`ppc_core.losses.ppc.TERMS`); the config's
    `ppc.w_<name>` fields. The reference weighs each 0.1."""

    cross_proto: float = 0.1
    cross_cam: float = 0.1
    intra: float = 0.1


class Objective:
    """Two views of each batch -> named loss terms.

    ppc: the PPC loss or None for the baseline; seam_weights: None to leave SEAM's terms out;
    ppc_weights: the PPC terms' weights (the reference's by default).
    The target view is the batch rescaled to `target_size` (optionally flipped), and every
    source-view map is aligned onto the target's feature grid before the two are compared.
    """

    def __init__(
        self,
        ppc: PPCLoss | None,
        target_size: int,
        target_flip: bool = False,
        seam_weights: SEAMWeights | None = None,
        ppc_weights: PPCWeights | None = None,
    ) -> None:
        self.ppc = ppc
        self.ppc_weights = ppc_weights or PPCWeights()
        self._ppc_weight = asdict(self.ppc_weights)
        missing = [name for name in TERMS if name not in self._ppc_weight]
        if ppc is not None and missing:
            raise ValueError(f"PPC terms {missing} have no weight: add them to PPCWeights")
        self.target_size = target_size
        self.target_flip = target_flip
        self.seam_weights = seam_weights

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        ppc_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """images: (B, 3, H, W); labels: (B, C) multi-hot -> {term name: weighted scalar}."""
        use_ppc = self.ppc is not None and ppc_scale > 0
        need = {"project": use_ppc, "refine": use_ppc or self.seam_weights is not None}
        src = model(images, **need)
        tgt = model(target_view(images, self.target_size, self.target_flip), **need)
        grid = tuple(tgt.cam.shape[2:])

        def align(x: Tensor) -> Tensor:
            return align_to_target(x, grid, self.target_flip)

        terms = {"cls": (seam.classification_loss(src.cam, labels)
                         + seam.classification_loss(tgt.cam, labels)) / 2}
        w = self.seam_weights
        # Source maps on the target grid, each aligned once and only if a term reads it.
        rv_s = None if src.cam_rv is None else align(src.cam_rv)
        cam_s = align(src.cam) if w is not None or (use_ppc and rv_s is None) else None
        if w is not None:
            terms["er"] = w.er * seam.equivariant_reg(cam_s, tgt.cam, labels)
            if rv_s is not None:
                terms["ecr"] = w.ecr * seam.equivariant_cross_reg(cam_s, tgt.cam, rv_s,
                                                                  tgt.cam_rv, labels)
                terms["min_pool"] = w.min_pool * (seam.min_pool_loss(src.cam_rv, labels)
                                                  + seam.min_pool_loss(tgt.cam_rv, labels)) / 2
        if use_ppc:
            # The reference builds prototypes and pseudo labels from the PCM-refined CAM.
            ppc_s, ppc_t = (cam_s, tgt.cam) if rv_s is None else (rv_s, tgt.cam_rv)
            out = self.ppc(align(src.proj), ppc_s, tgt.proj, ppc_t, labels, generator)
            for name, value in out.items():
                terms[f"ppc_{name}"] = ppc_scale * self._ppc_weight[name] * value
        return terms
