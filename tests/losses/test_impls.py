"""`ppc.impl: reference | fused`: the readable terms and the fused engine give the same terms and
the same per-term gradients; new terms and samplers plug into both."""

import dataclasses

import pytest
import torch

from ppc_core.losses.ppc import TERMS, PPCConfig, PPCLoss, hard_pixel_weights, terms
from ppc_core.objective import Objective, PPCWeights

B, C, D, GRID = 4, 20, 32, 8  # C foreground classes here: the CAMs have C + 1 channels

CONFIGS = {
    "defaults": PPCConfig(),
    "sharper_more_k_less_drop": PPCConfig(tau=0.05, top_k_ratio=0.25, neg_drop=1),
    "softer_wide_window_reference_ranking": PPCConfig(
        tau=0.3, top_k_ratio=1 / 16, neg_drop=5, neg_keep_ratio=0.3, hard_random_ratio=0.3,
        hard_rank_lo=0.2, hard_rank_hi=0.8, prototype_ranking="reference", bg_threshold=0.4,
    ),
    "no_drop_all_negatives_everything_sampled": PPCConfig(
        neg_drop=0, neg_keep_ratio=1.0, hard_random_ratio=1.0, hard_rank_lo=0.0, hard_rank_hi=1.0),
}


def _inputs(seed: int, batch: int = B, classes: int = C, dim: int = D, grid: int = GRID,
            cam_mean: float = 0.0, cam_scale: float = 1.0):
    """Two correlated views (features requiring grad) and 1-3 labels per image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, classes)
    for b in range(batch):
        n = int(torch.randint(1, 4, (1,), generator=g))
        labels[b, torch.randperm(classes, generator=g)[:n]] = 1.0
    cam_s = cam_mean + cam_scale * torch.randn(batch, classes + 1, grid, grid, generator=g)
    cam_t = cam_s + 0.5 * cam_scale * torch.randn(cam_s.shape, generator=g)
    base = torch.randn(batch, dim, grid, grid, generator=g)
    feats_s = base.relu().requires_grad_()
    feats_t = (base + 0.5 * torch.randn(base.shape, generator=g)).relu().requires_grad_()
    return feats_s, cam_s, feats_t, cam_t, labels


def _terms_and_grads(cfg: PPCConfig, x, seed: int, **loss_kwargs):
    """Each term's value and its own gradient into both feature maps."""
    out = PPCLoss(cfg, **loss_kwargs)(*x, generator=torch.Generator().manual_seed(seed))
    grads = {name: torch.autograd.grad(v, [x[0], x[2]], retain_graph=True)
             for name, v in out.items()}
    return {k: v.detach() for k, v in out.items()}, grads


def _assert_same(a, b, rtol: float = 1e-5) -> None:
    (terms_a, grads_a), (terms_b, grads_b) = a, b
    assert terms_a.keys() == terms_b.keys()
    for name in terms_a:
        assert terms_a[name] > 0, f"{name} is zero: the comparison would be vacuous"
        assert torch.allclose(terms_a[name], terms_b[name], rtol=rtol, atol=0), (
            name, float(terms_a[name]), float(terms_b[name]))
        for ga, gb in zip(grads_a[name], grads_b[name], strict=True):
            scale = float(ga.abs().max())
            assert scale > 0, f"{name} has no gradient"
            assert torch.allclose(ga, gb, rtol=0, atol=rtol * scale), (
                name, float((ga - gb).abs().max()) / scale)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_and_fused_give_the_same_terms_and_per_term_gradients(name, seed):
    cfg = CONFIGS[name]
    x = _inputs(seed)
    fused = _terms_and_grads(dataclasses.replace(cfg, impl="fused"), x, seed)
    reference = _terms_and_grads(dataclasses.replace(cfg, impl="reference"), x, seed)
    _assert_same(fused, reference)


def test_the_comparison_sees_a_changed_setting():
    # Guards the test above: two settings that differ must not pass as the same.
    x = _inputs(0)
    a = _terms_and_grads(PPCConfig(impl="fused"), x, 0)
    b = _terms_and_grads(PPCConfig(impl="reference", neg_drop=2), x, 0)
    with pytest.raises(AssertionError):
        _assert_same(a, b)


