"""The fused PPC engine: every term from one table of logits, gradients in closed form.

`terms.py` states the loss; this module computes the same values and gradients (tests/losses/
test_impls.py) in a fraction of the time (benchmarks/bench_ppc_loss.py). Letters as in the
package legend (`ppc_core/losses/ppc/__init__.py`). How:
- `_CosineTerms`, one custom autograd node: the logits of every pixel of both views against both
  views' prototypes, (V*B, V*C, H*W), from batched matmuls and per-pixel inverse norms (tau is
  folded into the prototypes: `scaled` = P / tau); its backward writes the feature gradient out.
- The terms read that table without autograd; each returns its gradient with respect to the
  table in closed form (`_weighted_cross_entropy`: weight * (softmax - one-hot)).
- Prototypes and hard pixels come from sorts of int64 keys (`_stable_topk`, `_hard_pixel_weights`):
  a radix sort / top-k of integers, with ties resolved by index and no host sync.
At small grids a training step pays per call, and more per distinct kernel (its code is cold
after the network's convolutions, ~10 us each on CPU), so the engine keeps to few kinds - gather,
scatter_add_, max, strict comparisons - where others would read as well.

A term that only `terms.TERMS` knows is computed by `PPCLoss` with its readable function; a
sampler passed to `PPCLoss` replaces `_hard_pixel_weights` here without an edit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ppc_core.losses.ppc.config import PPCConfig, check_finite, compute_dtype
from ppc_core.losses.ppc.terms import NO_PROTOTYPE, GatherFn, Sampler, normalise_cam, ranking_map

# The terms this engine computes, in the order of its values.
FUSED_TERMS = ("cross_proto", "cross_cam", "intra")


def fused_terms(
    feats_s: Tensor,
    cam_s: Tensor,
    feats_t: Tensor,
    cam_t: Tensor,
    labels: Tensor,
    cfg: PPCConfig,
    generator: torch.Generator | None = None,
    gather: GatherFn | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Tensor]:
    """The terms of `FUSED_TERMS`, unweighted, as `terms.reference_terms` computes them.

    feats_*: (B, D, H, W); cam_*: (B, C, H, W) raw, on the same grid; labels: (B, C-1), already
    validated. NaN or inf in an input raises a ValueError naming it (one host read when all is
    finite).
    """
    b, c, h, w = cam_s.shape
    hw = h * w  # pixels per image
    # Pseudo labels of both views in one pass; each view has its own prototypes.
    with torch.no_grad():
        cams = torch.cat([cam_s, cam_t])
        # A NaN or inf CAM score need not make the loss NaN (it may only move pseudo labels):
        # the CAMs' sum joins the loss value in the one finiteness check below. In float32:
        # an fp16 sum of finite CAMs overflows (8 x 21 x 16 x 16 x 2 scores around -6 do).
        cam_sum = cams.sum(dtype=compute_dtype(cams))
        y, ranking = _labels_and_ranking(cams, labels, cfg)
    # The norm of a class's weighted sum says whether it has a prototype, and scales it.
    proto, norm = _weighted_sums_of_views(ranking, (feats_s, feats_t), cfg.top_k(h, w), gather)
    ok = norm[:, 0] > 0

    # The four cross blocks as one cross-entropy: a block against the prototypes of view j takes
    # the labels of the other view (L_cp: v != j, L_cc: v == j). Each term averages two
    # (view, set) means over the pixels whose label has a prototype.
    y = y.view(2, b, hw)
    swap = _constant((1, 0), torch.int64, y.device)
    target = y[swap].transpose(0, 1).expand(2, b, 2, hw)  # labels of view 1 - j
    keep = ok.view(1, 1, 2, c).expand(2, b, 2, c).gather(3, target)  # has a prototype
    weight = keep / keep.sum(dim=(1, 3), keepdim=True).clamp_min_(1)  # a mean per block
    # The terms from the four (view, set) sums and intra: a cross term is half the sum of its
    # two means (the two directions). Rows: (s, P^s), (s, P^t), (t, P^s), (t, P^t), intra.
    mix = ((0, .5, 0), (.5, 0, 0), (.5, 0, 0), (0, .5, 0), (0, 0, 1))
    neg_keep = cfg.neg_keep(c)

    # Every term reads one of four logit maps, each view against each prototype set:
    # table[v, i, j] = view v of image i against the prototypes of view j, (C, H*W) per block.
    def terms(table: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        table = table.view(2, b, 2, c, hw)
        losses, cross_grad = _weighted_cross_entropy(table, target, weight, dim=3)
        # Block (v, i, v): view v against its own prototypes.
        own = table.diagonal(dim1=0, dim2=2).permute(3, 0, 1, 2)
        intra, intra_grad = _intra_contrast(
            own, y, ok.view(2, c), cfg.neg_drop, neg_keep, cfg.hard_random_ratio,
            cfg.hard_rank_lo, cfg.hard_rank_hi, generator, sampler)
        m = _constant(mix, table.dtype, table.device)
        per_set = losses.sum(dim=(1, 3))  # (view, prototype set)

        # Products and sums, not matmuls: a (5, 3) matmul call costs several of them.
        def backward(g: Tensor) -> Tensor:
            scale = (m * g).sum(dim=1)
            grad = cross_grad * scale[:4].view(2, 1, 2, 1, 1)
            own_grad = grad.diagonal(dim1=0, dim2=2).permute(3, 0, 1, 2)
            own_grad.addcmul_(intra_grad, scale[4])
            return grad

        return (torch.cat([per_set.view(4, 1), intra.view(1, 1)]) * m).sum(dim=0), backward

    values = _CosineTerms.apply(proto / (norm.clamp_min(1e-12) * cfg.tau), ok, terms,
                                feats_s, feats_t)
    if not math.isfinite(values.detach().sum() + cam_sum):  # one host read for every input
        for name, x in (("feats_s", feats_s), ("feats_t", feats_t), ("cam_s", cam_s),
                        ("cam_t", cam_t)):
            check_finite(name, x)
        raise ValueError(f"the PPC loss is not finite: {values.tolist()}")
    return dict(zip(FUSED_TERMS, values.unbind(), strict=True))


def view_prototypes(cam: Tensor, feats: Tensor, labels: Tensor, cfg: PPCConfig,
                    gather: GatherFn | None = None) -> tuple[Tensor, Tensor]:
    """Pseudo labels (B*H*W,) and prototypes (C, D) of one view (validated inputs)."""
    y, ranking = _labels_and_ranking(cam, labels, cfg)
    proto, norm = _weighted_sums_of_views(ranking, feats, cfg.top_k(*cam.shape[2:]), gather)
    return y.reshape(-1), proto / norm.clamp_min(1e-12)


# --- Pseudo labels and prototypes (no gradient) ----------------------------------------------

def _labels_and_ranking(cam: Tensor, labels: Tensor, cfg: PPCConfig) -> tuple[Tensor, Tensor]:
    """cam: V views of the images of labels (B, C-1), stacked along the batch (V*B, C, H, W).
    Returns ŷ (V*B, H, W) and the ranking map (V*B, C, H, W), as `terms.pseudo_labels` and
    `terms.ranking_map` (in place, without the checks)."""
    norm, y = _pseudo_labels(cam, labels, cfg.bg_threshold)
    if cfg.prototype_ranking == "complement":  # norm is ours to overwrite
        return y, _complement_(norm)
    return y, ranking_map(cam, norm, cfg.prototype_ranking)


def _pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float) -> tuple[Tensor, Tensor]:
    """`terms.pseudo_labels` in place and without the checks, for V views of the same B images
    stacked along the batch: cam (V*B, C, H, W), labels (B, C-1)."""
    norm = normalise_cam(cam)
    b, c = labels.shape[0], cam.shape[1]
    norm.view(-1, b, c, *cam.shape[2:])[:, :, 1:].mul_(labels[:, :, None, None])
    norm.select(1, 0).fill_(bg_threshold)
    # max() returns the same first-maximum index as argmax and reduces over a strided dim ~4x
    # faster on CPU.
    return norm, norm.max(dim=1).indices


def _complement_(norm_cam: Tensor) -> Tensor:
    """The "complement" ranking map, written over norm_cam's background channel."""
    torch.sub(1.0, norm_cam[:, 1:].max(dim=1).values, out=norm_cam[:, 0])
    return norm_cam


