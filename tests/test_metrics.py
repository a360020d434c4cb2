import math

import numpy as np
import pytest
import torch

from ppc_core.cam import cams_to_masks
from ppc_core.metrics import confusion_matrix, miou, threshold_confusions


def _numpy_confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> np.ndarray:
    out = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel(), strict=True):
        if t != ignore:
            out[t, p] += 1
    return out


def test_confusion_matrix_hand_example():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)


def test_confusion_matrix_matches_numpy_loop_and_ignores():
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (3, 17, 19), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, k, (3, 17, 19), generator=g)
    # a prediction at an ignored pixel is not counted, whatever it is
    pred[target == 255] = 0
    conf = confusion_matrix(pred, target, k)
    ref = _numpy_confusion(pred.numpy(), target.numpy(), k, 255)
    np.testing.assert_array_equal(conf.numpy(), ref)
    assert int(conf.sum()) == int((target != 255).sum())


def test_confusion_matrix_accumulates_by_addition():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (4, 8, 8), generator=g)
    target = torch.randint(0, 4, (4, 8, 8), generator=g)
    whole = confusion_matrix(pred, target, 4)
    parts = confusion_matrix(pred[:2], target[:2], 4) + confusion_matrix(pred[2:], target[2:], 4)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "pred values must lie in \\[0, 3\\)"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), "pred"),
        (torch.tensor([0, 1]), torch.tensor([0, 7]), "target values must lie in \\[0, 3\\)"),
        (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, target, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(pred, target, 3)


def test_miou_hand_example_and_absent_class():
    # class 0: TP 2, FP 1, FN 1 -> 0.5; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2 absent
    conf = torch.tensor([[2, 1, 0], [1, 1, 0], [0, 0, 0]])
    mean, per_class = miou(conf)
    assert per_class[0].item() == pytest.approx(0.5)
    assert per_class[1].item() == pytest.approx(1 / 3)
    assert math.isnan(per_class[2].item())
    assert mean == pytest.approx((0.5 + 1 / 3) / 2)


def test_miou_predicted_only_class_counts_as_zero():
    # class 2 never in the target but predicted: IoU 0, kept in the mean
    conf = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    mean, per_class = miou(conf)
    assert per_class.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert mean == pytest.approx(0.5)


def test_threshold_confusions_equals_loop_over_thresholds():
    g = torch.Generator().manual_seed(2)
    b, c, h, w = 3, 4, 11, 13
    # quantised scores so that many ties with the thresholds occur
    cams = (torch.rand(b, c, h, w, generator=g) * 20).round() / 20
    labels = (torch.rand(b, c, generator=g) < 0.6).float()
    labels[:, 0] = 1.0
    target = torch.randint(0, c + 1, (b, h, w), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    thresholds = torch.tensor([0.3, 0.0, 0.15, 0.55, 0.05, 1.0])  # unsorted on purpose
    got = threshold_confusions(cams, labels, target, thresholds)
    assert got.shape == (len(thresholds), c + 1, c + 1)
    for i, t in enumerate(thresholds.tolist()):
        # the python float reaches cams_to_masks as float32, like the sweep's tensor
        ref = confusion_matrix(cams_to_masks(cams, labels, t), target, c + 1)
        assert torch.equal(got[i], ref), f"threshold {t}"
    # the sweep really changes with the threshold
    assert not torch.equal(got[1], got[3])


def test_threshold_confusions_default_sweep_on_random_cams():
    g = torch.Generator().manual_seed(3)
    cams = torch.rand(2, 3, 16, 16, generator=g)
    labels = torch.ones(2, 3)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    thresholds = torch.arange(0.0, 0.60, 0.01)
    got = threshold_confusions(cams, labels, target, thresholds)
    for i in (0, 17, 59):
        ref = confusion_matrix(cams_to_masks(cams, labels, float(thresholds[i])), target, 4)
        assert torch.equal(got[i], ref)
