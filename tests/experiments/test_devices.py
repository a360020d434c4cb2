"""Where a run trains: GPUs that were expected but are unusable stop it with one clear line."""

import os
import subprocess
import sys

import pytest
import torch

from experiments.train import DeviceError, train_on_cpu
from tests.conftest import tiny_overrides

_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


@pytest.fixture
def no_gpu_vars(monkeypatch):
    for name in _GPU_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_cpu_when_asked_or_when_no_gpu_exists(no_gpu_vars):
    assert train_on_cpu(True)
    assert train_on_cpu(False) == (not torch.cuda.is_available())


@pytest.mark.parametrize("name, value", [("NVIDIA_VISIBLE_DEVICES", "all"),
                                         ("CUDA_VISIBLE_DEVICES", "0,1")])
def test_expected_gpus_without_cuda_are_an_error_unless_cpu(no_gpu_vars, monkeypatch, name, value):
    if torch.cuda.is_available():
        pytest.skip("CUDA works here; the subprocess test below hides it instead")
    monkeypatch.setenv(name, value)
    with pytest.raises(DeviceError, match=rf"{name}={value} but torch.cuda.is_available\(\) is "
                                          r"False.*train\.cpu=true"):
        train_on_cpu(False)
    assert train_on_cpu(True)
    monkeypatch.setenv(name, "void" if name.startswith("NVIDIA") else "-1")  # "no GPUs"
    assert train_on_cpu(False)


def test_more_processes_than_gpus_is_an_error(no_gpu_vars, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() + 1))
    if not torch.cuda.is_available():
        assert train_on_cpu(False)  # CPU ranks: gloo, any number
        return
    with pytest.raises(DeviceError, match="processes on this node but"):
        train_on_cpu(False)
    assert train_on_cpu(True)


def test_the_entry_point_refuses_a_gpu_it_cannot_use(tmp_path):
    # GPU 99 exists nowhere: CUDA is unavailable on any machine, as with a too-old driver
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "99", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.train",
                           *[o for o in tiny_overrides(out, "train.steps=1")
                             if o != "train.cpu=true"]],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "CUDA_VISIBLE_DEVICES=99" in proc.stderr and "train.cpu=true" in proc.stderr
    assert not (out / "checkpoints").exists()
