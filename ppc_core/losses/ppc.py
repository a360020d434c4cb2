"""Pixel-to-Prototype Contrast (Du et al., CVPR 2022): pseudo labels, prototypes and the loss.

Every constant of the authors' reference code is a field of `PPCConfig`; see
`shared/method.md` for where our defaults follow the code rather than the paper.
All functions are vectorised over pixels and classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ppc_core.losses.seam import max_norm

_EPS = 1e-5


@dataclass
class PPCConfig:
    """The PPC regulariser's knobs, defaults from the reference code."""

    tau: float = 0.1
    # K = top_k_ratio * (pixels of one image on the loss grid): 16x16 // 8 = 32 in the reference.
    top_k_ratio: float = 0.125
    bg_threshold: float = 0.20
    w_cross_proto: float = 0.1
    w_cross_cam: float = 0.1
    w_intra: float = 0.1
    # Semi-hard prototype mining: drop the `neg_drop` nearest prototypes, keep the next
    # round(neg_keep_ratio * num_prototypes) (3 and 10 of 21 in the reference).
    neg_drop: int = 3
    neg_keep_ratio: float = 10 / 21
    # Hard pixel sampling per class: a random share plus a similarity-rank window (hardest first).
    hard_random_ratio: float = 0.5
    hard_rank_lo: float = 0.1
    hard_rank_hi: float = 0.6
    # "complement": background confidence = 1 - max foreground (ours); "reference": the constant
    # bg_threshold channel and unmasked class maps, as the reference ranks them.
    prototype_ranking: str = "complement"

    def __post_init__(self) -> None:
        _check_positive("tau", self.tau)
        for name in ("top_k_ratio", "neg_keep_ratio", "hard_random_ratio", "hard_rank_hi"):
            _check_unit_interval(name, getattr(self, name))
        if not 0.0 <= self.hard_rank_lo < self.hard_rank_hi:
            raise ValueError(
                f"hard_rank_lo must be in [0, hard_rank_hi={self.hard_rank_hi}), got {self.hard_rank_lo}"
            )
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise ValueError(f"bg_threshold must be in [0, 1], got {self.bg_threshold}")
        for name in ("w_cross_proto", "w_cross_cam", "w_intra"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.neg_drop < 0:
            raise ValueError(f"neg_drop must be >= 0, got {self.neg_drop}")
        if self.prototype_ranking not in ("complement", "reference"):
            raise ValueError(
                "prototype_ranking must be 'complement' or 'reference', "
                f"got {self.prototype_ranking!r}"
            )


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_finite(name: str, x: Tensor) -> None:
    # One reduction instead of an elementwise test: NaN or inf anywhere makes the sum non-finite.
    if not torch.isfinite(x.detach().sum()):
        raise ValueError(f"{name} contains NaN or inf values")


def top_k_for(height: int, width: int, ratio: float) -> int:
    """K for one image's `height x width` grid: the reference's h*w // 8 at ratio 1/8."""
    return max(1, int(height * width * ratio))


def normalise_cam(cam: Tensor) -> Tensor:
    """Per image and class min-max normalisation of relu(cam) to [0, 1], without gradient.

    cam: (B, K, H, W) raw scores. Returns (B, K, H, W); pixels at the minimum are 0. The same
    normalisation as SEAM's terms, so pseudo labels and the ER / ECR targets agree.
    """
    return max_norm(cam.detach().float(), _EPS)


def _validate_cam_labels(cam: Tensor, labels: Tensor) -> None:
    if cam.dim() != 4:
        raise ValueError(f"cam must be (B, C+1, H, W), got shape {tuple(cam.shape)}")
    if labels.dim() != 2 or labels.shape[0] != cam.shape[0] or labels.shape[1] + 1 != cam.shape[1]:
        raise ValueError(
            f"labels must be (B, C) = ({cam.shape[0]}, {cam.shape[1] - 1}) to match cam "
            f"{tuple(cam.shape)}, got {tuple(labels.shape)}"
        )
    if not (labels.sum(dim=1) > 0).all():
        bad = (labels.sum(dim=1) <= 0).nonzero().flatten().tolist()
        raise ValueError(f"labels: images {bad} have no foreground class")
    _check_finite("cam", cam)


@torch.no_grad()
def pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float = 0.20) -> tuple[Tensor, Tensor]:
    """Pseudo labels from a CAM, as method.md's four steps.

    cam: (B, C+1, H, W) raw scores, channel 0 = background (its raw value is ignored).
    labels: (B, C) multi-hot image labels.
    Returns norm_cam (B, C+1, H, W) in [0, 1] with absent classes zeroed and channel 0 =
    bg_threshold, and y (B, H, W) int64 = argmax of softmax(norm_cam).
    """
    _validate_cam_labels(cam, labels)
    if not 0.0 <= bg_threshold <= 1.0:
        raise ValueError(f"bg_threshold must be in [0, 1], got {bg_threshold}")
    norm = normalise_cam(cam)
    norm[:, 0] = bg_threshold
    mask = F.pad(labels.to(norm.dtype), (1, 0), value=1.0)[:, :, None, None]
    norm = norm * mask
    # softmax is monotone, so argmax of the scores is argmax of the masked map itself; max()
    # returns the same first-maximum index and reduces over a strided dim ~4x faster on CPU.
    return norm, norm.max(dim=1).indices


