import math

import pytest
import torch
import torch.nn.functional as F

from ppc_core.losses.ppc import (
    PPCConfig,
    PPCLoss,
    estimate_prototypes,
    hard_pixel_weights,
    intra_view_contrast,
    prototype_contrast,
    pseudo_labels,
    semi_hard_negatives,
    top_k_for,
)
from ppc_core.losses.ppc.fused import (
    _CosineTerms,
    _ordered_int,
    _stable_topk,
    _weighted_cross_entropy,
)
from ppc_core.objective import PPCWeights

B, C, D, H = 4, 20, 16, 8


def _views(seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    cam_s = torch.randn(B, C + 1, H, H, generator=g)
    cam_t = torch.randn(B, C + 1, H, H, generator=g)
    f_s = torch.randn(B, D, H, H, generator=g).relu().requires_grad_(requires_grad)
    f_t = torch.randn(B, D, H, H, generator=g).relu().requires_grad_(requires_grad)
    labels = (torch.rand(B, C, generator=g) < 0.2).float()
    labels[:, 3] = 1
    return f_s, cam_s, f_t, cam_t, labels


def test_contrast_is_cross_entropy_of_scaled_similarities():
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(50, D, generator=g), dim=1)
    p = F.normalize(torch.randn(C + 1, D, generator=g), dim=1)
    y = torch.randint(0, C + 1, (50,), generator=g)
    expected = F.cross_entropy(v @ p.T / 0.1, y)
    assert torch.allclose(prototype_contrast(v, y, p, 0.1), expected, atol=1e-6)


def test_contrast_stable_at_small_tau():
    v = F.normalize(torch.randn(10, D), dim=1)
    p = F.normalize(torch.randn(5, D), dim=1)
    y = torch.randint(0, 5, (10,))
    loss = prototype_contrast(v, y, p, 0.01)
    assert torch.isfinite(loss)
    # exp(1/0.001) overflows float32: log-softmax must still be finite
    assert torch.isfinite(prototype_contrast(v, y, p, 0.001))


def test_loss_falls_as_features_move_toward_positive():
    p = F.normalize(torch.randn(C + 1, D), dim=1)
    y = torch.randint(0, C + 1, (64,))
    v = F.normalize(torch.randn(64, D), dim=1)
    losses = [prototype_contrast(F.normalize(v + a * p[y], dim=1), y, p, 0.1) for a in (0, 1, 4)]
    assert losses[0] > losses[1] > losses[2]


def test_missing_prototypes_leave_the_softmax():
    p = F.normalize(torch.randn(4, D), dim=1)
    p[2] = 0
    v = F.normalize(torch.randn(30, D), dim=1)
    y = torch.tensor([0, 1, 3] * 10)
    keep = torch.tensor([0, 1, 3])
    expected = F.cross_entropy(v @ p[keep].T / 0.1, torch.tensor([0, 1, 2] * 10))
    assert torch.allclose(prototype_contrast(v, y, p, 0.1), expected, atol=1e-6)
    # pixels labelled with a class that has no prototype are left out of the mean
    y2 = torch.cat([y, torch.full((5,), 2)])
    v2 = torch.cat([v, F.normalize(torch.randn(5, D), dim=1)])
    assert torch.allclose(prototype_contrast(v2, y2, p, 0.1), expected, atol=1e-6)


def test_pseudo_labels_never_pick_absent_classes():
    _, cam, _, _, labels = _views()
    norm, y = pseudo_labels(cam, labels, 0.2)
    present = F.pad(labels, (1, 0), value=1).bool()
    for b in range(B):
        assert present[b, y[b].unique()].all()
    assert (norm[:, 0] == 0.2).all()
    assert norm.min() >= 0 and norm.max() <= 1
    absent = ~present[:, :, None, None].expand_as(norm)
    assert (norm[absent] == 0).all()


