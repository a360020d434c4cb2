import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ppc_core.data.sampler import EvalShard
from ppc_core.evaluate import EvalResult, accumulate, evaluate, summarise

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
        self.flags: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor, project: bool = True, refine: bool = True) -> _Out:
        self.modes.append(self.training)
        self.flags.append((project, refine))
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


def _flat_counts(loader: DataLoader) -> Tensor:
    """A process's counts as its all-reduce sends them."""
    sent = []
    accumulate(_TruthCAM(), loader, NUM_CLASSES, progress=False).reduced(
        lambda t: sent.append(t) or t)
    return sent[0]


def _shard(items: list[dict], rank: int, world: int, batch_size: int = 2) -> DataLoader:
    return DataLoader(items, batch_sampler=EvalShard(len(items), batch_size, rank, world))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reduced_give_the_one_process_scores_exactly(world):
    items = _toy_items(n=7)
    whole = evaluate(_TruthCAM(), DataLoader(items, batch_size=2), NUM_CLASSES, progress=False,
                     num_samples=2)
    others = [_flat_counts(_shard(items, r, world)) for r in range(1, world)]
    # shard 0's all-reduce adds the other shards' counts
    got = evaluate(_TruthCAM(), _shard(items, 0, world), NUM_CLASSES, progress=False,
                   num_samples=2, reduce=lambda t: t + sum(others))
    assert got.num_images == whole.num_images == 7
    assert got.threshold_mious == whole.threshold_mious  # exactly: integer counts
    assert (got.cam_miou, got.pseudo_miou, got.best_threshold) == (
        whole.cam_miou, whole.pseudo_miou, whole.best_threshold)
    assert got.pseudo_per_class_iou == whole.pseudo_per_class_iou
    # samples stay local: shard 0 holds the first batch, as one process would
    torch.testing.assert_close(got.samples["images"], whole.samples["images"])
    # a shard alone scores differently (the toy set is not homogeneous)
    alone = evaluate(_TruthCAM(), _shard(items, 0, world), NUM_CLASSES, progress=False)
    assert alone.num_images < 7 and alone.pseudo_miou != whole.pseudo_miou


def test_eval_shards_cover_the_first_max_batches_once():
    shards = [list(EvalShard(11, 2, r, 3, max_batches=5)) for r in range(3)]
    assert shards[0] == [[0, 1], [6, 7]] and shards[1] == [[2, 3], [8, 9]]
    assert shards[2] == [[4, 5]]
    assert len(EvalShard(11, 2, 0, 3)) == 2 and list(EvalShard(11, 2, 2, 3))[-1] == [10]
    with pytest.raises(ValueError, match="rank"):
        EvalShard(11, 2, 3, 3)


def test_evaluate_is_accumulate_then_summarise():
    counts = accumulate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False)
    assert counts.sweep.shape == (101, 3, 3) and counts.sweep.dtype == torch.int64
    a, b = summarise(counts), evaluate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False)
    assert (a.threshold_mious, a.pseudo_miou, a.num_images) == (
        b.threshold_mious, b.pseudo_miou, b.num_images)
    with pytest.raises(ValueError, match="2 thresholds for 101"):
        summarise(counts, torch.tensor([0.1, 0.2]))


def _sized_item(h: int, w: int, cls: int) -> dict:
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[2:6, 3:8] = cls
    mask[:, 0] = 255
    image = torch.stack([(mask == 1).float(), (mask == 2).float(), torch.ones(h, w)])
    label = torch.tensor([float(cls == 1), float(cls == 2)])
    return {"image": image, "label": label, "mask": mask, "name": f"{h}x{w}"}


def test_samples_of_images_of_different_sizes_share_the_first_size():
    # VOC: eval images differ in size and orientation, batch size 1 (issue 14.1's crash)
    items = [_sized_item(12, 16, 1), _sized_item(16, 12, 2), _sized_item(10, 10, 1)]
    result = evaluate(_TruthCAM(), DataLoader(items, batch_size=1), NUM_CLASSES,
                      progress=False, num_samples=3)
    s = result.samples
    assert s["images"].shape == (3, 3, 12, 16) and s["cams"].shape == (3, 2, 12, 16)
    assert s["targets"].shape == s["masks"].shape == (3, 12, 16)
    torch.testing.assert_close(s["targets"][0], items[0]["mask"])  # the first is untouched
    # the portrait 16x12 is scaled by 0.75 to 12x9 and padded on the right with ignore
    assert (s["targets"][1, :, 9:] == 255).all() and (s["masks"][1, :, 9:] == 255).all()
    assert (s["targets"][1, :, :9] != 255).any() and (s["cams"][1, ..., 9:] == 0).all()
    # the 10x10 is scaled to fit 12 rows (12x12), padded on the right
    assert (s["targets"][2, :, 12:] == 255).all() and (s["targets"][2, :, :12] == 0).any()
    assert result.num_images == 3


def test_evaluation_asks_the_model_for_cams_only():
    model = _TruthCAM()
    evaluate(model, _loader(), NUM_CLASSES, progress=False, scales=(0.5, 1.0))
    assert model.flags and set(model.flags) == {(False, False)}


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


def test_the_runs_evaluation_does_not_depend_on_mixed_precision(tmp_path):
    """Accelerate patches the training autocast onto a mixed-precision model's forward; the
    run's evaluation (experiments.train.eval_fn) must not inherit it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from experiments.config import compose_config
    from experiments.train import eval_fn
    from ppc_core.models import build_model

    cfg = compose_config("digits", ["train.cpu=true", "data.eval_images=8", "eval.batch_size=4",
                                    "track.trackers=[]", f"train.output_dir={tmp_path}"])
    results, cams = {}, {}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for precision in ("no", "bf16"):
        try:
            acc = Accelerator(cpu=True, mixed_precision=precision)
            torch.manual_seed(0)
            model = acc.prepare(build_model("cnn4", 10))
            last: list[EvalResult] = []
            eval_fn(cfg, acc, last)(model)
            results[precision] = last[0]
            with torch.no_grad():  # eval mode: a train-mode forward would move BN statistics
                cams[precision] = model.eval()(x).cam.float()
        finally:
            AcceleratorState._reset_state()
            GradientState._reset_state()
    assert not torch.equal(cams["no"], cams["bf16"])  # training's forward does run in bf16
    assert results["bf16"].threshold_mious == results["no"].threshold_mious
    torch.testing.assert_close(results["bf16"].samples["cams"], results["no"].samples["cams"],
                               rtol=0, atol=0)
    assert results["no"].num_images == 8
