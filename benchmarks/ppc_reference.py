"""Loop-style baseline of the PPC loss, transcribed from the authors' algorithm for benchmarking.

This is the algorithm of `get_contrast_loss` in the reference repository (usr922/wseg,
module/train.py), written out again in its own style so that `ppc_core.losses.ppc.PPCLoss` can be
timed and checked against it (the timing baseline of `benchmarks.bench_ppc_loss`; the readable
version of the loss is `ppc_core/losses/ppc/terms.py`): per-class Python loops for the prototypes and for hard pixel
sampling, an (N, C+1, D) `.repeat` of the prototype matrix indexed per pixel for the semi-hard
negatives, ten random negatives per pixel drawn with a list comprehension and then discarded, and
exp-then-log softmaxes. The loops and the copies are the point of the baseline: they are exactly
what the vectorised loss removes, so the project's "no loops over classes" rule does not apply here.

Where the reference and our loss differ in semantics, this baseline follows ours (see
docs/method.md): channel 0 is the background, K = top_k_ratio * h * w, prototypes are ranked
by `prototype_ranking`, classes without a prototype leave the softmax, classes with fewer than
2 pixels leave the class average, and the hard-pixel window is [floor(lo * n), floor(hi * n)).

Sampling: with `random_keys` = (keys_s, keys_t), each (N,) uniform noise, "a random share of
class c" is the share of class-c pixels with the smallest keys (ties broken by pixel order), which
is what `hard_pixel_weights` does with `torch.rand(N, generator=g)`; feeding both losses the same
generator state therefore selects identical pixels. Without keys the baseline calls
`random.sample` per class, as the reference does.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ppc_core.losses.ppc import PPCConfig

_EPS = 1e-5


def reference_pseudo_labels(cam: Tensor, labels: Tensor, bg_threshold: float) -> tuple[Tensor, Tensor]:
    """Normalised, label-masked CAM and pseudo labels, as the reference computes them.

    cam: (B, C+1, H, W) raw scores, channel 0 = background; labels: (B, C) multi-hot.
    Returns norm (B, C+1, H, W) and y (B, H, W) int64.
    """
    norm = _min_max(cam)
    norm[:, 0] = bg_threshold
    label = torch.cat([torch.ones(labels.shape[0], 1), labels.float()], dim=1)[:, :, None, None]
    norm = norm * label
    # The reference takes argmax(softmax(norm)); softmax is monotone, and skipping it avoids exp
    # rounding two nearly equal scores onto one value, which would break exact agreement.
    return norm, norm.argmax(dim=1)


def _min_max(cam: Tensor) -> Tensor:
    cam = F.relu(cam.detach().float())
    n, c, h, w = cam.shape
    max_v = torch.max(cam.reshape(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
    min_v = torch.min(cam.reshape(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
    norm = (cam - min_v - _EPS) / (max_v - min_v + _EPS)
    norm[norm < 0] = 0.0
    return norm


def reference_ranking(cam: Tensor, norm: Tensor, mode: str) -> Tensor:
    """The map whose top-K pixels build each prototype: (B, C+1, H, W)."""
    if mode == "reference":
        rank = _min_max(cam)
        rank[:, 0] = norm[:, 0]
        return rank
    rank = norm.clone()
    rank[:, 0] = 1.0 - torch.max(norm[:, 1:], dim=1)[0]
    return rank


def reference_prototypes(rank: Tensor, feats: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Per-class loop over the batch's top-K pixels.

    rank: (B, C+1, H, W); feats: (B, D, H, W). Returns prototypes (C+1, D) and valid (C+1,) bool.
    """
    c = rank.shape[1]
    d = feats.shape[1]
    fea = feats.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
    flat_rank = rank.transpose(0, 1).reshape(c, -1)
    # Ties go to the lowest pixel index (PPCLoss's rule, so data-parallel runs agree); the
    # reference's topk breaks them arbitrarily.
    top_values, top_indices = flat_rank.sort(dim=-1, descending=True, stable=True)
    top_values, top_indices = top_values[:, :top_k], top_indices[:, :top_k]
    prototypes = torch.zeros(c, d)
    for i in range(c):
        weight = torch.sum(top_values[i])
        # The reference divides unconditionally (NaN for a class with no confidence anywhere).
        if weight > 0:
            prototypes[i] = torch.sum(top_values[i].unsqueeze(-1) * fea[top_indices[i]], dim=0) / weight
    prototypes = F.normalize(prototypes, dim=-1)
    # An all-zero row (no confidence, or only all-zero features) is no prototype, as in PPCLoss.
    return prototypes, prototypes.abs().sum(dim=-1) > 0


