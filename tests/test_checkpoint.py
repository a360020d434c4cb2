"""Checkpoints that survive damage: real Accelerate saves, then truncated or missing files."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from ppc_core.checkpoint import (
    MARKER,
    checkpoint_dirs,
    identity_hash,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


@pytest.fixture()
def acc():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _prepared(acc):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return acc.prepare(model, opt)


def _step(model, opt):
    model(torch.randn(6, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _saved_run(acc, tmp_path, steps=(2, 4), identity=None):
    """Checkpoints at `steps`; returns the model, optimiser and each step's weights."""
    model, opt = _prepared(acc)
    weights = {}
    for s in range(1, max(steps) + 1):
        _step(model, opt)
        if s in steps:
            save_checkpoint(acc, tmp_path, s, identity)
            weights[s] = model[0].weight.detach().clone()
    return model, opt, weights


def test_save_is_completed_by_a_marker_of_sizes_and_hashes(acc, tmp_path):
    _saved_run(acc, tmp_path, identity={"optim.lr": 0.1})
    ckpt = tmp_path / "checkpoints/step_00000004"
    marker = json.loads((ckpt / MARKER).read_text())
    assert marker["step"] == 4 and marker["identity"] == identity_hash({"optim.lr": 0.1})
    assert {"model.safetensors", "optimizer.bin"} <= set(marker["files"])
    assert verify_checkpoint(ckpt) is None and latest_checkpoint(tmp_path) == ckpt


def test_truncated_model_falls_back_to_the_previous_checkpoint(acc, tmp_path, capsys):
    model, _, weights = _saved_run(acc, tmp_path)
    bad = tmp_path / "checkpoints/step_00000004"
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors has" in verify_checkpoint(bad)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_00000002"
    assert load_checkpoint(acc, tmp_path) == tmp_path / "checkpoints/step_00000002"
    assert torch.equal(model[0].weight, weights[2])
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is unusable" in err and "trying the previous one" in err


def test_missing_optimizer_state_falls_back(acc, tmp_path, capsys):
    model, _, weights = _saved_run(acc, tmp_path)
    (tmp_path / "checkpoints/step_00000004/optimizer.bin").unlink()
    assert load_checkpoint(acc, tmp_path) == tmp_path / "checkpoints/step_00000002"
    assert torch.equal(model[0].weight, weights[2])
    assert "optimizer.bin is missing" in capsys.readouterr().err


def test_same_size_corruption_is_caught_by_the_hash(acc, tmp_path):
    _saved_run(acc, tmp_path)
    path = tmp_path / "checkpoints/step_00000004/model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(path.parent)
    assert load_checkpoint(acc, tmp_path).name == "step_00000002"


def test_no_usable_checkpoint_starts_fresh(acc, tmp_path, capsys):
    _saved_run(acc, tmp_path, steps=(2,))
    (tmp_path / "checkpoints/step_00000002" / MARKER).unlink()  # as a save cut short would
    assert load_checkpoint(acc, tmp_path) is None
    assert "save not completed" in capsys.readouterr().err


def test_retention_deletes_only_this_identitys_checkpoints(acc, tmp_path):
    _saved_run(acc, tmp_path, steps=(1,), identity={"run": "other"})
    model, opt = _prepared(acc)
    for s in (2, 4, 6):
        _step(model, opt)
        save_checkpoint(acc, tmp_path, s, {"run": "this"})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "step_00000001", "step_00000004", "step_00000006"]


def test_a_run_with_a_truncated_latest_checkpoint_resumes_from_the_previous(tmp_path, capsys):
    from experiments.config import compose_config
    from experiments.train import run
    from tests.conftest import tiny_overrides

    cfg = compose_config("digits", tiny_overrides(tmp_path / "run", "train.steps=4",
                                                  "eval.every=2", "train.checkpoint_every=2"))
    first = run(cfg)
    bad = tmp_path / "run/checkpoints/step_00000004/model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    again = run(cfg)
    out = capsys.readouterr()
    assert f"checkpoint {bad.parent} is unusable" in out.err
    assert "resumed from" in out.out and "step_00000002 at step 2" in out.out
    assert again["history"] == first["history"]
    assert verify_checkpoint(bad.parent) is None  # step 4 saved again, intact
