"""Pixel-to-Prototype Contrast (Du et al., CVPR 2022): pseudo labels, prototypes and the loss.

Shape legend (every docstring of the package uses these letters):

    B  images in a batch (per view; per process under data parallelism)
    V  views: 2, source s and target t, aligned pixel for pixel on one grid
    C  classes including the background (channel 0): the CAM's channels and the prototypes.
       Image labels have C-1 columns (the foreground classes; seam.py calls that number C).
    D  feature dim of the projector (128 in the reference)
    N  pixels of one view: B * H * W on the H x W loss grid (16 x 16 in the reference)
    K  top-K: the pixels per class that build its prototype (the paper's K;
       `PPCConfig.top_k_ratio` * H * W, 32 in the reference)

Modules, in reading order:
    config.py  `PPCConfig` (the `ppc.*` config section) and the input checks
    terms.py   the paper's functions with autograd: ŷ, p_c, F, L_cp, L_cc, L_intra (semi-hard
               negatives, hard pixel weights), the `TERMS` registry, `reference_terms`
    fused.py   the fast engine: the same terms from one logits table, closed-form gradients
    loss.py    `PPCLoss`: validation, then `ppc.impl: reference | fused`

docs/method.md maps each equation and constant of the paper and the reference code to its
config field and function. A new term: a function `TermInputs -> scalar` in `terms.TERMS` and a
weight in `ppc_core.objective.PPCWeights`.
"""

from ppc_core.losses.ppc.config import PPCConfig, top_k_for
from ppc_core.losses.ppc.fused import FUSED_TERMS, prototypes_from_candidates, topk_candidates
from ppc_core.losses.ppc.loss import PPCLoss
from ppc_core.losses.ppc.terms import (
    TERMS,
    GatherFn,
    Sampler,
    TermInputs,
    estimate_prototypes,
    hard_pixel_weights,
    intra_view_contrast,
    normalise_cam,
    prototype_contrast,
    pseudo_labels,
    ranking_map,
    reference_terms,
    semi_hard_negatives,
)

__all__ = [
    "FUSED_TERMS",
    "TERMS",
    "GatherFn",
    "PPCConfig",
    "PPCLoss",
    "Sampler",
    "TermInputs",
    "estimate_prototypes",
    "hard_pixel_weights",
    "intra_view_contrast",
    "normalise_cam",
    "prototype_contrast",
    "prototypes_from_candidates",
    "pseudo_labels",
    "ranking_map",
    "reference_terms",
    "semi_hard_negatives",
    "top_k_for",
    "topk_candidates",
]