@torch.no_grad()
def _weighted_sums_of_views(ranking: Tensor, feats: Tensor | Sequence[Tensor], top_k: int,
                            gather: GatherFn | None) -> tuple[Tensor, Tensor]:
    """`_weighted_sums` over every process's top-K candidates (gather: see `PPCLoss`)."""
    values, cand = topk_candidates(ranking, feats, top_k)
    if gather is not None:
        values = gather(values.T.contiguous()).T
        cand = gather(cand.transpose(0, 1).contiguous()).transpose(0, 1)
    return _weighted_sums(values, cand, top_k)



@torch.no_grad()
def topk_candidates(confidence: Tensor, feats: Tensor | Sequence[Tensor],
                    top_k: int) -> tuple[Tensor, Tensor]:
    """Each class's `top_k` most confident pixels of a (local) batch.

    confidence: (B, C, H, W) ranking map (>= 0); feats: (B, D, H, W) projected features.
    Returns values (C, M), largest first, and features (C, M, D), M = min(top_k, B*H*W). The
    prototype of a data-parallel batch is the top-K of every rank's candidates (see
    `prototypes_from_candidates`).
    With V views, feats is the sequence of their maps and confidence their maps stacked
    along B: each view is its own pool, rows (V*C, ...) view-major.
    """
    views = [feats] if isinstance(feats, Tensor) else list(feats)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    b, c, h, w = confidence.shape
    if any(f.shape[0] * len(views) != b or f.shape[2:] != confidence.shape[2:] for f in views):
        raise ValueError(
            f"norm_cam {tuple(confidence.shape)} and feats {[tuple(f.shape) for f in views]} "
            "must share batch and spatial dimensions"
        )
    pools = confidence.reshape(len(views), b // len(views), c, h * w).transpose(1, 2)
    values, index = _stable_topk(pools.reshape(len(views) * c, -1), top_k)  # into (b, h, w)
    # Gather the M rows straight from the (B, D, H*W) maps: no (N, D) copy of the features.
    image = index // (h * w)
    pixel = index - image * (h * w)
    cand = [f.flatten(2)[image[v * c:(v + 1) * c], :, pixel[v * c:(v + 1) * c]]
            for v, f in enumerate(views)]
    return values, (cand[0] if len(cand) == 1 else torch.cat(cand)).float()


def _stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest entries, ties going to the lowest indices.

    Confidences tie often (background = 1 wherever no class fires). With this rule the
    candidates of N processes, concatenated in rank order, select the very pixels one process
    holding the whole batch would, in the same order. x: (C, M) confidences >= 0 (their float32
    bits order like integers). Returns values, indices (C, k), largest first, ties by index.
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

    values: (C, M) confidences >= 0; cand: (C, M, D) features. Returns (C, D); a class whose weight
    sum is not positive gets an all-zero row (no prototype this batch).
    """
    proto, norm = _weighted_sums(values, cand, top_k)
    return proto / norm.clamp_min(1e-12)


def _weighted_sums(values: Tensor, cand: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The confidence-weighted sums (C, D) of the top-K candidates and their norms (C, 1).

    The weighted mean's direction is the weighted sum's: the prototype needs no division by the
    weight sum. A class with no weight, or only zero features, gets a zero row of norm 0.
    """
    if values.shape[1] > top_k:  # candidates of several processes: keep the global top-K
        values, index = _stable_topk(values, top_k)
        cand = cand.gather(1, index[:, :, None].expand(-1, -1, cand.shape[2]))
    # Products and sums, not bmm and linalg.vector_norm: at these sizes their calls cost more.
    proto = (values[:, :, None] * cand).sum(dim=1)
    return proto, (proto * proto).sum(dim=1, keepdim=True).sqrt_()


# --- The logits table and its gradient ------------------------------------------------------

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

    Forward: scaled prototypes (C, D) (= prototypes / tau, no gradient), valid (C,) bool,
    terms, then V maps (B, D, H, W). The logits table (V*B, C, H*W) holds the cosines times
    1/tau, class axis in the middle as the batched matmul writes it, and `NO_PROTOTYPE` in the
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
        table.mul_(inv_norm).masked_fill_(~keep, NO_PROTOTYPE)
        values, ctx.grad_of = terms(table)
        ctx.save_for_backward(scaled, keep, inv_norm, clamped, table, *flats)
        ctx.dtypes = [v.dtype for v in views]
        ctx.shapes = [v.shape for v in views]
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        scaled, keep, inv_norm, clamped, table, *flats = ctx.saved_tensors
        # 1 / |f| scales each pixel's column: applied to the (V*B, C, HW) gradient, not to the
        # D-wide result.
        grad = ctx.grad_of(grad_values).view(table.shape).mul_(inv_norm)
        # G . f / |f|^2 = sum_c grad_c l_c / |f|^2 over the prototypes that exist: a dot over C
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


# --- Closed-form terms ----------------------------------------------------------------------

def _weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor,
                            dim: int = 1) -> tuple[Tensor, Tensor]:
    """Weighted per-element cross-entropies and their gradient, without autograd.

    logits: (M, C, *S) class scores (class axis `dim`); target: (M, *S) int64 in [0, C), may be
    an expanded view; weight: (M, *S). Returns losses (M, *S) = weight * CE(logits, target) and
    grad (M, C, *S) = d sum(losses) / d logits = weight * (softmax - one-hot of the target).
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
    sampler: Sampler | None = None,
) -> tuple[Tensor, Tensor]:
    """`terms.intra_view` of V views at once, on each view's logits against its own prototypes.

    own: (V, B, C, H*W) masked logits, no autograd; y: (V, B, H*W) labels in [0, C); valid: (V, C)
    whether each view's class has a prototype. Returns the mean over views of the per-view
    intra term (a scalar) and its gradient (V, B, C, H*W).
    """
    v, b, c, hw = own.shape
    offsets = _constant(tuple(((c * i,),) for i in range(v)), torch.int64, y.device)  # (V, 1, 1)
    group = (y + offsets).view(-1)  # (view, class) of every pixel
    pos = own.gather(2, y.unsqueeze(2))  # (V, B, 1, H*W)
    counts = torch.bincount(group, minlength=v * c)
    # The logit is an increasing function of the similarity, so it ranks pixels alike.
    if sampler is None:
        weight = _hard_pixel_weights(pos.view(-1), group, counts, random_ratio, rank_lo,
                                     rank_hi, generator)
    else:
        weight = sampler(pos.view(-1), group, v * c, random_ratio, rank_lo, rank_hi,
                         generator).to(own.dtype)
    # Semi-hard negatives of every pixel (unsampled ones get weight 0): the pixels' prototypes
    # ranked neg_drop.. by logit. Missing prototypes rank last with a logit whose exp() is 0,
    # so they change neither the kept negatives nor the softmax.
    ranked = own.sort(dim=2, descending=True)
    negatives = slice(neg_drop, neg_drop + neg_keep)
    logits = torch.cat([pos, ranked.values[:, :, negatives]], dim=2)  # positive first
    # Per class the weighted mean over its sampled pixels, per view the mean over classes with
    # a prototype and >= 2 pixels, then the mean over views: one weighted sum of the losses.
    weight_sum = torch.bincount(group, weights=weight, minlength=v * c).view(v, c)
    use = (counts.view(v, c) > 1) & (weight_sum > 0) & valid
    per_class = use / (weight_sum.clamp_min(1e-12) * (use.sum(dim=1, keepdim=True).clamp_min(1) * v))
    coef = per_class.view(-1).gather(0, group).mul_(weight)
    positive = _constant((0,), torch.int64, y.device).expand(v * b, hw)  # the positive is logit 0
    losses, grad = _weighted_cross_entropy(logits.view(v * b, -1, hw), positive, coef.view(v * b, hw))
    classes = torch.cat([y.unsqueeze(2), ranked.indices[:, :, negatives]], dim=2)
    return losses.sum(), own.new_zeros(own.shape).scatter_add_(2, classes, grad.view(classes.shape))


def _hard_pixel_weights(
    similarity: Tensor,
    y: Tensor,
    counts: Tensor,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    generator: torch.Generator | None,
) -> Tensor:
    """`terms.hard_pixel_weights` given the class sizes counts (C,) = bincount(y): the same
    weights (the same generator draws), from one sort of int64 keys."""
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
    ratios = _constant(((random_ratio,), (rank_hi,), (0.0,), (rank_lo,)), torch.float64, y.device)
    offsets = _constant(((0,), (n,), (-1,), (n - 1,)), torch.int64, y.device)
    bounds = (ratios * counts).long() + (counts.cumsum(0) - counts + offsets)
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


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of Python numbers, built once per value: torch.tensor() costs more than
    most ops of the loss at small grids. Read-only."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _arange(n: int, device: torch.device) -> Tensor:
    """0..n-1, built once per n (read-only), like `_constant`."""
    return torch.arange(n, device=device)
