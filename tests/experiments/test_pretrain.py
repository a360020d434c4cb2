"""The pretrained start: the shipped cnn4 weights and the command that regenerates them."""

import json

import pytest
import torch

from experiments.config import compose_config
from experiments.pretrain import (
    REGENERATE,
    SHIPPED_SHA256,
    SHIPPED_WEIGHTS,
    PretrainConfig,
    main,
    pretrain,
)
from ppc_core.checkpoint import file_sha256
from ppc_core.models.backbone import build_backbone


def test_shipped_weights_are_the_recorded_ones_and_load_into_cnn4():
    assert SHIPPED_WEIGHTS.is_file(), f"missing {SHIPPED_WEIGHTS}; regenerate: {REGENERATE}"
    assert file_sha256(SHIPPED_WEIGHTS) == SHIPPED_SHA256
    assert SHIPPED_WEIGHTS.stat().st_size < 5_000_000
    net = build_backbone("cnn4", output_stride=8, pretrained=str(SHIPPED_WEIGHTS))
    state = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(state) == set(net.state_dict())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    # a trained backbone, not a fresh one: its BatchNorm statistics moved away from (0, 1)
    assert float(state["block4.1.1.running_var"].mean()) != pytest.approx(1.0, abs=1e-3)


def test_the_pretrained_preset_points_at_the_shipped_weights():
    cfg = compose_config("digits_pretrained")
    assert cfg.model.pretrained == str(SHIPPED_WEIGHTS)
    assert cfg.loss.use_ppc and cfg.loss.ppc_start_step == 0
    assert cfg.data.target_size // cfg.model.output_stride >= 8  # a loss grid of 8x8 or more
    mults = cfg.optim.group_lr_mults
    assert max(mults[:2]) < min(mults[2:])  # the backbone learns more slowly than the heads


def _short(tmp_path, name: str, seed: int = 0) -> PretrainConfig:
    return PretrainConfig(steps=3, batch_size=8, train_images=32, eval_images=16, eval_every=2,
                          seed=seed, output_dir=str(tmp_path / name), trackers=[],
                          data_root=str(tmp_path / "cache"))


@pytest.mark.slow
def test_a_short_regeneration_is_deterministic(tmp_path):
    first = pretrain(_short(tmp_path, "a"), progress=False)
    second = pretrain(_short(tmp_path, "b"), progress=False)
    assert first["sha256"] == second["sha256"]
    assert (tmp_path / "a" / "cnn4_digits.pt").read_bytes() == (
        tmp_path / "b" / "cnn4_digits.pt").read_bytes()
    other = pretrain(_short(tmp_path, "c", seed=1), progress=False)
    assert other["sha256"] != first["sha256"]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 3]
    assert 0.0 <= metrics["held_out_accuracy"] <= 1.0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["steps"] == 3
    build_backbone("cnn4", pretrained=str(tmp_path / "a" / "cnn4_digits.pt"))


def test_bad_arguments_give_one_line(capsys):
    assert main(["--steps", "0", "--trackers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pretrain: --steps must be >= 1, got 0"
