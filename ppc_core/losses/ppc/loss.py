"""`PPCLoss`: the PPC terms of two aligned views, by the readable or the fused implementation."""

from __future__ import annotations

import torch
from torch import Tensor

from ppc_core.losses.ppc import terms
from ppc_core.losses.ppc.config import PPCConfig, check_finite, validate_cam_labels
from ppc_core.losses.ppc.fused import fused_terms, view_prototypes
from ppc_core.losses.ppc.terms import GatherFn, Sampler


class PPCLoss(torch.nn.Module):
    """Cross-prototype, cross-CAM and intra-view contrast between two aligned views, unweighted.

    cfg.impl picks the implementation: "fused" (fused.py, fast) or "reference" (terms.py, the
    paper's functions under autograd); both give the terms of `terms.TERMS`. The weights are the
    objective's (`ppc_core.objective.PPCWeights`).
    `gather` (optional) concatenates a tensor along dim 0 across data-parallel processes, so
    prototypes come from the global batch exactly as one process holding all of it would.
    `sampler` (optional) replaces `terms.hard_pixel_weights` in both implementations.
    """

    def __init__(self, cfg: PPCConfig, gather: GatherFn | None = None,
                 sampler: Sampler | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.gather = gather
        self.sampler = sampler

    def prototypes(self, cam: Tensor, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo labels (B*H*W,) and prototypes (C, D) of one view."""
        validate_cam_labels(cam, labels)
        check_finite("cam", cam)
        return view_prototypes(cam, feats, labels, self.cfg, self.gather)

    def forward(
        self,
        feats_s: Tensor,
        cam_s: Tensor,
        feats_t: Tensor,
        cam_t: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The unweighted terms for a source and a target view on a common grid.

        feats_*: (B, D, H, W) projector outputs; cam_*: (B, C, H, W) raw CAMs (the source ones
        already aligned onto the target grid); labels: (B, C-1) multi-hot.
        Returns {"cross_proto", "cross_cam", "intra", ...}: each term of `terms.TERMS`, a
        scalar averaged over the two directions / views. NaN or inf in an input raises a
        ValueError naming it.
        """
        if feats_s.shape != feats_t.shape or cam_s.shape != cam_t.shape:
            raise ValueError(
                f"views must share shapes: feats {tuple(feats_s.shape)} vs {tuple(feats_t.shape)}, "
                f"cam {tuple(cam_s.shape)} vs {tuple(cam_t.shape)}"
            )
        if feats_s.shape[0] != cam_s.shape[0] or feats_s.shape[2:] != cam_s.shape[2:]:
            raise ValueError(
                f"feats {tuple(feats_s.shape)} and cam {tuple(cam_s.shape)} must share batch and grid"
            )
        validate_cam_labels(cam_s, labels)
        views = (feats_s, cam_s, feats_t, cam_t, labels)
        if self.cfg.impl == "reference":
            for name, x in zip(("feats_s", "cam_s", "feats_t", "cam_t"), views, strict=False):
                check_finite(name, x)
            return terms.reference_terms(
                terms.term_inputs(*views, self.cfg, generator, self.gather, self.sampler))
        out = fused_terms(*views, self.cfg, generator, self.gather, self.sampler)
        # Terms the engine does not know: their readable function (registered in terms.TERMS).
        others = {name: term for name, term in terms.TERMS.items() if name not in out}
        if others:
            x = terms.term_inputs(*views, self.cfg, generator, self.gather, self.sampler)
            out.update({name: term(x) for name, term in others.items()})
        return out
