"""Data-parallel paths with real processes: torchrun, 2 ranks (gloo on CPU; one GPU each where
a machine has two, never two ranks on one GPU)."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from experiments.config import compose_config
from experiments.train import build_training, find_unused_parameters
from ppc_core.losses.ppc import PPCConfig, PPCLoss
from tests._dist_ppc_worker import global_batch
from tests.conftest import tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _device_overrides() -> list[str]:
    """Two ranks share one GPU (NCCL rejects it) unless there are two: CPU ranks then."""
    return [] if torch.cuda.device_count() >= 2 else ["train.cpu=true"]


def _train(out, *extra: str, cpu: bool = False) -> subprocess.CompletedProcess:
    devices = ["train.cpu=true"] if cpu else _device_overrides()
    return subprocess.run([*TORCHRUN, "-m", "experiments.train",
                           *tiny_overrides(out, *devices, *extra)],
                          env=_env(), capture_output=True, text=True)


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


def test_two_process_training_run_finishes_reports_once_and_resumes_exactly(tmp_path):
    out = tmp_path / "ddp"
    proc = _train(out, "train.steps=4", "eval.every=2", cpu=True)  # bit-exact: CPU ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and len(metrics["history"]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002",
                                                                      "step_00000004"]
    # as if killed after step 2's checkpoint: the resumed ranks replay steps 3 and 4 exactly
    # (the batches and their per-rank augmentation are functions of (seed, step, rank))
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "metrics.json").unlink()
    proc = _train(resumed, "train.steps=4", "eval.every=2", cpu=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    again = json.loads((resumed / "metrics.json").read_text())
    assert again["history"] == metrics["history"]
    assert again["last_logs"]["loss/total"] == metrics["last_logs"]["loss/total"]
    shutil.rmtree(out)


def test_ranks_draw_different_augmentations_and_replay_them_on_resume(tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "tests._dist_random_worker", str(tmp_path)],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"draws_{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        assert r["fresh"].shape == (6, 2, 2)
        # resumed at micro-step 3 in 2 DataLoader workers: the same draws
        torch.testing.assert_close(r["resumed"], r["fresh"][3:], rtol=0, atol=0)
    # no micro-step repeats the other rank's augmentation or PPC sampling
    assert not torch.isclose(r0["fresh"], r1["fresh"]).all(dim=(1, 2)).any()
    assert not torch.isclose(r0["sampling"], r1["sampling"]).all(dim=1).any()


@pytest.mark.parametrize("seam, ppc_start", [(False, 0), (True, 0), (False, 1)])
def test_pcm_with_and_without_seam_trains_every_parameter_on_two_ranks(tmp_path, seam,
                                                                        ppc_start):
    # ppc_start 0: every parameter has a gradient at every step, DDP searches for none;
    # ppc_start 1: the projector has none at step 0, DDP must search (find_unused_parameters)
    extra = ("model.pcm=true", f"loss.seam={str(seam).lower()}", "train.steps=3",
             "train.checkpoint_every=3", "eval.every=3", "optim.name=sgd", "optim.lr=0.05",
             f"loss.ppc_start_step={ppc_start}")
    proc = _train(tmp_path / "run", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = compose_config("digits", tiny_overrides(tmp_path / "run", *extra))
    assert find_unused_parameters(cfg) == (ppc_start > 0)
    torch.manual_seed(cfg.train.seed)  # what set_seed gives the model at the start of the run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model, _, _ = build_training(cfg)
    assert (model.pcm is not None) == seam  # without SEAM nothing trains PCM: not built
    assert any("nothing trains PCM" in str(w.message) for w in caught) != seam
    trained = load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors")
    params = dict(model.named_parameters())
    assert set(params) <= set(trained) and any(n.startswith("pcm.") for n in params) == seam
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), trained[n])]
    assert not unchanged


def _eval_worker(tmp_path, mode: str, timeout_s: int) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "-m", "tests._dist_eval_worker", str(tmp_path), mode,
                           str(timeout_s)], env=_env(), capture_output=True, text=True)


def test_sharded_evaluation_outlasts_no_timeout_and_gives_the_one_process_scores(tmp_path):
    # The evaluation takes 4 s in one process, longer than the 3 s process-group timeout.
    # Evaluated by rank 0 alone while rank 1 waits (the loop before sharding), rank 1 times out:
    # the test can fail, and train.dist_timeout_s reaches the process group.
    timeout = 3
    proc = _eval_worker(tmp_path, "rank0", timeout)
    assert proc.returncode != 0 and "timed out" in proc.stderr.lower(), proc.stderr[-3000:]
    # Sharded, each rank evaluates half (2 s) and the reduce waits for nobody.
    proc = _eval_worker(tmp_path, "sharded", timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["sharded"] == got["alone"]  # exactly: integer counts summed
    assert got["sharded"]["num_images"] == 16 and not math.isnan(got["sharded"]["cam_miou"])
    assert got["metrics"]["cam_miou"] == got["alone"]["cam_miou"]