def test_pseudo_label_example():
    cam = torch.zeros(1, 3, 1, 3)
    cam[0, 1] = torch.tensor([[0.0, 1.0, 10.0]])  # class 1 normalised: 0, ~0.1, 1
    cam[0, 2] = torch.tensor([[10.0, 0.0, 0.0]])  # class 2: absent from the labels
    _, y = pseudo_labels(cam, torch.tensor([[1.0, 0.0]]), 0.2)
    assert y.tolist() == [[[0, 0, 1]]]


def test_prototypes_come_only_from_top_k_pixels():
    f_s, cam_s, _, _, labels = _views(requires_grad=False)
    norm, _ = pseudo_labels(cam_s, labels, 0.2)
    k = top_k_for(H, H, 0.125)
    p = estimate_prototypes(norm, f_s, k)
    conf = norm[:, 4].flatten()
    lowest = conf.argmin()
    b, rest = divmod(int(lowest), H * H)
    moved = f_s.clone()
    moved[b, :, rest // H, rest % H] += 100.0
    p2 = estimate_prototypes(norm, moved, k)
    assert torch.equal(p[4], p2[4])
    top = conf.argmax()
    b, rest = divmod(int(top), H * H)
    moved = f_s.clone()
    moved[b, :, rest // H, rest % H] += 100.0
    assert not torch.allclose(estimate_prototypes(norm, moved, k)[4], p[4])


def test_stable_topk_takes_the_largest_then_the_lowest_indices():
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 4, (6, 40), generator=g).float() / 4  # many ties, 0.0 included
    x[0] = 1.0  # one row all tied
    values, index = _stable_topk(x, 7)
    for row, got in zip(x.tolist(), index.tolist(), strict=True):
        assert got == sorted(range(len(row)), key=lambda i: (-row[i], i))[:7]
    assert torch.equal(values, x.gather(1, index))
    # Candidates of two halves, concatenated, give the whole batch's choice in the same order.
    halves = [_stable_topk(part, 7) for part in x.split(20, dim=1)]
    pooled = torch.cat([v for v, _ in halves], dim=1)
    origin = torch.cat([i + 20 * h for h, (_, i) in enumerate(halves)], dim=1)
    _, pick = _stable_topk(pooled, 7)
    assert torch.equal(origin.gather(1, pick), index)


def test_prototypes_are_weighted_means_and_absent_classes_get_zero_rows():
    f_s, cam_s, _, _, labels = _views(requires_grad=False)
    norm, _ = pseudo_labels(cam_s, labels, 0.2)
    k = 5
    p = estimate_prototypes(norm, f_s, k)
    c = 4
    conf = norm[:, c].flatten()
    feats = f_s.permute(0, 2, 3, 1).reshape(-1, D)
    vals, idx = conf.topk(k)
    expected = F.normalize((vals[:, None] * feats[idx]).sum(0), dim=0)
    assert torch.allclose(p[c], expected, atol=1e-6)
    absent = (labels.sum(0) == 0).nonzero().flatten() + 1
    assert (p[absent] == 0).all()
    present = (labels.sum(0) > 0).nonzero().flatten() + 1
    assert torch.allclose(p[present].norm(dim=1), torch.ones(len(present)), atol=1e-5)


def test_mining_drops_nearest_and_keeps_exactly_ten():
    p = F.normalize(torch.randn(21, D), dim=1)
    v = F.normalize(torch.randn(40, D), dim=1)
    sim = v @ p.T
    neg = semi_hard_negatives(sim, p, drop=3, keep=10)
    assert neg.shape == (40, 10)
    nearest = sim.topk(3, dim=1).indices
    assert not (neg[:, :, None] == nearest[:, None, :]).any()
    order = sim.argsort(dim=1, descending=True)
    assert torch.equal(neg, order[:, 3:13])


def test_hard_pixel_weights_window_and_random_share():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 10 + [1] * 20 + [2])
    sim = torch.rand(31, generator=g)
    w = hard_pixel_weights(sim, y, 3, 0.5, 0.1, 0.6, torch.Generator().manual_seed(3))
    # class 0 (n=10): 5 random + ranks 1..5 of ascending similarity; class 2 (n=1): none
    assert w[:10].sum() == 10 and w[10:30].sum() == 20 and w[30] == 0
    ranks = sim[:10].argsort().argsort()
    window = (ranks >= 1) & (ranks < 6)
    assert ((w[:10] - window.float()) >= 0).all()
    assert ((w[:10] - window.float()) == 1).sum() == 5


