"""Pixel-to-Prototype Contrast (Du et al., CVPR 2022): pseudo labels, prototypes and the loss.

Every constant of the authors' reference code is a field of `PPCConfig`; see
`shared/method.md` for where our defaults follow the code rather than the paper.
All functions are vectorised over pixels and classes. At small grids a training step pays per
call, and more per distinct kernel (its code is cold after the network's convolutions, ~10 us
each on CPU), so the loss keeps to few kinds - gather, scatter_add_, max, strict comparisons -
where others would read as well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
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
    # The check reads the sum anyway, and math.isfinite of it costs no tensor op.
    if not math.isfinite(x.detach().sum()):
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
    has_fg = labels.any(dim=1)
    if not has_fg.all():
        bad = (~has_fg).nonzero().flatten().tolist()
        raise ValueError(f"labels: images {bad} have no foreground class")


@torch.no_grad()
def pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float = 0.20) -> tuple[Tensor, Tensor]:
    """Pseudo labels from a CAM, as method.md's four steps.

    cam: (B, C+1, H, W) raw scores, channel 0 = background (its raw value is ignored).
    labels: (B, C) multi-hot image labels.
    Returns norm_cam (B, C+1, H, W) in [0, 1] with absent classes zeroed and channel 0 =
    bg_threshold, and y (B, H, W) int64 = argmax of softmax(norm_cam).
    """
    _validate_cam_labels(cam, labels)
    _check_finite("cam", cam)
    if not 0.0 <= bg_threshold <= 1.0:
        raise ValueError(f"bg_threshold must be in [0, 1], got {bg_threshold}")
    return _pseudo_labels(cam, labels, bg_threshold)


def _pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float) -> tuple[Tensor, Tensor]:
    """`pseudo_labels` without the checks, for V views of the same B images stacked along the
    batch: cam (V*B, C+1, H, W), labels (B, C)."""
    norm = normalise_cam(cam)
    b, k = labels.shape[0], cam.shape[1]
    norm.view(-1, b, k, *cam.shape[2:])[:, :, 1:].mul_(labels[:, :, None, None])
    norm.select(1, 0).fill_(bg_threshold)
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
    return _complement_(norm_cam.clone())


def _complement_(norm_cam: Tensor) -> Tensor:
    """The "complement" ranking map, written over norm_cam's background channel."""
    torch.sub(1.0, norm_cam[:, 1:].max(dim=1).values, out=norm_cam[:, 0])
    return norm_cam


# F.normalize's eps: shorter vectors are divided by it instead of their norm.
_MIN_NORM = 1e-12
_AT_LEAST_FP32 = (torch.float32, torch.float64)


