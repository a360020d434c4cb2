"""Data-parallel paths with real processes: torchrun, 2 CPU ranks over gloo."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ppc_core.losses.ppc import PPCConfig, PPCLoss
from tests._dist_ppc_worker import global_batch
from tests.conftest import tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_ranks_compute_the_single_process_prototypes(tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "tests._dist_ppc_worker", str(tmp_path)],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cam, feats, labels = global_batch()
    _, expected = PPCLoss(PPCConfig()).prototypes(cam, feats, labels)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"proto_{rank}.pt")
        assert torch.allclose(got, expected, atol=1e-6)
    # the local batch alone gives other prototypes: the gather is what makes them agree
    _, local = PPCLoss(PPCConfig()).prototypes(cam[:4], feats[:4], labels[:4])
    assert not torch.allclose(local, expected, atol=1e-3)


def test_two_process_training_run_finishes_and_reports_once(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, "-m", "experiments.train",
                           *tiny_overrides(out, "train.steps=4", "eval.every=2")],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and len(metrics["history"]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002",
                                                                      "step_00000004"]
    shutil.rmtree(out)
