"""Session-wide test environment: offline W&B, a private data cache, deterministic threads."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data_cache")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "PPC_DATA_CACHE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", PPC_DATA_CACHE=str(cache), WANDB_SILENT="true")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tiny_overrides(output_dir, *extra: str) -> list[str]:
    """A training run of a few seconds on the bundled data (Hydra overrides); on the CPU even
    where a GPU is present, since the pinned values are CPU float32 (cuDNN's TF32 would move them)."""
    return [f"train.output_dir={output_dir}", "train.cpu=true", "data.num_images=32", "data.eval_images=16",
            "train.steps=6", "train.batch_size=8", "eval.every=3", "eval.batch_size=16",
            "train.log_every=1", "train.checkpoint_every=2", "track.trackers=[]",
            "loss.ppc_start_step=0", "loss.ppc_ramp_steps=0", *extra]