def test_gradients_reach_features_not_prototypes():
    f_s, cam_s, f_t, cam_t, labels = _views()
    cam_s.requires_grad_(True)
    out = PPCLoss(PPCConfig())(f_s, cam_s, f_t, cam_t, labels, torch.Generator().manual_seed(0))
    sum(out.values()).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad.abs().sum() > 0
    # CAMs only rank pixels and pick labels: no gradient may flow into them
    assert cam_s.grad is None or cam_s.grad.abs().sum() == 0
    loss = PPCLoss(PPCConfig())
    _, proto = loss.prototypes(cam_s, f_s, labels)
    assert not proto.requires_grad


def test_hand_written_backward_matches_autograd_of_normalised_features():
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(2, D, 3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    views[0][1, :, 2, 4] = 0.0  # a zero vector: F.normalize keeps it zero, without gradient
    views[0][0, :, 0, 0] *= 1e-13  # clamped norm too, but not zero
    protos = F.normalize(torch.randn(6, D, generator=g, dtype=torch.float64), dim=1)
    protos[2] = 0.0  # a class without prototype
    valid = protos.abs().sum(1) > 0
    weight = torch.randn(4, 6, 15, generator=g, dtype=torch.float64)

    leaves = [v.clone().requires_grad_() for v in views]
    tables = []

    def terms(table):
        tables.append(table.clone())
        return (table * weight).sum().view(1), lambda g: weight * g

    _CosineTerms.apply(protos / 0.1, valid, terms, *leaves).sum().backward()
    out = tables[0]
    ref_leaves = [v.clone().requires_grad_() for v in views]
    unit = torch.cat([F.normalize(v, dim=1, eps=1e-12).flatten(2) for v in ref_leaves])
    ref = (protos / 0.1 @ unit).masked_fill(~valid[None, :, None], -1e9)
    (ref * weight).sum().backward()
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-9)
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=1e-9, atol=1e-12)


def test_closed_form_cross_entropy_gradient_matches_autograd():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    logits[:, 2] = -1e9  # a missing prototype: exp() is 0, finite everywhere
    target = torch.randint(0, 6, (3, 7), generator=g)
    weight = torch.rand(3, 7, generator=g, dtype=torch.float64)
    losses, grad = _weighted_cross_entropy(logits, target, weight)
    leaf = logits.clone().requires_grad_()
    want = F.cross_entropy(leaf, target, reduction="none") * weight
    want.sum().backward()
    assert torch.allclose(losses, want.detach())
    assert torch.allclose(grad, leaf.grad)


def test_intra_gradient_is_that_of_its_value():
    g = torch.Generator().manual_seed(6)
    p = F.normalize(torch.randn(4, D, generator=g), dim=1)
    v = F.normalize(torch.randn(40, D, generator=g), dim=1).requires_grad_()
    y = torch.randint(0, 4, (40,), generator=g)
    intra_view_contrast(v, y, p, 0.1, 1, 2, 1.0, 0.0, 1.0).backward()
    # random share 100% + full window: every pixel counts twice; per-class means, then their mean
    ref = v.detach().clone().requires_grad_()
    sim = ref @ p.T
    negatives = sim.detach().sort(dim=1, descending=True).indices[:, 1:3]
    logits = torch.cat([sim.gather(1, y[:, None]), sim.gather(1, negatives)], dim=1) / 0.1
    per_pixel = -logits.log_softmax(dim=1)[:, 0]
    torch.stack([per_pixel[y == c].mean() for c in range(4)]).mean().backward()
    assert torch.allclose(v.grad, ref.grad, atol=1e-6)


