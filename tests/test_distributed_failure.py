"""One rank's failure stops every rank together: torchrun, 2 CPU ranks over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppc_core.checkpoint import latest_checkpoint, verify_checkpoint
from tests._dist_failure_worker import FAIL_AT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_failure_on_rank_1_stops_both_ranks_with_the_last_good_state(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Before: rank 0 waited in the loss all-reduce for rank 1 until the launcher's timeout.
    proc = subprocess.run([*TORCHRUN, "-m", "tests._dist_failure_worker", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    ckpt = tmp_path / "run" / "checkpoints" / f"step_{FAIL_AT:08d}"
    for rank in (0, 1):
        report = tmp_path / f"rank{rank}.txt"
        assert report.exists(), proc.stderr[-3000:]
        msg, step, ranks, path = report.read_text().splitlines()
        assert f"rank {rank}: step {FAIL_AT} failed on rank(s) [1]" in msg
        assert (int(step), ranks, Path(path)) == (FAIL_AT, "[1]", ckpt)
    assert "feats_s contains NaN" in (tmp_path / "rank1.txt").read_text()
    assert "another rank failed" in (tmp_path / "rank0.txt").read_text()
    assert "cls" in (tmp_path / "rank0.txt").read_text()  # rank 0's named terms
    assert latest_checkpoint(tmp_path / "run") == ckpt and verify_checkpoint(ckpt) is None
    state = load_file(ckpt / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
