"""fp16 / bf16 inputs at the VOC recipe's sizes (batch 8, 21 classes, 16x16 grid, D = 128, CAM
scores around -6): the loss (both impls) and each public function run on real half tensors (no
autocast: Accelerate runs fp32 on CPU whatever `mixed_precision` says) and match fp32.

Tolerances: the arithmetic runs in float32, so a half input gives exactly the fp32 result of the
same (rounded) values - terms to 1e-6 relative, gradients to twice the half type's epsilon of
their largest entry (the gradient is rounded to the input's dtype); against the unrounded fp32
inputs the terms agree to 1e-4 (fp16) and 1e-3 (bf16) relative.
"""

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
    normalise_cam,
    prototype_contrast,
    prototypes_from_candidates,
    pseudo_labels,
    ranking_map,
    semi_hard_negatives,
    topk_candidates,
)
from tests.losses.test_impls import _inputs

HALF = [torch.float16, torch.bfloat16]
VS_FP32 = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
# A loss scale, as GradScaler applies under fp16: per-pixel gradients are ~1/N, below fp16's
# normal range unscaled.
SCALE = 1024.0


@pytest.fixture(scope="module")
def voc():
    """One VOC-sized batch, fp32: feats (8, 128, 16, 16), CAMs (8, 21, 16, 16), labels (8, 20)."""
    return _inputs(0, batch=8, classes=20, dim=128, grid=16, cam_mean=-6.0, cam_scale=4.0)


def _cast(x, dtype):
    return [t.detach().to(dtype) if i < 4 else t for i, t in enumerate(x)]


def _run(x, impl):
    leaves = [t.detach().clone().requires_grad_(i in (0, 2)) for i, t in enumerate(x)]
    out = PPCLoss(PPCConfig(impl=impl))(*leaves, generator=torch.Generator().manual_seed(0))
    (SCALE * sum(out.values())).backward()
    return {k: v.detach() for k, v in out.items()}, (leaves[0].grad, leaves[2].grad)


def test_the_batch_overflows_an_fp16_sum(voc):
    # Guards the tests below: summing these finite CAMs in fp16 is what raised "not finite".
    cams = torch.cat([voc[1], voc[3]]).half()
    assert torch.isfinite(cams).all() and not torch.isfinite(cams.sum())


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("dtype", HALF)
def test_loss_on_half_inputs_matches_fp32(voc, impl, dtype):
    low = _cast(voc, dtype)
    terms, grads = _run(low, impl)
    terms_rounded, grads_rounded = _run([t.float() for t in low], impl)
    terms_fp32, _ = _run(voc, impl)
    eps = torch.finfo(dtype).eps
    for name, value in terms.items():
        assert value.dtype == torch.float32 and value > 0
        assert torch.allclose(value, terms_rounded[name], rtol=1e-6, atol=0)
        assert torch.allclose(value, terms_fp32[name], rtol=VS_FP32[dtype], atol=0)
    for got, want in zip(grads, grads_rounded, strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all()
        scale = float(want.abs().max())
        assert scale > 0
        assert float((got.float() - want).abs().max()) <= 2 * eps * scale


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("dtype", HALF)
def test_a_nan_in_a_half_input_is_still_named(voc, impl, dtype):
    low = _cast(voc, dtype)
    low[3] = low[3].clone()
    low[3][0, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match="cam_t contains NaN or inf"):
        PPCLoss(PPCConfig(impl=impl))(*low)


def _unit_pixels_and_prototypes(voc, dtype):
    """(N, D) unit pixels, (N,) labels, (C, D) prototypes with one missing, in `dtype`."""
    feats, cam, _, _, labels = voc
    norm, y = pseudo_labels(cam, labels)
    proto = estimate_prototypes(norm, feats, 32)
    proto[7] = 0.0
    v = F.normalize(feats.detach().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)
    return v.to(dtype), y.flatten(), proto.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_contrast_functions_on_half_inputs_match_fp32(voc, dtype):
    v, y, p = _unit_pixels_and_prototypes(voc, dtype)
    v32, p32 = v.float(), p.float()
    for tau in (0.1, 0.01):
        got = prototype_contrast(v, y, p, tau)
        assert torch.isfinite(got)
        assert torch.allclose(got, prototype_contrast(v32, y, p32, tau), rtol=1e-6, atol=0)
    sim = v @ p.T
    assert torch.equal(semi_hard_negatives(sim, p, 3, 10), semi_hard_negatives(sim.float(), p32, 3, 10))
    mining = (0.1, 3, 10, 0.5, 0.1, 0.6)
    leaf = v.clone().requires_grad_()
    got = intra_view_contrast(leaf, y, p, *mining, torch.Generator().manual_seed(1))
    leaf32 = v32.clone().requires_grad_()
    want = intra_view_contrast(leaf32, y, p32, *mining, torch.Generator().manual_seed(1))
    assert got > 0 and torch.allclose(got, want, rtol=1e-6, atol=0)
    (SCALE * got).backward()
    (SCALE * want).backward()
    assert leaf.grad.dtype == dtype
    assert float((leaf.grad.float() - leaf32.grad).abs().max()) <= (
        2 * torch.finfo(dtype).eps * float(leaf32.grad.abs().max()))


@pytest.mark.parametrize("dtype", HALF)
def test_label_and_prototype_functions_on_half_inputs_match_fp32(voc, dtype):
    feats, cam, _, _, labels = voc
    cam_low, feats_low = cam.to(dtype), feats.detach().to(dtype)
    cam_r, feats_r = cam_low.float(), feats_low.float()
    assert torch.equal(normalise_cam(cam_low), normalise_cam(cam_r))
    norm, y = pseudo_labels(cam_low, labels)
    norm_r, y_r = pseudo_labels(cam_r, labels)
    assert torch.equal(norm, norm_r) and torch.equal(y, y_r)
    assert (y > 0).any()  # some foreground: the maps are not all background
    for mode in ("complement", "reference"):
        assert torch.equal(ranking_map(cam_low, norm, mode), ranking_map(cam_r, norm_r, mode))
    rank = ranking_map(cam_low, norm)
    assert torch.allclose(estimate_prototypes(rank, feats_low, 32),
                          estimate_prototypes(rank, feats_r, 32), rtol=1e-6, atol=1e-7)
    values, cand = topk_candidates(rank, feats_low, 32)
    values_r, cand_r = topk_candidates(rank, feats_r, 32)
    assert torch.equal(values, values_r) and torch.equal(cand, cand_r)
    assert torch.equal(prototypes_from_candidates(values, cand, 32),
                       prototypes_from_candidates(values_r, cand_r, 32))
    sim = torch.rand(y.numel(), generator=torch.Generator().manual_seed(2)).to(dtype)
    got = hard_pixel_weights(sim, y.flatten(), 21, 0.5, 0.1, 0.6, torch.Generator().manual_seed(3))
    want = hard_pixel_weights(sim.float(), y.flatten(), 21, 0.5, 0.1, 0.6,
                              torch.Generator().manual_seed(3))
    assert torch.equal(got, want) and got.sum() > 0