def reference_cross_contrast(v: Tensor, y: Tensor, prototypes: Tensor, valid: Tensor, tau: float) -> Tensor:
    """mean_i -log(exp(v_i.p_y / tau) / sum_c exp(v_i.p_c / tau)), exp-then-log.

    v: (N, D) unit vectors; y: (N,); prototypes: (C+1, D); valid: (C+1,) bool.
    """
    a1 = torch.exp(torch.sum(v * prototypes[y], dim=-1) / tau)
    a2 = torch.sum(torch.exp(torch.matmul(v, prototypes.transpose(0, 1)) / tau) * valid, dim=-1)
    per_pixel = -1 * torch.log(a1 / a2)
    keep = valid[y]
    return per_pixel[keep].mean() if keep.any() else per_pixel.sum() * 0.0


def reference_intra_contrast(
    v: Tensor,
    y: Tensor,
    prototypes: Tensor,
    valid: Tensor,
    tau: float,
    neg_drop: int,
    neg_keep: int,
    random_ratio: float,
    rank_lo: float,
    rank_hi: float,
    random_keys: Tensor | None = None,
    draw_unused_negatives: bool = True,
) -> Tensor:
    """Intra-view contrast with per-pixel prototype copies and per-class sampling loops.

    v: (N, D) unit vectors; y: (N,); prototypes: (C+1, D); valid: (C+1,) bool;
    random_keys: (N,) uniform noise or None (then `random.sample` per class).
    """
    n = v.shape[0]
    c = prototypes.shape[0]
    positives = prototypes[y]
    similarity = (torch.sum(v * positives, dim=-1) + 1) / 2.0
    a1 = torch.exp(torch.sum(v * positives, dim=-1) / tau)
    neg_scores = torch.matmul(v, prototypes.transpose(0, 1))  # (N, C+1)

    with torch.no_grad():
        random_indices = None
        if draw_unused_negatives:
            random_indices = torch.tensor(
                [random.sample(range(c), min(neg_keep, c)) for _ in range(n)]
            ).long()
        ranked = neg_scores.masked_fill(~valid, float("-inf"))
        _, lower_indices = torch.topk(ranked, k=min(neg_drop + neg_keep, c), largest=True, dim=-1)
        lower_indices = lower_indices[:, neg_drop:]

    rows = torch.arange(n).unsqueeze(1)
    repeated = prototypes.unsqueeze(0).repeat(n, 1, 1)  # (N, C+1, D)
    if random_indices is not None:
        _unused = repeated[rows, random_indices]  # noqa: F841 - computed and discarded, as upstream
    lower_negatives = repeated[rows, lower_indices]
    candidates = torch.cat([positives.unsqueeze(1), lower_negatives], dim=1)
    present = torch.cat([torch.ones(n, 1, dtype=torch.bool), valid[lower_indices]], dim=1)
    scores = torch.matmul(v.unsqueeze(1), candidates.transpose(1, 2)).squeeze(1)
    a2 = torch.sum(torch.exp(scores / tau) * present, dim=-1)

    loss = torch.zeros(())
    classes = 0
    exists = torch.unique(y).tolist()
    for i in range(c):
        if i not in exists or not valid[i]:
            continue
        in_class = y == i
        a1_class = a1[in_class]
        a2_class = a2[in_class]
        similarity_class = similarity[in_class]
        len_class = a1_class.shape[0]
        if len_class < 2:
            continue
        n_random = int(len_class * random_ratio)
        with torch.no_grad():
            if random_keys is None:
                random_idx = torch.tensor(random.sample(range(len_class), n_random)).long()
            else:
                random_idx = random_keys[in_class].argsort(stable=True)[:n_random]
            hi = int(len_class * rank_hi)
            _, lower_idx = torch.topk(similarity_class, k=hi, largest=False)
            lower_idx = lower_idx[int(len_class * rank_lo):]
        chosen = torch.cat([random_idx, lower_idx])
        if chosen.numel() == 0:
            continue
        loss = loss + torch.mean(-1 * torch.log(a1_class[chosen] / a2_class[chosen]))
        classes += 1
    if classes == 0:
        return a1.sum() * 0.0
    return loss / classes


