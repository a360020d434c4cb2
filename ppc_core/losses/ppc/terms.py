"""PPC as the paper writes it: pure functions of tensors, autograd for every gradient.

Read top to bottom: pseudo labels (ŷ) -> prototypes (p_c) -> the contrast F(v; y; P) -> the three
terms (L_cp, L_cc, L_intra, with semi-hard prototype mining and hard pixel sampling) -> `TERMS`,
the registry the loss composes in `reference_terms`. Letters as in the package legend
(`ppc_core/losses/ppc/__init__.py`); equations, constants and quirks in docs/method.md.

This is the specification: `PPCLoss(impl="fused")` (fused.py) must give the same values and
gradients (tests/losses/test_impls.py). It favours clarity over speed (about 10x slower than the
fused engine at 56x56). A new term is a function `TermInputs -> scalar` added to `TERMS`, plus a
weight in `ppc_core.objective.PPCWeights`; the fused path computes any term it does not know with
the function here.

Half precision: every function computes in float32 (or float64 when given it) and returns that
dtype; the gradient flows back to fp16 / bf16 inputs in their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ppc_core.losses.ppc.config import (
    PPCConfig,
    check_contrast_inputs,
    check_finite,
    compute_dtype,
    validate_cam_labels,
)
from ppc_core.losses.seam import max_norm

_EPS = 1e-5
# A logit for "no prototype": exp() of it is 0 next to any real logit, yet it stays finite, so no
# row of a softmax turns into NaN. Logits are float32 or wider here (-1e9 would be -inf in fp16).
NO_PROTOTYPE = -1e9

# sampler(similarity (N,), y (N,), num_classes, random_ratio, rank_lo, rank_hi, generator) ->
# (N,) weights: how many times each pixel enters its class's intra-view mean. See
# `hard_pixel_weights`, the default; a new sampler with this signature plugs into both impls.
Sampler = Callable[..., Tensor]


# --- Pseudo labels ŷ (no gradient) -----------------------------------------------------------

def normalise_cam(cam: Tensor) -> Tensor:
    """Per image and class min-max normalisation of relu(cam) to [0, 1], without gradient.

    cam: (B, C, H, W) raw scores. Returns (B, C, H, W) float32; pixels at the minimum are 0. The
    same normalisation as SEAM's terms, so pseudo labels and the ER / ECR targets agree.
    """
    return max_norm(cam.detach().float(), _EPS)


@torch.no_grad()
def pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float = 0.20) -> tuple[Tensor, Tensor]:
    """ŷ_i = argmax_c of the label-masked, normalised CAM (docs/method.md, "Pseudo labels").

    cam: (B, C, H, W) raw scores, channel 0 = background (its raw value is ignored).
    labels: (B, C-1) multi-hot image labels.
    Returns norm_cam (B, C, H, W) in [0, 1] with absent classes zeroed and channel 0 =
    bg_threshold, and y (B, H, W) int64. The reference takes argmax(softmax(.)): softmax is
    monotone, so the argmax of the map itself is the same label.
    """
    validate_cam_labels(cam, labels)
    check_finite("cam", cam)
    if not 0.0 <= bg_threshold <= 1.0:
        raise ValueError(f"bg_threshold must be in [0, 1], got {bg_threshold}")
    norm = normalise_cam(cam)
    present = F.pad(labels.to(norm.dtype), (1, 0), value=1.0)  # background always present
    norm = norm * present[:, :, None, None]
    norm[:, 0] = bg_threshold
    return norm, norm.argmax(dim=1)


# --- Prototypes p_c (no gradient) ------------------------------------------------------------

def ranking_map(cam: Tensor, norm_cam: Tensor, mode: str = "complement") -> Tensor:
    """The confidence m_ic by which pixels compete to build each class prototype.

    cam: (B, C, H, W) raw scores; norm_cam: the first output of `pseudo_labels`.
    "complement": absent classes 0, background = 1 - max foreground confidence.
    "reference": unmasked normalised CAM with the constant bg_threshold channel, so absent
    classes still get prototypes and the background top-K is a tie-break (the reference's quirk).
    Returns (B, C, H, W).
    """
    if mode == "reference":
        rank = normalise_cam(cam)
        rank[:, 0] = norm_cam[:, 0]
        return rank
    rank = norm_cam.clone()
    rank[:, 0] = 1.0 - norm_cam[:, 1:].max(dim=1).values
    return rank


@torch.no_grad()
def estimate_prototypes(ranking: Tensor, feats: Tensor, top_k: int) -> Tensor:
    """p_c = normalise(sum_{i in top-K(c)} m_ic f_i / sum_{i in top-K(c)} m_ic), every class c.

    ranking: (B, C, H, W) confidences m >= 0 (`ranking_map`, or `pseudo_labels(...)[0]`).
    feats: (B, D, H, W) projected features f, before L2 normalisation (as the reference).
    top_k: K, pixels per class, taken from the whole batch (B*H*W pixels).
    Returns P (C, D): unit rows, or all-zero rows for classes with no positive confidence (no
    prototype this batch: `has_prototype`).
    """
    check_finite("feats", feats)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    c, d = ranking.shape[1], feats.shape[1]
    confidence = ranking.transpose(0, 1).reshape(c, -1)  # (C, B*H*W): the batch is one pool
    pixels = feats.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
    # Ties (frequent: background = 1 wherever no class fires) go to the lowest pixel index: the
    # rule under which data-parallel ranks pick what one process would (fused.topk_candidates).
    m, index = confidence.sort(dim=1, descending=True, stable=True)
    m, index = m[:, :top_k], index[:, :top_k]  # (C, K)
    weighted_sum = (m[:, :, None] * pixels[index]).sum(dim=1)  # (C, D)
    mean = weighted_sum / m.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return F.normalize(mean, dim=1)  # a zero row stays zero


def has_prototype(prototypes: Tensor) -> Tensor:
    """(C,) bool: rows of P that are prototypes, not the all-zero placeholder of an empty class."""
    return prototypes.abs().sum(dim=1) > 0


def unit_pixels(feats: Tensor) -> Tensor:
    """v_i = f_i / |f_i|: (B, D, H, W) projected features -> (B*H*W, D) unit rows, float32 at
    least, with gradient. Rows are in (b, h, w) order, like `pseudo_labels(...)[1].flatten()`."""
    d = feats.shape[1]
    flat = feats.to(compute_dtype(feats)).permute(0, 2, 3, 1).reshape(-1, d)
    return F.normalize(flat, dim=1)


# --- The contrast F(v; y; P) -----------------------------------------------------------------

def _logits(feats: Tensor, prototypes: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """v @ P.T / tau (N, C) in float32 at least, NO_PROTOTYPE in the columns of missing
    prototypes, and which prototypes exist (C,)."""
    dtype = compute_dtype(feats)
    valid = has_prototype(prototypes)
    logits = feats.to(dtype) @ prototypes.to(dtype).T / tau
    return logits.masked_fill(~valid, NO_PROTOTYPE), valid


def prototype_contrast(feats: Tensor, y: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """mean_i F(v_i; y_i; P), F = -log softmax(v @ P.T / tau)[y]: the paper's contrast.

    feats: (N, D) unit vectors v; y: (N,) int64 in [0, C); prototypes: (C, D) unit or all-zero
    rows. All-zero rows (classes without a prototype) leave the softmax, and pixels whose label
    has none leave the mean. Stable for small tau (log-softmax, never exp-then-log).
    """
    check_contrast_inputs(feats, y, prototypes, tau)
    logits, valid = _logits(feats, prototypes, tau)
    per_pixel = F.cross_entropy(logits, y, reduction="none")
    keep = valid[y]
    return (per_pixel * keep).sum() / keep.sum().clamp_min(1)


# --- Cross-view terms ------------------------------------------------------------------------

@dataclass
class TermInputs:
    """What every PPC term reads. Index 0 = source view s, 1 = target view t (same pixels)."""

    v: tuple[Tensor, Tensor]  # (N, D) unit pixel features v, with gradient
    y: tuple[Tensor, Tensor]  # (N,) pseudo labels ŷ
    p: tuple[Tensor, Tensor]  # (C, D) prototypes P (no gradient)
    cfg: PPCConfig
    sampler: Sampler
    generator: torch.Generator | None = None


Term = Callable[[TermInputs], Tensor]


def cross_prototype(x: TermInputs) -> Tensor:
    """L_cp = (F(v^s; ŷ^s; P^t) + F(v^t; ŷ^t; P^s)) / 2: own labels, the other view's prototypes."""
    (v_s, v_t), (y_s, y_t), (p_s, p_t) = x.v, x.y, x.p
    tau = x.cfg.tau
    return (prototype_contrast(v_s, y_s, p_t, tau) + prototype_contrast(v_t, y_t, p_s, tau)) / 2


def cross_cam(x: TermInputs) -> Tensor:
    """L_cc = (F(v^s; ŷ^t; P^s) + F(v^t; ŷ^s; P^t)) / 2: the other view's labels, own prototypes."""
    (v_s, v_t), (y_s, y_t), (p_s, p_t) = x.v, x.y, x.p
    tau = x.cfg.tau
    return (prototype_contrast(v_s, y_t, p_s, tau) + prototype_contrast(v_t, y_s, p_t, tau)) / 2


# --- Intra-view term: semi-hard prototype mining, hard pixel sampling ------------------------

def semi_hard_negatives(sim: Tensor, prototypes: Tensor, drop: int, keep: int) -> Tensor:
    """Per pixel, the prototypes ranked drop..drop+keep by similarity (nearest first).

    sim: (N, C) pixel-prototype similarities (or logits); prototypes: (C, D). Returns (N, keep')
    int64 with keep' = min(keep, C - drop); missing prototypes rank last.
    """
    masked = sim.detach().to(compute_dtype(sim)).masked_fill(~has_prototype(prototypes),
                                                             NO_PROTOTYPE)
    return masked.sort(dim=1, descending=True).indices[:, drop:drop + keep]


@torch.no_grad()
def hard_pixel_weights(
    similarity: Tensor,
    y: Tensor,
    num_classes: int,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """How many times each pixel enters its class's intra-view mean (0, 1 or 2).

    Per class with n pixels: a random floor(random_ratio * n) of them, plus those whose
    similarity rank (ascending, hardest first) lies in [floor(rank_lo * n), floor(rank_hi * n)).
    A pixel in both sets counts twice, as the reference concatenates the two index lists.
    similarity: (N,) similarity to the own prototype (or any increasing function of it: only
    its order counts; ties go to the lower index); y: (N,) labels in [0, num_classes).
    The random share: the pixels with the smallest of N uniform draws from `generator` (on CPU).
    Returns (N,) float32 weights.
    """
    n_class = torch.bincount(y, minlength=num_classes)[y]  # (N,) size of each pixel's class
    noise = torch.rand(y.shape[0], generator=generator, device="cpu").to(y.device)
    random_rank = _rank_within_class(noise, y, num_classes)
    hardness_rank = _rank_within_class(similarity.detach(), y, num_classes)  # 0 = hardest

    def share(ratio: float) -> Tensor:  # floor(ratio * n), in float64 (float32 floors 0.65*180 to 116)
        return (n_class.double() * ratio).long()

    in_random = random_rank < share(random_ratio)
    in_window = (hardness_rank >= share(rank_lo)) & (hardness_rank < share(rank_hi))
    return in_random.float() + in_window.float()


def _rank_within_class(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(N,) each pixel's position among its class's pixels ordered by x ascending, ties by index."""
    by_x = x.argsort(stable=True)
    order = by_x[y[by_x].argsort(stable=True)]  # class by class, each by x, ties by index
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    counts = torch.bincount(y, minlength=num_classes)
    return position - (counts.cumsum(0) - counts)[y]  # minus where the pixel's class starts


def intra_view_contrast(
    feats: Tensor,
    y: Tensor,
    prototypes: Tensor,
    tau: float,
    neg_drop: int,
    neg_keep: int,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
) -> Tensor:
    """L_intra of one view: F over the positive and the semi-hard negatives, on sampled pixels.

    feats: (N, D) unit vectors v; y: (N,) ŷ; prototypes: (C, D) P of the same view. Per pixel
    the softmax runs over v·p_ŷ/tau and the prototypes ranked neg_drop..neg_drop+neg_keep
    (`semi_hard_negatives`); per class the loss is the mean over its pixels weighted by
    `sampler` (default `hard_pixel_weights`); the result is the mean over the classes with a
    prototype and at least 2 pixels (and any weight).
    """
    check_contrast_inputs(feats, y, prototypes, tau)
    c = prototypes.shape[0]
    logits, valid = _logits(feats, prototypes, tau)  # (N, C)
    positive = logits.gather(1, y[:, None])  # (N, 1)
    negatives = logits.gather(1, semi_hard_negatives(logits, prototypes, neg_drop, neg_keep))
    per_pixel = -torch.cat([positive, negatives], dim=1).log_softmax(dim=1)[:, 0]  # (N,)
    # The logit is an increasing function of the similarity: it ranks pixels alike.
    weight = (sampler or hard_pixel_weights)(positive.detach().squeeze(1), y, c, random_ratio,
                                             rank_lo, rank_hi, generator).to(per_pixel.dtype)
    class_weight = per_pixel.new_zeros(c).index_add(0, y, weight)  # (C,)
    class_loss = per_pixel.new_zeros(c).index_add(0, y, weight * per_pixel)
    use = (torch.bincount(y, minlength=c) >= 2) & valid & (class_weight > 0)
    if not use.any():
        return per_pixel.sum() * 0.0  # a zero that stays in the graph
    return (class_loss[use] / class_weight[use]).mean()


def intra_view(x: TermInputs) -> Tensor:
    """L_intra = (intra(v^s; ŷ^s; P^s) + intra(v^t; ŷ^t; P^t)) / 2, each view on its own."""
    c = x.cfg
    neg_keep = c.neg_keep(x.p[0].shape[0])
    per_view = [intra_view_contrast(v, y, p, c.tau, c.neg_drop, neg_keep, c.hard_random_ratio,
                                    c.hard_rank_lo, c.hard_rank_hi, x.generator, x.sampler)
                for v, y, p in zip(x.v, x.y, x.p, strict=True)]
    return (per_view[0] + per_view[1]) / 2


# --- The loss: every registered term ---------------------------------------------------------

# Output name -> term. The objective weights each by the same name (`PPCWeights`).
TERMS: dict[str, Term] = {
    "cross_proto": cross_prototype,
    "cross_cam": cross_cam,
    "intra": intra_view,
}

GatherFn = Callable[[Tensor], Tensor]


def view_inputs(feats: Tensor, cam: Tensor, labels: Tensor, cfg: PPCConfig,
                gather: GatherFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One view's v (N, D), ŷ (N,) and P (C, D), from feats (B, D, H, W) and cam (B, C, H, W).

    gather (optional) concatenates a tensor along dim 0 across data-parallel processes: the
    prototypes then come from the global batch, as one process holding all of it would build them.
    """
    norm_cam, y = pseudo_labels(cam, labels, cfg.bg_threshold)
    ranking = ranking_map(cam, norm_cam, cfg.prototype_ranking)
    pool = feats.detach()
    if gather is not None:
        ranking, pool = gather(ranking.contiguous()), gather(pool.contiguous())
    prototypes = estimate_prototypes(ranking, pool, cfg.top_k(cam.shape[2], cam.shape[3]))
    return unit_pixels(feats), y.flatten(), prototypes


def term_inputs(
    feats_s: Tensor,
    cam_s: Tensor,
    feats_t: Tensor,
    cam_t: Tensor,
    labels: Tensor,
    cfg: PPCConfig,
    generator: torch.Generator | None = None,
    gather: GatherFn | None = None,
    sampler: Sampler | None = None,
) -> TermInputs:
    """What the terms read, for a source and a target view on a common grid.

    feats_*: (B, D, H, W) projector outputs; cam_*: (B, C, H, W) raw CAMs; labels: (B, C-1).
    """
    (v_s, y_s, p_s), (v_t, y_t, p_t) = (view_inputs(f, cam, labels, cfg, gather)
                                        for f, cam in ((feats_s, cam_s), (feats_t, cam_t)))
    return TermInputs((v_s, v_t), (y_s, y_t), (p_s, p_t), cfg, sampler or hard_pixel_weights,
                      generator)


def reference_terms(x: TermInputs) -> dict[str, Tensor]:
    """The PPC loss: every term of `TERMS`, unweighted, by name."""
    return {name: term(x) for name, term in TERMS.items()}
