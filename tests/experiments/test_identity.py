"""Run identity: a run never continues another's work, and the same command resumes its own."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import compose_config, identity_fields, run_identity
from experiments.run_dir import RunFolderConflict
from experiments.train import run
from ppc_core.checkpoint import checkpoint_dirs, identity_hash, read_marker
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _cfg(out, *extra):
    return compose_config("digits", tiny_overrides(out, "train.steps=2", "eval.every=2", *extra))


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_identity_leaves_out_where_and_how_often_but_not_what(tmp_path):
    base = _cfg(tmp_path / "a")
    same = [_cfg(tmp_path / "b", "train.log_every=5", "train.checkpoint_every=7",
                 "train.resume=false", "track.project=x", "eval.num_samples=2",
                 "data.num_workers=2", "train.dist_timeout_s=60")]
    differ = [_cfg(tmp_path / "a", extra) for extra in (
        "train.steps=3", "loss.use_ppc=false", "eval.every=1", "train.seed=1", "optim.lr=0.02",
        "ppc.tau=0.2", "eval.scales=[1.0,0.5]")]
    assert all(run_identity(c) == run_identity(base) for c in same)
    assert len({run_identity(c) for c in [base, *differ]}) == 1 + len(differ)
    fields = identity_fields(base)
    assert "train.output_dir" not in fields and "track.project" not in fields
    assert {"train.steps", "eval.every", "ppc.tau"} <= set(fields)


def test_unnamed_folder_is_derived_from_the_identity(tmp_path):
    a = compose_config("digits", ["loss.use_ppc=true"])
    b = compose_config("digits", ["loss.use_ppc=false"])
    assert a.train.output_dir == f"runs/train/{run_identity(a)}"
    assert b.train.output_dir != a.train.output_dir
    assert compose_config("digits", ["loss.use_ppc=true"]).train.output_dir == a.train.output_dir


def test_another_run_into_a_used_folder_stops_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    run(_cfg(out, "loss.use_ppc=false"))
    before = _files(out)
    with pytest.raises(RunFolderConflict) as err:
        run(_cfg(out, "loss.use_ppc=true", "train.steps=3"))
    msg = str(err.value)
    assert "\n" not in msg and f"train.output_dir={out}" in msg
    assert "loss.use_ppc (True here, False there)" in msg and "train.steps (3 here, 2 there)" in msg
    assert "train.resume=false" in msg and "another train.output_dir" in msg
    assert _files(out) == before


def test_same_run_again_resumes_and_a_used_lock_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(_cfg(out))
    again = run(_cfg(out, "train.log_every=2"))  # logging cadence is not identity
    assert "resumed from" in capsys.readouterr().out
    assert again["history"] == first["history"]
    with open(out / ".lock", "w") as held:  # another process training there
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunFolderConflict, match="in use by another training process"):
            run(_cfg(out))


def test_resume_false_moves_the_previous_run_aside(tmp_path):
    out = tmp_path / "run"
    run(_cfg(out, "loss.use_ppc=false"))
    new = _cfg(out, "loss.use_ppc=true", "train.resume=false")
    metrics = run(new)
    moved = list((out / "previous").iterdir())
    assert len(moved) == 1 and (moved[0] / "metrics.json").exists()
    assert [p.name for p in checkpoint_dirs(moved[0])] == ["step_00000002"]
    assert {read_marker(p)["identity"] for p in checkpoint_dirs(out)} == {
        identity_hash(identity_fields(new))}
    assert json.loads((out / "metrics.json").read_text())["history"] == metrics["history"]
    assert json.loads((out / "config.json").read_text())["run.identity"] == run_identity(new)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_multirun_jobs_get_their_own_folders_and_results(tmp_path):
    tiny = [o for o in tiny_overrides("unused", "train.steps=2", "eval.every=2")
            if not o.startswith("train.output_dir")]
    proc = _cli(tmp_path, "--multirun", "loss.use_ppc=true,false", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "runs/train").iterdir())
    assert len(runs) == 2
    metrics = {json.loads((r / "config.json").read_text())["loss.use_ppc"]:
               json.loads((r / "metrics.json").read_text()) for r in runs}
    assert set(metrics) == {True, False}
    assert metrics[True]["last_logs"]["loss/total"] != metrics[False]["last_logs"]["loss/total"]
    assert "loss/ppc_intra" in metrics[True]["last_logs"]
    assert "resumed from" not in proc.stdout + proc.stderr

    again = _cli(tmp_path, "loss.use_ppc=true", *tiny)  # the same command as job 0: resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert len(list((tmp_path / "runs/train").iterdir())) == 2

    ppc_dir = next(r for r in runs if json.loads((r / "config.json").read_text())["loss.use_ppc"])
    other = _cli(tmp_path, f"train.output_dir={ppc_dir}", "loss.use_ppc=false", *tiny)
    assert other.returncode == 1
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith("ppc-train: train.output_dir=") and "loss.use_ppc" in last
    assert "Traceback" not in other.stderr