def reference_ppc_loss(
    feats_s: Tensor,
    cam_s: Tensor,
    feats_t: Tensor,
    cam_t: Tensor,
    labels: Tensor,
    *,
    tau: float = 0.1,
    top_k_ratio: float = 0.125,
    bg_threshold: float = 0.20,
    neg_drop: int = 3,
    neg_keep_ratio: float = 10 / 21,
    hard_random_ratio: float = 0.5,
    hard_rank_lo: float = 0.1,
    hard_rank_hi: float = 0.6,
    prototype_ranking: str = "complement",
    random_keys: tuple[Tensor, Tensor] | None = None,
    draw_unused_negatives: bool = True,
) -> dict[str, Tensor]:
    """The baseline's terms, named and unweighted as `PPCLoss.forward` returns them.

    feats_*: (B, D, H, W); cam_*: (B, C+1, H, W) raw, channel 0 = background; labels: (B, C).
    The keyword arguments are `PPCConfig`'s fields of the method (`method_fields(cfg)`).
    random_keys: (keys_s, keys_t), each (B*H*W,) uniform noise; None samples with `random`.
    """
    if random_keys is not None and any(k.shape != (feats_s[:, 0].numel(),) for k in random_keys):
        raise ValueError(
            f"random_keys must be two ({feats_s[:, 0].numel()},) tensors, got "
            f"{[tuple(k.shape) for k in random_keys]}"
        )
    top_k = max(1, int(cam_s.shape[2] * cam_s.shape[3] * top_k_ratio))
    views = []
    for feats, cam in ((feats_s, cam_s), (feats_t, cam_t)):
        norm, y = reference_pseudo_labels(cam, labels, bg_threshold)
        rank = reference_ranking(cam, norm, prototype_ranking)
        prototypes, valid = reference_prototypes(rank, feats, top_k)
        d = feats.shape[1]
        v = F.normalize(feats.float().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        views.append((v, y.reshape(-1), prototypes, valid))
    (v_s, y_s, p_s, ok_s), (v_t, y_t, p_t, ok_t) = views

    cross_proto = (reference_cross_contrast(v_s, y_s, p_t, ok_t, tau)
                   + reference_cross_contrast(v_t, y_t, p_s, ok_s, tau)) / 2
    cross_cam = (reference_cross_contrast(v_s, y_t, p_s, ok_s, tau)
                 + reference_cross_contrast(v_t, y_s, p_t, ok_t, tau)) / 2
    neg_keep = max(1, round(neg_keep_ratio * p_s.shape[0]))
    keys = random_keys if random_keys is not None else (None, None)
    mining = (tau, neg_drop, neg_keep, hard_random_ratio, hard_rank_lo, hard_rank_hi)
    intra = (reference_intra_contrast(v_s, y_s, p_s, ok_s, *mining, keys[0], draw_unused_negatives)
             + reference_intra_contrast(v_t, y_t, p_t, ok_t, *mining, keys[1],
                                        draw_unused_negatives)) / 2
    return {"cross_proto": cross_proto, "cross_cam": cross_cam, "intra": intra}


def method_fields(cfg: PPCConfig) -> dict[str, object]:
    """`PPCConfig`'s fields that `reference_ppc_loss` takes: all but the weights (the
    objective's) and the choice of implementation."""
    skip = {"impl", "w_cross_proto", "w_cross_cam", "w_intra"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
