import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ppc_core.evaluate import EvalResult, evaluate

NUM_CLASSES = 2
BG_SCORE = 0.25  # foreground score the toy model gives to background pixels


@dataclass
class _Out:
    cam: Tensor


class _TruthCAM(nn.Module):
    """CAM = 0.75 * one-hot(ground truth) + 0.25, read off an image that encodes the mask.

    Image channels: 0 = class-1 indicator, 1 = class-2 indicator, 2 = constant 1.
    Also records the mode it ran in.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES + 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0] = 1 - BG_SCORE
            self.conv.weight[2, 1] = 1 - BG_SCORE
            self.conv.weight[1:, 2] = BG_SCORE
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> _Out:
        self.modes.append(self.training)
        return _Out(self.conv(x))


def _toy_items(n: int = 5, size: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        mask = torch.zeros(size, size, dtype=torch.long)
        for cls in range(1, NUM_CLASSES + 1):
            if i % 3 == 0 or cls == 1 + i % 2:  # some images hold one class, some both
                y, x = torch.randint(0, size - 4, (2,), generator=g).tolist()
                mask[y : y + 4, x : x + 4] = cls
        mask[:, -1] = 255  # an ignored border
        image = torch.stack([(mask == 1).float(), (mask == 2).float(), torch.ones(size, size)])
        label = torch.stack([(mask == c).any().float() for c in range(1, NUM_CLASSES + 1)])
        items.append({"image": image, "label": label, "mask": mask, "name": f"toy{i}"})
    return items


def _loader(**kw) -> DataLoader:
    return DataLoader(_toy_items(**kw), batch_size=2, shuffle=False)


def test_truth_cam_is_perfect_from_the_right_threshold_on():
    model = _TruthCAM()
    result = evaluate(model, _loader(), NUM_CLASSES, progress=False)
    assert isinstance(result, EvalResult)
    assert result.cam_miou == pytest.approx(1.0)
    # below 0.25 the background pixels are taken by a present class; 0.25 is the first clean one
    assert result.best_threshold == pytest.approx(BG_SCORE)
    assert result.per_class_iou == pytest.approx([1.0, 1.0, 1.0])
    assert len(result.threshold_mious) == 101 and len(result.thresholds) == 101
    assert result.thresholds[-1] == pytest.approx(1.0)
    assert result.threshold_mious[0] < 0.9
    # at 1.0 the background ties with the foreground's 1.0 and takes every pixel
    assert all(m == pytest.approx(1.0) for m in result.threshold_mious[25:100])
    assert not result.best_threshold_at_edge
    # the fixed bg_threshold 0.2 lies below the background score: imperfect, and the same number
    # as the sweep's entry for 0.20
    assert result.pseudo_miou < 0.9
    assert result.pseudo_miou == pytest.approx(result.threshold_mious[20])
    assert result.num_images == 5


def test_evaluate_runs_in_eval_mode_and_restores_training_mode():
    model = _TruthCAM()
    model.train()
    evaluate(model, _loader(), NUM_CLASSES, progress=False, max_batches=1)
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    evaluate(model, _loader(), NUM_CLASSES, progress=False, max_batches=1)
    assert not model.training


def test_samples_max_batches_and_multiscale():
    result = evaluate(
        _TruthCAM(), _loader(), NUM_CLASSES, scales=(0.5, 1.0), num_samples=3,
        max_batches=2, progress=False, thresholds=torch.tensor([0.1, 0.5]),
    )
    assert result.num_images == 4
    s = result.samples
    assert s["images"].shape == (3, 3, 12, 12)
    assert s["targets"].shape == (3, 12, 12)
    assert s["cams"].shape == (3, NUM_CLASSES, 12, 12)
    assert s["masks"].shape == (3, 12, 12) and s["masks"].dtype == torch.int64
    assert all(v.device.type == "cpu" for v in s.values())
    assert result.thresholds == pytest.approx([0.1, 0.5])


def test_reduce_sums_counts_over_processes():
    # two identical "processes": doubled counts leave every IoU unchanged
    calls = []

    def double(t: Tensor) -> Tensor:
        calls.append(t.shape)
        return t * 2

    local = evaluate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False)
    both = evaluate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False, reduce=double)
    assert calls  # the reduction was applied
    assert both.num_images == 2 * local.num_images
    assert both.threshold_mious == pytest.approx(local.threshold_mious)
    # a reduce that adds a process with different counts changes the scores
    def add_background_errors(t: Tensor) -> Tensor:
        if t.ndim == 3:
            t = t.clone()
            t[:, 0, 1] += 1000  # background pixels predicted as class 1 elsewhere
        return t

    skewed = evaluate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False,
                      reduce=add_background_errors)
    assert skewed.cam_miou < local.cam_miou


def test_absent_class_reported_as_none():
    # only class 1 ever occurs: class 2 is absent from truth and prediction
    items = [it for it in _toy_items(n=6) if it["label"].tolist() == [1.0, 0.0]]
    assert items
    result = evaluate(_TruthCAM(), DataLoader(items, batch_size=2), NUM_CLASSES,
                      progress=False)
    assert result.per_class_iou[2] is None
    assert result.cam_miou == pytest.approx(1.0)
    assert not math.isnan(result.pseudo_miou)


def test_evaluate_rejects_wrong_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(_TruthCAM(), _loader(), 3, progress=False)