def ranking_map(cam: Tensor, norm_cam: Tensor, mode: str = "complement") -> Tensor:
    """The confidence by which pixels compete to build each class prototype.

    cam: (B, C+1, H, W) raw scores; norm_cam: the first output of `pseudo_labels`.
    "complement": absent classes 0, background = 1 - max foreground confidence.
    "reference": unmasked normalised CAM with the constant bg_threshold channel, so absent
    classes still get prototypes and the background top-K is a tie-break (the reference's quirk).
    Returns (B, C+1, H, W).
    """
    if mode == "reference":
        rank = normalise_cam(cam)
        rank[:, 0] = norm_cam[:, 0]
        return rank
    rank = norm_cam.clone()
    rank[:, 0] = 1.0 - norm_cam[:, 1:].amax(dim=1)
    return rank


def _pixel_logits(feats: Tensor, scaled_prototypes: Tensor) -> Tensor:
    """Cosine similarity of every pixel to every prototype, times 1/tau.

    feats: (B, D, H, W) raw projector output; scaled_prototypes: (K, D) = prototypes / tau.
    Returns (B*H*W, K). A batched matmul and a division by each pixel's norm give what
    normalising an (N, D) copy of the features first would, at a fraction of the memory traffic.
    """
    flat = feats.float().flatten(2)  # (B, D, HW), a view
    scores = scaled_prototypes @ flat  # (B, K, HW)
    # sqrt of a clamped sum of squares: F.normalize's eps, a zero vector stays gradient-free,
    # and it runs ~3x faster than norm() over the strided channel dim on CPU.
    norms = (flat * flat).sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()
    return (scores / norms).transpose(1, 2).reshape(-1, scaled_prototypes.shape[0])


@torch.no_grad()
def topk_candidates(confidence: Tensor, feats: Tensor, top_k: int,
                    views: int = 1) -> tuple[Tensor, Tensor]:
    """Each class's `top_k` most confident pixels of a (local) batch.

    confidence: (B, K, H, W) ranking map; feats: (B, D, H, W) projected features.
    Returns values (K, k) and features (K, k, D), k = min(top_k, B*H*W). The prototype of a
    data-parallel batch is the top-K of every rank's candidates (see `prototypes_from_candidates`).
    With `views` V > 1 the batch is V views stacked (B = V*B'), each with its own pool: rows
    (V*K, ...) in view-major order.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if confidence.shape[0] != feats.shape[0] or confidence.shape[2:] != feats.shape[2:]:
        raise ValueError(
            f"norm_cam {tuple(confidence.shape)} and feats {tuple(feats.shape)} must share "
            "batch and spatial dimensions"
        )
    b, k, h, w = confidence.shape
    conf = confidence.reshape(views, b // views, k, h * w).transpose(1, 2)
    values, index = _stable_topk(conf.reshape(views * k, -1), top_k)  # pixels in (b, h, w) order
    # Gather the k rows straight from the (V, B', D, H*W) maps: no (N, D) copy of the features.
    flat = feats.detach().float().reshape(views, b // views, feats.shape[1], h * w)
    view = torch.arange(views, device=index.device).repeat_interleave(k)[:, None]
    return values, flat[view, index // (h * w), :, index % (h * w)]


def _stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest entries, ties at the k-th value going to the lowest indices.

    Confidences tie often (background = 1 wherever no class fires). With this rule the
    candidates of N processes, concatenated in rank order, select the very pixels one process
    holding the whole batch would. x: (K, M) -> values, indices (K, k) in ascending index order.
    """
    k = min(k, x.shape[1])
    kth = x.topk(k, dim=1).values[:, -1:]
    above, tie = x > kth, x == kth
    need = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tie & (tie.cumsum(dim=1) <= need))
    index = chosen.nonzero()[:, 1].view(x.shape[0], k)
    return x.gather(1, index), index