def _pixel_dot(a: Tensor, b: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per-pixel dot product over channels: a, b (B, D, HW) -> (B, 1, HW).

    keep: (1, D, 1) bool, the channels to count (default all). In chunks of ~2 MB: a full
    (B, D, HW) product would be a fresh buffer of the maps' size, and on CPU the page faults
    of fresh large buffers cost more than the arithmetic.
    """
    step = max(1, (1 << 19) // (a.shape[1] * a.shape[2]))
    dots = []
    for x, z in zip(a.split(step), b.split(step), strict=True) if step < len(a) else [(a, b)]:
        prod = x * z
        if keep is not None:
            prod.mul_(keep)
        dots.append(prod.sum(dim=1, keepdim=True))
    return dots[0] if len(dots) == 1 else torch.cat(dots)


class _CosineTerms(torch.autograd.Function):
    """Loss terms of the cosine similarities of every pixel of V views to every prototype.

    Forward: scaled prototypes (K, D) (= prototypes / tau, no gradient), valid (K,) bool,
    terms, then V maps (B, D, H, W). The logits table (V*B, K, H*W) holds the cosines times
    1/tau, class axis in the middle as the batched matmul writes it, and `_NO_PROTOTYPE` in the
    columns of missing prototypes; terms(table) -> (values (T,), backward) with backward(grad
    (T,)) -> d(grad . values) / d table, both without autograd. Returns values.
    The feature gradient, G / |f| - (G . f) f / |f|^3 with G = P.T @ d/dtable, is written out:
    it allocates the (V*B, D, H*W) result and nothing else of that size (autograd through
    f / |f| allocates several), and one autograd node serves every term.
    """

    @staticmethod
    def forward(ctx, scaled: Tensor, valid: Tensor, terms: Callable,  # noqa: ANN001
                *views: Tensor) -> Tensor:
        # Autograd is off in here: no detach; float32 at least (bf16 / fp16 under autocast).
        flats = [v.flatten(2) if v.dtype in _AT_LEAST_FP32 else v.float().flatten(2)
                 for v in views]
        b, hw = flats[0].shape[0], flats[0].shape[2]
        table = scaled.new_empty(len(views) * b, scaled.shape[0], hw)
        batched = scaled.expand(b, -1, -1)
        for i, flat in enumerate(flats):
            torch.bmm(batched, flat, out=table[i * b:(i + 1) * b])
        # A multiply and a sum: linalg.vector_norm costs ~4x as much at these sizes.
        sq = torch.cat([_pixel_dot(flat, flat) for flat in flats])  # (V*B, 1, HW)
        clamped = sq < _MIN_NORM ** 2
        inv_norm = sq.clamp_min_(_MIN_NORM ** 2).rsqrt_()
        keep = valid.view(1, -1, 1)
        table.mul_(inv_norm).masked_fill_(~keep, _NO_PROTOTYPE)
        values, ctx.grad_of = terms(table)
        ctx.save_for_backward(scaled, keep, inv_norm, clamped, table, *flats)
        ctx.dtypes = [v.dtype for v in views]
        ctx.shapes = [v.shape for v in views]
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        scaled, keep, inv_norm, clamped, table, *flats = ctx.saved_tensors
        # 1 / |f| scales each pixel's column: applied to the (V*B, K, HW) gradient, not to the
        # D-wide result.
        grad = ctx.grad_of(grad_values).view(table.shape).mul_(inv_norm)
        # G . f / |f|^2 = sum_k grad_k l_k / |f|^2 over the prototypes that exist: a dot over K
        # channels instead of D. Where the norm was clamped (a zero vector) it has no gradient.
        along = _pixel_dot(grad, table, keep).mul_(inv_norm).masked_fill_(clamped, 0.0)
        # One batched matmul for every view (missing prototypes: zero rows of P), then
        # G / |f| - f (G . f) / |f|^3 in place.
        g = torch.bmm(scaled.T.expand(grad.shape[0], -1, -1), grad)
        g_views = g.chunk(len(flats))
        for flat, g_view, along_view in zip(flats, g_views, along.chunk(len(flats)), strict=True):
            g_view.addcmul_(flat, along_view, value=-1.0)
        needed = ctx.needs_input_grad[3:]
        return None, None, None, *(x.view(shape).to(dtype) if need else None for x, shape, dtype, need
                                   in zip(g_views, ctx.shapes, ctx.dtypes, needed, strict=True))


@torch.no_grad()
def topk_candidates(confidence: Tensor, feats: Tensor | Sequence[Tensor],
                    top_k: int) -> tuple[Tensor, Tensor]:
    """Each class's `top_k` most confident pixels of a (local) batch.

    confidence: (B, K, H, W) ranking map (>= 0); feats: (B, D, H, W) projected features.
    Returns values (K, k), largest first, and features (K, k, D), k = min(top_k, B*H*W). The
    prototype of a data-parallel batch is the top-K of every rank's candidates (see
    `prototypes_from_candidates`).
    With V views, feats is the sequence of their maps and confidence their maps stacked
    along B: each view is its own pool, rows (V*K, ...) view-major.
    """
    views = [feats] if isinstance(feats, Tensor) else list(feats)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    b, k, h, w = confidence.shape
    if any(f.shape[0] * len(views) != b or f.shape[2:] != confidence.shape[2:] for f in views):
        raise ValueError(
            f"norm_cam {tuple(confidence.shape)} and feats {[tuple(f.shape) for f in views]} "
            "must share batch and spatial dimensions"
        )
    pools = confidence.reshape(len(views), b // len(views), k, h * w).transpose(1, 2)
    values, index = _stable_topk(pools.reshape(len(views) * k, -1), top_k)  # into (b, h, w)
    # Gather the k rows straight from the (B, D, H*W) maps: no (N, D) copy of the features.
    image = index // (h * w)
    pixel = index - image * (h * w)
    cand = [f.flatten(2)[image[v * k:(v + 1) * k], :, pixel[v * k:(v + 1) * k]]
            for v, f in enumerate(views)]
    return values, (cand[0] if len(cand) == 1 else torch.cat(cand)).float()


def _stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest entries, ties going to the lowest indices.

    Confidences tie often (background = 1 wherever no class fires). With this rule the
    candidates of N processes, concatenated in rank order, select the very pixels one process
    holding the whole batch would, in the same order. x: (K, M) confidences >= 0 (their float32
    bits order like integers). Returns values, indices (K, k), largest first, ties by index.
    """
    k = min(k, x.shape[1])
    # One top-k of int64 keys index - value bits * 2^32: smallest = largest value, then lowest
    # index; the low 32 bits give the index back. No tie pass and no host sync (GPU).
    keys = torch.sub(_arange(x.shape[1], x.device), x.float().view(torch.int32).long(),
                     alpha=1 << 32)
    index = keys.topk(k, dim=1, largest=False).values.bitwise_and_(0xFFFFFFFF)
    return x.gather(1, index), index


