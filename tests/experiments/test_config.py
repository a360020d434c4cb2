from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from experiments.config import ConfigError, RunConfig, to_run_config

PRESETS = sorted(p.stem for p in Path("experiments/conf/preset").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_module("experiments.conf", version_base=None):
        return compose("config", overrides=list(overrides))


def test_every_preset_is_shipped_and_composes():
    assert {"digits", "voc_seam_ppc"} <= set(PRESETS)
    for preset in PRESETS:
        overrides = [f"preset={preset}"]
        if preset.startswith("voc"):
            overrides.append("data.root=/data/VOC2012")
        cfg = to_run_config(_compose(*overrides))
        assert isinstance(cfg, RunConfig)


def test_default_is_digits_and_reference_constants():
    cfg = to_run_config(_compose())
    assert cfg.data.name == "digits" and cfg.model.backbone == "cnn4"
    assert cfg.ppc.tau == 0.1 and cfg.ppc.bg_threshold == 0.2 and cfg.ppc.top_k_ratio == 0.125
    assert (cfg.ppc.neg_drop, round(cfg.ppc.neg_keep_ratio * 21)) == (3, 10)


def test_voc_preset_is_the_reference_recipe():
    cfg = to_run_config(_compose("preset=voc_seam_ppc", "data.root=/x"))
    assert (cfg.data.crop_size, cfg.data.target_size, cfg.train.batch_size) == (448, 128, 8)
    assert cfg.model.pcm and cfg.loss.seam and cfg.eval.scales == [0.5, 1.0, 1.5, 2.0]


def test_voc_preset_without_root_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.root"):
        to_run_config(_compose("preset=voc_seam_ppc"))


@pytest.mark.parametrize(
    "override, field",
    [("ppc.tau=0", "ppc.tau"), ("ppc.top_k_ratio=1.5", "ppc.top_k_ratio"),
     ("train.mixed_precision=fp8", "train.mixed_precision"), ("optim.lr=-1", "optim.lr"),
     ("data.name=coco", "data.name"), ("eval.bg_threshold=2", "eval.bg_threshold"),
     ("model.output_stride=4", "model.output_stride"),
     ("train.dist_timeout_s=0", "train.dist_timeout_s")],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        to_run_config(_compose(override))


def test_unknown_field_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="nope"):
        _compose("ppc.nope=1")
