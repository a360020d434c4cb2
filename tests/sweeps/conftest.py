"""Shared pieces of the sweep tests: a tiny training configuration and a tiny search space."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# A digits run of a few seconds on one CPU thread (train.steps <= 6, few images).
TINY_FIXED = {
    "train.steps": 4, "eval.every": 2, "data.num_images": 32, "data.eval_images": 16,
    "train.batch_size": 4, "eval.batch_size": 16, "train.checkpoint_every": 2,
    "model.backbone": "cnn4",
}


def write_space(path: Path, fixed: dict | None = None, params: dict | None = None) -> Path:
    space = {
        "fixed": {**TINY_FIXED, **(fixed or {})},
        "params": params or {
            "ppc.tau": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
            "ppc.w_intra": {"type": "categorical", "choices": [0.0, 0.1]},
            "ppc.neg_drop": {"type": "int", "low": 0, "high": 4,
                             "when": {"ppc.w_intra": {"gt": 0}}},
        },
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    return write_space(tmp_path / "tiny.yaml")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