@torch.no_grad()
def prototypes_from_candidates(values: Tensor, cand: Tensor, top_k: int) -> Tensor:
    """Confidence-weighted mean of the top-K candidates, L2-normalised.

    values: (K, M) confidences; cand: (K, M, D) features. Returns (K, D); a class whose weight
    sum is not positive gets an all-zero row (no prototype this batch).
    """
    if values.shape[1] > top_k:  # candidates of several processes: keep the global top-K
        values, index = _stable_topk(values, top_k)
        cand = cand.gather(1, index[:, :, None].expand(-1, -1, cand.shape[2]))
    weight = values.sum(dim=1, keepdim=True)
    proto = torch.einsum("km,kmd->kd", values, cand) / weight.clamp_min(1e-12)
    proto = F.normalize(proto, dim=1)
    return torch.where(weight > 0, proto, torch.zeros_like(proto))


@torch.no_grad()
def estimate_prototypes(norm_cam: Tensor, feats: Tensor, top_k: int) -> Tensor:
    """Class prototypes from the whole batch's top-K most confident pixels.

    norm_cam: (B, C+1, H, W) confidences (e.g. `pseudo_labels(...)[0]` or `ranking_map`).
    feats: (B, D, H, W) projected features, before L2 normalisation (as the reference).
    Returns (C+1, D) unit rows, or all-zero rows for classes with no positive confidence.
    """
    _check_finite("feats", feats)
    return prototypes_from_candidates(*topk_candidates(norm_cam, feats, top_k), top_k)


def _has_prototype(prototypes: Tensor) -> Tensor:
    """(K,) bool: rows that are prototypes, not the all-zero placeholder of an empty class."""
    return prototypes.abs().sum(dim=1) > 0


# A logit for "no prototype": exp() of it is 0 next to any real logit, yet it stays finite,
# so no row of a softmax can turn into NaN.
_NO_PROTOTYPE = -1e9


def _masked(logits: Tensor, valid: Tensor) -> Tensor:
    return logits.masked_fill(~valid, _NO_PROTOTYPE)