def test_ordered_int_orders_and_ties_like_the_floats():
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, 2.5, 2.5])
    x = torch.cat([torch.randn(300, generator=g) * 100, special])
    keys = _ordered_int(x)
    assert torch.equal(x[:, None] < x[None], keys[:, None] < keys[None])
    assert torch.equal(x[:, None] == x[None], keys[:, None] == keys[None])  # -0.0 ties 0.0


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_fixed_generator_gives_identical_unweighted_terms(impl):
    cfg = PPCConfig(impl=impl, w_intra=0.0)  # the weights are the objective's, not the loss's
    a = PPCLoss(cfg)(*_views(), torch.Generator().manual_seed(7))
    b = PPCLoss(cfg)(*_views(), torch.Generator().manual_seed(7))
    assert set(a) == {"cross_proto", "cross_cam", "intra"}
    for k in a:
        assert torch.equal(a[k], b[k])
    assert a["intra"] > 0


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_pinned_loss_values(impl):
    """Fixed-seed values: a refactor that changes the maths must change this test on purpose."""
    out = PPCLoss(PPCConfig(impl=impl))(*_views(), torch.Generator().manual_seed(0))
    got = {k: round(float(v.detach()), 4) for k, v in out.items()}
    assert got == pytest.approx(PINNED, abs=2e-4)
    # The total the objective makes of them with the reference's weights (PPCWeights()).
    total = sum(getattr(PPCWeights(), k) * v for k, v in out.items())
    assert float(total.detach()) == pytest.approx(PINNED_TOTAL, abs=2e-4)


PINNED = {"cross_proto": 3.088, "cross_cam": 3.0158, "intra": 2.2464}
PINNED_TOTAL = 0.835


def test_intra_averages_over_classes_with_two_pixels():
    p = F.normalize(torch.randn(3, D), dim=1)
    v = F.normalize(torch.randn(5, D), dim=1)
    y = torch.tensor([0, 0, 0, 0, 1])  # class 1 has a single pixel: skipped
    loss = intra_view_contrast(v, y, p, 0.1, 0, 2, 1.0, 0.0, 1.0)
    # random share 100% + full window: every class-0 pixel counts twice -> plain mean
    logits = torch.cat([(v @ p.T)[:4, :1], (v @ p.T)[:4].sort(dim=1, descending=True).values[:, :2]], 1)
    expected = -(logits / 0.1).log_softmax(1)[:, 0].mean()
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau"), ({"top_k_ratio": 0.0}, "top_k_ratio"),
     ({"hard_rank_lo": 0.7}, "hard_rank_lo"), ({"prototype_ranking": "x"}, "prototype_ranking"),
     ({"w_intra": -0.1}, "w_intra")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PPCConfig(**kwargs)


def test_bad_inputs_raise_clear_errors():
    f_s, cam_s, f_t, cam_t, labels = _views(requires_grad=False)
    loss = PPCLoss(PPCConfig())
    with pytest.raises(ValueError, match="foreground"):
        loss(f_s, cam_s, f_t, cam_t, torch.zeros_like(labels))
    with pytest.raises(ValueError, match="NaN"):
        bad = f_s.clone()
        bad[0, 0, 0, 0] = math.nan
        loss(bad, cam_s, f_t, cam_t, labels)
    with pytest.raises(ValueError, match="feats_t contains NaN or inf"):
        loss(f_s, cam_s, f_t.clone().index_fill_(2, torch.tensor([1]), math.inf), cam_t, labels)
    for bad_value in (math.nan, math.inf, -math.inf):  # one finiteness check, then the culprit
        bad = cam_t.clone()
        bad[1, 3, 2, 2] = bad_value
        with pytest.raises(ValueError, match="cam_t contains NaN or inf"):
            loss(f_s, cam_s, f_t, bad, labels)
    with pytest.raises(ValueError, match="views must share"):
        loss(f_s[:, :, :4], cam_s, f_t, cam_t, labels)
    with pytest.raises(ValueError, match="labels"):
        pseudo_labels(cam_s, labels[:, :5])
    with pytest.raises(ValueError, match="top_k"):
        estimate_prototypes(cam_s, f_s, 0)
    v = F.normalize(torch.randn(4, D), dim=1)
    with pytest.raises(ValueError, match="tau"):
        prototype_contrast(v, torch.zeros(4, dtype=torch.long), v, 0.0)