def test_default_impl_is_fused_and_a_bad_impl_names_the_field():
    assert PPCConfig().impl == "fused"
    with pytest.raises(ValueError, match="impl must be one of"):
        PPCConfig(impl="fast")


def _every_pixel_once(similarity, y, num_classes, random_ratio, rank_lo, rank_hi, generator=None):
    return torch.ones_like(similarity, dtype=torch.float32)


def test_a_new_sampler_plugs_into_both_impls():
    x = _inputs(3)
    outs = [_terms_and_grads(PPCConfig(impl=impl), x, 3, sampler=_every_pixel_once)
            for impl in ("fused", "reference")]
    _assert_same(*outs)
    default = _terms_and_grads(PPCConfig(), x, 3)[0]["intra"]
    assert abs(float(outs[0][0]["intra"] - default)) > 1e-4  # the sampler was used
    assert outs[0][0]["cross_proto"] == default.new_tensor(float(
        _terms_and_grads(PPCConfig(), x, 3)[0]["cross_proto"]))


def test_hard_pixel_weights_and_the_fused_kernel_select_the_same_pixels():
    from ppc_core.losses.ppc.fused import _hard_pixel_weights

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 7, (500,), generator=g)
    sim = torch.randint(0, 20, (500,), generator=g).float() / 20  # many ties
    for ratios in ((0.5, 0.1, 0.6), (0.3, 0.0, 1.0), (1.0, 0.25, 0.35)):
        want = hard_pixel_weights(sim, y, 9, *ratios, torch.Generator().manual_seed(4))
        got = _hard_pixel_weights(sim, y, torch.bincount(y, minlength=9), *ratios,
                                  torch.Generator().manual_seed(4))
        assert torch.equal(got, want)
        assert want.sum() > 0


def _pixel_mean_norm(x: terms.TermInputs) -> torch.Tensor:
    """A made-up term: 1 - mean cosine of each source pixel to its target twin."""
    return 1.0 - (x.v[0] * x.v[1]).sum(dim=1).mean()


@dataclasses.dataclass
class _WeightsWithTwin(PPCWeights):
    twin: float = 2.0


def test_a_new_term_is_one_function_and_one_weight(monkeypatch):
    monkeypatch.setitem(TERMS, "twin", _pixel_mean_norm)
    x = _inputs(4)
    outs = [_terms_and_grads(PPCConfig(impl=impl), x, 4) for impl in ("fused", "reference")]
    _assert_same(*outs)
    assert "twin" in outs[0][0]
    # Without its weight the objective refuses to start; with it, the term is logged weighted.
    with pytest.raises(ValueError, match="twin"):
        Objective(PPCLoss(PPCConfig()), 32)
    objective = Objective(PPCLoss(PPCConfig()), 32, ppc_weights=_WeightsWithTwin())
    assert objective.ppc_weights.twin == 2.0


def test_objective_weighs_the_unweighted_terms():
    from ppc_core.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn4", 10, 8, 16, False, False, False)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 10)
    labels[:, 3] = labels[0, 5] = 1
    weights = PPCWeights(cross_proto=0.5, cross_cam=0.0, intra=2.0)
    ppc = PPCLoss(PPCConfig(neg_drop=0))  # few prototypes exist: dropping 3 would leave no negative
    terms_ = Objective(ppc, 64, ppc_weights=weights)(model, images, labels, 0.5,
                                                     torch.Generator().manual_seed(0))
    raw = Objective(ppc, 64, ppc_weights=PPCWeights(1.0, 1.0, 1.0))(
        model, images, labels, 1.0, torch.Generator().manual_seed(0))
    assert set(terms_) >= {"ppc_cross_proto", "ppc_cross_cam", "ppc_intra"}
    for name, w in dataclasses.asdict(weights).items():
        assert torch.allclose(terms_[f"ppc_{name}"], 0.5 * w * raw[f"ppc_{name}"])
    assert raw["ppc_intra"] > 0