@torch.no_grad()
def prototypes_from_candidates(values: Tensor, cand: Tensor, top_k: int) -> Tensor:
    """Confidence-weighted mean of the top-K candidates, L2-normalised.

    values: (K, M) confidences >= 0; cand: (K, M, D) features. Returns (K, D); a class whose weight
    sum is not positive gets an all-zero row (no prototype this batch).
    """
    proto, norm = _weighted_sums(values, cand, top_k)
    return proto / norm.clamp_min(1e-12)


def _weighted_sums(values: Tensor, cand: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The confidence-weighted sums (K, D) of the top-K candidates and their norms (K, 1).

    The weighted mean's direction is the weighted sum's: the prototype needs no division by the
    weight sum. A class with no weight, or only zero features, gets a zero row of norm 0.
    """
    if values.shape[1] > top_k:  # candidates of several processes: keep the global top-K
        values, index = _stable_topk(values, top_k)
        cand = cand.gather(1, index[:, :, None].expand(-1, -1, cand.shape[2]))
    # Products and sums, not bmm and linalg.vector_norm: at these sizes their calls cost more.
    proto = (values[:, :, None] * cand).sum(dim=1)
    return proto, (proto * proto).sum(dim=1, keepdim=True).sqrt_()


@torch.no_grad()
def estimate_prototypes(norm_cam: Tensor, feats: Tensor, top_k: int) -> Tensor:
    """Class prototypes from the whole batch's top-K most confident pixels.

    norm_cam: (B, C+1, H, W) confidences >= 0 (e.g. `pseudo_labels(...)[0]` or `ranking_map`).
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
    """Mean of `values` where `keep` (bool, same shape); where nothing is kept, a zero that
    stays in the graph. Excluded values only need to be finite."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


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
    masked = _masked(sim.detach(), _has_prototype(prototypes))
    # Rows are short (C+1 prototypes): one sort beats topk here.
    return masked.sort(dim=1, descending=True).indices[:, drop:drop + keep]


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
    counts = torch.bincount(y, minlength=num_classes)
    return _hard_pixel_weights(similarity.detach(), y, counts, None, random_ratio, rank_lo,
                               rank_hi, generator)


def _hard_pixel_weights(
    similarity: Tensor,
    y: Tensor,
    counts: Tensor,
    eligible: Tensor | None,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None,
) -> Tensor:
    """`hard_pixel_weights` given the class sizes counts (C,); classes where eligible (C,) bool
    is False get no pixel."""
    n = y.shape[0]
    # Both rankings (random noise, similarity) in one stable sort of int64 keys (radix: ~10x
    # faster than float keys on CPU): ranking r of class c is block r * C + c, in the high bits,
    # so that every block is ranked at once. pos: each key's position in the sorted list, row 0
    # the noise keys, row 1 the similarity keys.
    block = y + _constant(((0,), (counts.shape[0],)), torch.int64, y.device)  # (2, n)
    noise = torch.rand(n, generator=generator, device="cpu").to(y.device)
    keys = torch.add(_ordered_int(torch.cat([noise, similarity])), block.view(-1), alpha=1 << 33)
    pos = torch.zeros_like(keys).scatter_add_(0, keys.argsort(stable=True),
                                              _arange(2 * n, y.device)).view(2, n)
    # Per class, the open interval of positions kept in each row: the random share at the start
    # of its noise block; [floor(lo * n), floor(hi * n)) of its similarity block (the similarity
    # keys come after all n noise keys). floor(ratio * n) in float64 (float32 floors 0.65 * 180
    # to 116); .long() truncates, which is the floor of these non-negative products.
    sampled = counts if eligible is None else counts * eligible
    ratios = _constant(((random_ratio,), (rank_hi,), (0.0,), (rank_lo,)), torch.float64, y.device)
    offsets = _constant(((0,), (n,), (-1,), (n - 1,)), torch.int64, y.device)
    bounds = (ratios * sampled).long() + (counts.cumsum(0) - counts + offsets)
    upper, lower = bounds.gather(1, y.expand(4, -1)).view(2, 2, n)
    return ((pos < upper) & (pos > lower)).sum(dim=0, dtype=similarity.dtype)


def _ordered_int(x: Tensor) -> Tensor:
    """int64 keys in [-2^31, 2^31) that order (and tie) like the finite float values x (N,)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return x.argsort(stable=True).argsort()  # ranks: exact for any dtype, just slower
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of the
    # negative ones makes them order like two's complement. + 0.0 turns -0.0 into 0.0 (a tie).
    bits = (x.float() + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


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
    table = _masked(feats @ prototypes.T / tau, valid).T  # (K, N): one view of one image

    def terms(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        value, grad = _intra_contrast(t[None, None], y[None, None], valid[None], neg_drop,
                                      neg_keep, random_ratio, rank_lo, rank_hi, generator)
        return value[None], lambda g: (grad * g).view(t.shape)

    return _ClosedFormGrad.apply(table, terms)[0]


class _ClosedFormGrad(torch.autograd.Function):
    """Loss terms whose gradient with respect to their input is known in closed form.

    forward(x, terms): terms(x) -> (values (T,), backward), computed without autograd;
    backward(grad (T,)) -> d(grad . values) / dx. The contrast terms read a few logits each
    through gathers, softmaxes and weighted means; recording all of that for autograd costs
    more, at small grids, than the arithmetic, so their gradient is written out instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, terms: Callable) -> Tensor:  # noqa: ANN001
        values, ctx.grad_of = terms(x)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return ctx.grad_of(grad), None


def _weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor,
                            dim: int = 1) -> tuple[Tensor, Tensor]:
    """Weighted per-element cross-entropies and their gradient, without autograd.

    logits: (N, K, *S) class scores (class axis `dim`); target: (N, *S) int64 in [0, K), may be
    an expanded view; weight: (N, *S). Returns losses (N, *S) = weight * CE(logits, target) and
    grad (N, K, *S) = d sum(losses) / d logits = weight * (softmax - one-hot of the target).
    """
    logp = logits.log_softmax(dim=dim)
    t, w = target.unsqueeze(dim), weight.unsqueeze(dim)
    neg_w = w * -1.0
    losses = logp.gather(dim, t).mul_(neg_w).squeeze(dim)
    return losses, logp.exp_().mul_(w).scatter_add_(dim, t, neg_w)


def _intra_contrast(
    own: Tensor,
    y: Tensor,
    valid: Tensor,
    neg_drop: int,
    neg_keep: int,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """`intra_view_contrast` of V views at once, on each view's logits against its own prototypes.

    own: (V, B, K, P) masked logits (see `_masked`), no autograd; y: (V, B, P) labels in [0, K);
    valid: (V, K) whether each view's class has a prototype. Returns the mean over views of the
    per-view intra term (a scalar) and its gradient (V, B, K, P).
    """
    v, b, k, p = own.shape
    offsets = _constant(tuple(((k * i,),) for i in range(v)), torch.int64, y.device)  # (V, 1, 1)
    group = (y + offsets).view(-1)  # (view, class) of every pixel
    pos = own.gather(2, y.unsqueeze(2))  # (V, B, 1, P)
    counts = torch.bincount(group, minlength=v * k)
    # The logit is an increasing function of the similarity, so it ranks pixels alike.
    weight = _hard_pixel_weights(pos.view(-1), group, counts, valid.view(-1), random_ratio,
                                 rank_lo, rank_hi, generator)
    # Semi-hard negatives of every pixel (unsampled ones get weight 0): the pixels' prototypes
    # ranked neg_drop.. by logit. Missing prototypes rank last with a logit whose exp() is 0,
    # so they change neither the kept negatives nor the softmax.
    ranked = own.sort(dim=2, descending=True)
    negatives = slice(neg_drop, neg_drop + neg_keep)
    logits = torch.cat([pos, ranked.values[:, :, negatives]], dim=2)  # positive first
    # Per class the weighted mean over its sampled pixels, per view the mean over classes with
    # >= 2 pixels, then the mean over views: one weighted sum of the pixels' losses.
    weight_sum = torch.bincount(group, weights=weight, minlength=v * k).view(v, k)
    use = (counts.view(v, k) > 1) & (weight_sum > 0)
    per_class = use / (weight_sum.clamp_min(1e-12) * (use.sum(dim=1, keepdim=True).clamp_min(1) * v))
    coef = per_class.view(-1).gather(0, group).mul_(weight)
    positive = _constant((0,), torch.int64, y.device).expand(v * b, p)  # the positive is logit 0
    losses, grad = _weighted_cross_entropy(logits.view(v * b, -1, p), positive, coef.view(v * b, p))
    classes = torch.cat([y.unsqueeze(2), ranked.indices[:, :, negatives]], dim=2)
    return losses.sum(), own.new_zeros(own.shape).scatter_add_(2, classes, grad.view(classes.shape))


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of Python numbers, built once per value: torch.tensor() costs more than
    most ops of the loss at small grids. Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _arange(n: int, device: torch.device) -> Tensor:
    """0..n-1, built once per n (read-only), like `_constant`."""
    return torch.arange(n, device=device)


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

    def prototypes(self, cam: Tensor, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo labels (B*H*W,) and prototypes (C+1, D) of one view."""
        _validate_cam_labels(cam, labels)
        _check_finite("cam", cam)
        y, ranking = self._labels_and_ranking(cam, labels)
        proto, norm = self._weighted_sums(ranking, feats)
        return y.reshape(-1), proto / norm.clamp_min(1e-12)

    def _labels_and_ranking(self, cam: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """cam: V views of the images of labels (B, C), stacked along the batch."""
        norm, y = _pseudo_labels(cam, labels, self.cfg.bg_threshold)
        if self.cfg.prototype_ranking == "complement":  # norm is ours to overwrite
            return y, _complement_(norm)
        return y, ranking_map(cam, norm, self.cfg.prototype_ranking)

    @torch.no_grad()
    def _weighted_sums(self, ranking: Tensor,
                       feats: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The module's `_weighted_sums` over every process's top-K candidates."""
        top_k = top_k_for(ranking.shape[2], ranking.shape[3], self.cfg.top_k_ratio)
        values, cand = topk_candidates(ranking, feats, top_k)
        if self.gather is not None:
            values = self.gather(values.T.contiguous()).T
            cand = self.gather(cand.transpose(0, 1).contiguous()).transpose(0, 1)
        return _weighted_sums(values, cand, top_k)

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
        the two directions/views) and their weighted sum "total". NaN or inf in an input
        raises a ValueError naming it.
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
        _validate_cam_labels(cam_s, labels)
        c = self.cfg
        b, k, h, w = cam_s.shape
        hw = h * w
        # Pseudo labels of both views in one pass; each view has its own prototypes.
        with torch.no_grad():
            cams = torch.cat([cam_s, cam_t])
            # A NaN or inf CAM score need not make the loss NaN (it may only move pseudo
            # labels): the CAMs' sum joins the loss value in the one finiteness check below.
            cam_sum = cams.sum()
            y, ranking = self._labels_and_ranking(cams, labels)
        # The norm of a class's weighted sum says whether it has a prototype, and scales it.
        proto, norm = self._weighted_sums(ranking, (feats_s, feats_t))
        ok = norm[:, 0] > 0

        # The four cross terms as one cross-entropy over the blocks: a block against the
        # prototypes of view j takes the labels of the other view (cross-prototype: v != j,
        # cross-CAM: v == j). Each term averages two (view, set) means over kept pixels.
        y = y.view(2, b, hw)
        swap = _constant((1, 0), torch.int64, y.device)
        target = y[swap].transpose(0, 1).expand(2, b, 2, hw)  # labels of view 1 - j
        keep = ok.view(1, 1, 2, k).expand(2, b, 2, k).gather(3, target)  # has a prototype
        weight = keep / keep.sum(dim=(1, 3), keepdim=True).clamp_min_(1)  # a mean per block
        # The terms and their weighted total from the four (view, set) means and intra, by mix:
        # a cross term is half the sum of its two means (the two directions).
        cp, cc, w_in = c.w_cross_proto / 2, c.w_cross_cam / 2, c.w_intra
        mix = ((0, .5, 0, cc), (.5, 0, 0, cp), (.5, 0, 0, cp), (0, .5, 0, cc), (0, 0, 1, w_in))
        neg_keep = max(1, round(c.neg_keep_ratio * k))

        # Every term reads one of four logit maps, each view against each prototype set:
        # table[v, i, j] = view v of image i against the prototypes of view j, (K, HW) per block.
        def terms(table: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
            table = table.view(2, b, 2, k, hw)
            losses, cross_grad = _weighted_cross_entropy(table, target, weight, dim=3)
            # Block (v, i, v): view v against its own prototypes.
            own = table.diagonal(dim1=0, dim2=2).permute(3, 0, 1, 2)
            intra, intra_grad = _intra_contrast(
                own, y, ok.view(2, k), c.neg_drop, neg_keep, c.hard_random_ratio,
                c.hard_rank_lo, c.hard_rank_hi, generator)
            m = _constant(mix, table.dtype, table.device)
            per_set = losses.sum(dim=(1, 3))  # (view, prototype set)

            # Products and sums, not matmuls: a (5, 4) matmul call costs several of them.
            def backward(g: Tensor) -> Tensor:
                scale = (m * g).sum(dim=1)
                grad = cross_grad * scale[:4].view(2, 1, 2, 1, 1)
                own_grad = grad.diagonal(dim1=0, dim2=2).permute(3, 0, 1, 2)
                own_grad.addcmul_(intra_grad, scale[4])
                return grad

            return (torch.cat([per_set.view(4, 1), intra.view(1, 1)]) * m).sum(dim=0), backward

        values = _CosineTerms.apply(proto / (norm.clamp_min(1e-12) * c.tau), ok, terms,
                                    feats_s, feats_t)
        if not math.isfinite(values.detach()[3] + cam_sum):  # one host read for every input
            for name, x in (("feats_s", feats_s), ("feats_t", feats_t), ("cam_s", cam_s),
                            ("cam_t", cam_t)):
                _check_finite(name, x)
            raise ValueError(f"the PPC loss is not finite: {values.tolist()}")
        return dict(zip(("cross_proto", "cross_cam", "intra", "total"), values.unbind(), strict=True))
