"""The reference recipe end to end on a tiny VOC-shaped folder: VOC data, ResNet + PCM, SEAM + PPC."""

import shutil

import pytest
from PIL import Image

from experiments.config import compose_config
from experiments.train import run
from tests.data.test_voc import voc_like_root, voc_root  # noqa: F401  (fixtures)


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


@pytest.mark.slow
def test_voc_seam_ppc_on_a_voc_shaped_folder_evaluates_twice_and_resumes(voc_like_root, tmp_path):  # noqa: F811
    """The preset on VOC's variety (sizes, orientations, 20 classes, ignore borders, SBD masks):
    its evaluations once crashed on eval images of different sizes (issue 14.1)."""
    out = tmp_path / "run"

    def overrides() -> list[str]:
        return [f"data.root={voc_like_root}", "data.crop_size=64", "data.target_size=32",
                "data.num_workers=2", "model.backbone=resnet18", "model.pretrained=",
                "model.freeze_bn=false", "train.steps=4", "train.batch_size=2",
                "train.mixed_precision=no", "train.cpu=true",  # bit-exact resumption: CPU
                "train.checkpoint_every=2", "eval.every=2",
                "eval.scales=[1.0,0.5]", "eval.max_batches=5", "eval.num_samples=5",
                f"train.output_dir={out}", "track.trackers=[]"]

    whole = run(compose_config("voc_seam_ppc", overrides()))  # train_aug -> train, as preset
    assert [h["step"] for h in whole["history"]] == [2, 4]
    assert all(0.0 <= h["cam_miou"] <= 1.0 for h in whole["history"])
    assert (out / "overlays.png").exists()
    with Image.open(out / "overlays.png") as grid:  # 5 rows of the first (38 x 50) image's size
        assert grid.size == (4 * 50, 5 * 38)
    # as if killed after step 2's checkpoint: the DataLoader workers of the resumed run draw
    # the augmentation of steps 3 and 4 as the first run's did
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "metrics.json").unlink()
    resumed = run(compose_config("voc_seam_ppc", overrides()))
    assert resumed["history"] == whole["history"]
    assert resumed["last_logs"]["loss/total"] == whole["last_logs"]["loss/total"]