def _check_contrast_inputs(feats: Tensor, y: Tensor, prototypes: Tensor, tau: float) -> None:
    _check_positive("tau", tau)
    if feats.dim() != 2 or prototypes.dim() != 2 or feats.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"feats must be (N, D) and prototypes (K, D); got {tuple(feats.shape)} and "
            f"{tuple(prototypes.shape)}"
        )
    if y.shape != feats.shape[:1]:
        raise ValueError(f"y must be (N,) = ({feats.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= prototypes.shape[0]):
        raise ValueError(f"y must be in [0, {prototypes.shape[0]}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    _check_finite("feats", feats)


def _kept_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of `values` over the last dim where `keep` (bool, same shape); where nothing is kept,
    a zero that stays in the graph. Excluded values only need to be finite."""
    return (values * keep).sum(dim=-1) / keep.sum(dim=-1).clamp_min(1)


def prototype_contrast(feats: Tensor, y: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """Mean over pixels of F(v; y; P) = cross-entropy of v @ P.T / tau against y.

    feats: (N, D) unit vectors; y: (N,) int64 in [0, K); prototypes: (K, D) unit or all-zero
    rows. All-zero rows (classes without a prototype) leave the softmax, and pixels whose label
    has none leave the mean. Stable for small tau (log-softmax, never exp-then-log).
    """
    _check_contrast_inputs(feats, y, prototypes, tau)
    valid = _has_prototype(prototypes)
    logits = _masked(feats @ prototypes.T / tau, valid)
    return _kept_mean(F.cross_entropy(logits, y, reduction="none"), valid[y])


def semi_hard_negatives(sim: Tensor, prototypes: Tensor, drop: int, keep: int) -> Tensor:
    """Per pixel, the prototypes ranked drop..drop+keep by similarity (nearest first).

    sim: (N, K) pixel-prototype similarities; prototypes: (K, D). Returns (N, keep') int64 with
    keep' = min(keep, K - drop); missing prototypes rank last.
    """
    return _semi_hard(_masked(sim, _has_prototype(prototypes)), drop, keep)


def _semi_hard(masked: Tensor, drop: int, keep: int) -> Tensor:
    # Rows are short (C+1 prototypes): one sort beats topk here.
    return masked.detach().sort(dim=1, descending=True).indices[:, drop:drop + keep]


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
    its order counts); y: (N,) labels in [0, num_classes). Returns (N,) float weights.
    """
    n = y.shape[0]
    counts = torch.bincount(y, minlength=num_classes)
    start = counts.cumsum(0) - counts
    n_own = counts[y].double()  # float32 floors 0.65 * 180 to 116

    class_key = y.double() * 2

    def rank_within_class(key: Tensor) -> Tensor:
        # One sort of class + key in [0, 1] (float64 keeps a float32 key's order): positions
        # inside each class block are the ranks.
        order = (class_key + key).argsort(stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=y.device) - start[y[order]]
        return rank

    noise = torch.rand(n, generator=generator, device="cpu").to(y.device, torch.float64)
    in_random = rank_within_class(noise) < torch.floor(random_ratio * n_own)
    key = similarity.detach().double()
    sim_rank = rank_within_class((key - key.min()) / (key.max() - key.min()).clamp_min(1e-300))
    in_window = (sim_rank >= torch.floor(rank_lo * n_own)) & (sim_rank < torch.floor(rank_hi * n_own))
    return in_random.to(similarity.dtype) + in_window.to(similarity.dtype)


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
) -> Tensor:
    """Intra-view contrast with semi-hard prototype mining and hard pixel sampling.

    feats: (N, D) unit vectors; y: (N,); prototypes: (K, D). The softmax runs over the positive
    and the semi-hard negatives; the loss is the sampled-pixel mean per class, averaged over
    classes with at least 2 pixels.
    """
    _check_contrast_inputs(feats, y, prototypes, tau)
    valid = _has_prototype(prototypes)
    return _intra_from_logits(_masked(feats @ prototypes.T / tau, valid), y, y, valid,
                              neg_drop, neg_keep, random_ratio, rank_lo, rank_hi, generator)


def _intra_from_logits(
    logits: Tensor,
    y: Tensor,
    group: Tensor,
    group_valid: Tensor,
    neg_drop: int,
    neg_keep: int,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None,
) -> Tensor:
    """`intra_view_contrast` given masked logits (M, K) (see `_masked`), for V stacked views.

    y: (M,) labels in [0, K); group: (M,) = y + K * view in [0, V*K); group_valid: (V*K,) whether
    each view's class has a prototype. Returns the mean over views of the per-view intra term.
    """
    num_groups = group_valid.shape[0]
    neg = _semi_hard(logits, neg_drop, neg_keep)
    pos = logits.gather(1, y[:, None])
    per_pixel = -torch.cat([pos, logits.gather(1, neg)], dim=1).log_softmax(dim=1)[:, 0]
    # The logit is an increasing function of the similarity, so it ranks pixels alike.
    weight = hard_pixel_weights(
        pos[:, 0], group, num_groups, random_ratio, rank_lo, rank_hi, generator
    ) * group_valid[group]
    counts = torch.bincount(group, minlength=num_groups)
    loss_sum = torch.zeros(num_groups, dtype=per_pixel.dtype, device=y.device).index_add(
        0, group, per_pixel * weight
    )
    weight_sum = torch.zeros_like(loss_sum).index_add(0, group, weight)
    use = (counts >= 2) & (weight_sum > 0)
    views = num_groups // logits.shape[1]
    class_mean = loss_sum / weight_sum.clamp_min(1e-12)
    # A view with no usable class adds a (graph-connected) zero, as the reference would.
    return _kept_mean(class_mean.view(views, -1), use.view(views, -1)).mean()


GatherFn = Callable[[Tensor], Tensor]


class PPCLoss(torch.nn.Module):
    """Cross-prototype, cross-CAM and intra-view contrast between two aligned views.

    `gather` (optional) concatenates a tensor along dim 0 across data-parallel processes, so
    prototypes come from the global batch exactly as one process holding all of it would.
    """

    def __init__(self, cfg: PPCConfig, gather: GatherFn | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.gather = gather

    def prototypes(self, cam: Tensor, feats: Tensor, labels: Tensor,
                   views: int = 1) -> tuple[Tensor, Tensor]:
        """Pseudo labels (B*H*W,) and prototypes (V*(C+1), D) of V views stacked along B."""
        norm, y = pseudo_labels(cam, labels, self.cfg.bg_threshold)
        rank = ranking_map(cam, norm, self.cfg.prototype_ranking)
        top_k = top_k_for(cam.shape[2], cam.shape[3], self.cfg.top_k_ratio)
        values, cand = topk_candidates(rank, feats, top_k, views)
        if self.gather is not None:
            values = self.gather(values.T.contiguous()).T
            cand = self.gather(cand.transpose(0, 1).contiguous()).transpose(0, 1)
        return y.reshape(-1), prototypes_from_candidates(values, cand, top_k)

    def forward(
        self,
        feats_s: Tensor,
        cam_s: Tensor,
        feats_t: Tensor,
        cam_t: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for a source and a target view on a common grid.

        feats_*: (B, D, H, W) projector outputs; cam_*: (B, C+1, H, W) raw CAMs (the source ones
        already aligned onto the target grid); labels: (B, C) multi-hot.
        Returns the unweighted terms "cross_proto", "cross_cam", "intra" (each averaged over
        the two directions/views) and their weighted sum "total".
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
        _check_finite("feats_s", feats_s)
        _check_finite("feats_t", feats_t)
        c = self.cfg
        # The two views go through every step as one stacked batch: half the kernel launches.
        feats = torch.cat([feats_s, feats_t])
        y, both = self.prototypes(torch.cat([cam_s, cam_t]), feats, torch.cat([labels, labels]),
                                  views=2)
        k, n = both.shape[0] // 2, y.shape[0] // 2
        ok = _has_prototype(both)
        # Every term needs one of four logit maps (each view against each prototype set).
        lg = _masked(_pixel_logits(feats, both / c.tau), ok)  # (2N, 2K)
        ss, st, ts, tt = lg[:n, :k], lg[:n, k:], lg[n:, :k], lg[n:, k:]
        y_s, y_t, ok_s, ok_t = y[:n], y[n:], ok[:k], ok[k:]

        # The four cross terms (cross-prototype: st, ts; cross-CAM: ss, tt) as one stacked
        # cross-entropy: a few large ops instead of many small ones.
        keep = torch.cat([ok_t[y_s], ok_s[y_t], ok_s[y_t], ok_t[y_s]]).view(4, n)
        per_pixel = F.cross_entropy(torch.cat([st, ts, ss, tt]),
                                    torch.cat([y_s, y_t, y_t, y_s]), reduction="none")
        means = _kept_mean(per_pixel.view(4, n), keep)
        cross_proto, cross_cam = means[:2].mean(), means[2:].mean()
        neg_keep = max(1, round(c.neg_keep_ratio * k))
        own = torch.cat([ss, tt])  # each view against its own prototypes
        group = y + k * (torch.arange(2 * n, device=y.device) >= n)
        intra = _intra_from_logits(own, y, group, ok, c.neg_drop, neg_keep, c.hard_random_ratio,
                                   c.hard_rank_lo, c.hard_rank_hi, generator)
        total = c.w_cross_proto * cross_proto + c.w_cross_cam * cross_cam + c.w_intra * intra
        return {"cross_proto": cross_proto, "cross_cam": cross_cam, "intra": intra, "total": total}
