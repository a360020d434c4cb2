"""The reference recipe end to end on a tiny VOC-shaped folder: VOC data, ResNet + PCM, SEAM + PPC."""

import pytest

from experiments.config import compose_config
from experiments.train import run
from tests.data.test_voc import voc_root  # noqa: F401  (fixture)


@pytest.mark.slow
def test_voc_seam_ppc_preset_trains_and_evaluates(voc_root, tmp_path):  # noqa: F811
    overrides = [
        f"data.root={voc_root}", "data.train_split=train",
        "data.eval_split=val", "data.crop_size=64", "data.target_size=32", "data.num_workers=0",
        "model.backbone=resnet18", "model.pretrained=", "model.freeze_bn=false",
        "train.steps=2", "train.batch_size=2", "train.mixed_precision=no",
        "eval.every=2", "eval.scales=[1.0,0.5]", f"train.output_dir={tmp_path / 'run'}",
        "track.trackers=[]",
    ]
    metrics = run(compose_config("voc_seam_ppc", overrides))
    terms = {k for k in metrics["last_logs"] if k.startswith("loss/")}
    assert {"loss/cls", "loss/er", "loss/ecr", "loss/min_pool", "loss/ppc_cross_proto",
            "loss/ppc_cross_cam", "loss/ppc_intra"} <= terms
    assert metrics["step"] == 2 and 0.0 <= metrics["cam_miou"] <= 1.0
