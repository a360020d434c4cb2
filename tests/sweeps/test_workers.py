"""Real sweep workers: parallel processes on SQLite and PostgreSQL, a killed worker, pruning,
the torchrun launcher, W&B runs per trial, and a bad space stopping everything up front."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeps.cli import main, run_worker
from sweeps.space import load_space
from sweeps.storage import default_url, open_storage
from sweeps.study import Recipe, create
from tests.experiments.test_tracking import wandb_records

from .conftest import write_space

ROOT = Path(__file__).resolve().parents[2]
ONE_DIM = {"ppc.tau": {"type": "float", "low": 0.05, "high": 0.5, "log": True}}


def _recipe(space: Path, **kw) -> Recipe:
    kw.setdefault("baseline", False)  # the baseline arm has its own tests (test_confirm.py)
    return Recipe(space=load_space(space).to_dict(), overrides=["track.trackers=[]"], **kw)


def _worker(study: str, url: str, root: Path, n: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "sweeps.cli", "run", "--study", study, "--storage", url,
           "--root", str(root), "--n-trials", str(n), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def _assert_all_accounted(study: optuna.Study, n: int, root: Path) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    # the study's target is reached; each worker may finish one trial already in flight
    assert n <= len(trials) <= n + 1
    for t in trials:
        out = Path(t.user_attrs["output_dir"])
        assert out == root / study.study_name / f"trial_{t.number}"
        if t.state == TrialState.COMPLETE:
            assert json.loads((out / "seed_0" / "metrics.json").read_text())["step"] == 4


def _two_workers(url: str, tmp_path: Path, n: int = 4) -> None:
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM)
    create("par", url, _recipe(space, sampler="random", pruner="none"))  # first, then workers
    _wait([_worker("par", url, tmp_path, n), _worker("par", url, tmp_path, n)])
    study = optuna.load_study(study_name="par", storage=open_storage(url, heartbeat=None))
    _assert_all_accounted(study, n, tmp_path)


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study(tmp_path: Path) -> None:
    _two_workers(default_url(tmp_path, "par"), tmp_path)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(tmp_path: Path, postgres) -> None:
    _two_workers(postgres.url, tmp_path)


@pytest.mark.slow
def test_killed_worker_trial_is_failed_retried_and_resumed(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM,
                        fixed={"train.steps": 6, "data.eval_images": 32})
    url = default_url(tmp_path, "kill")
    create("kill", url, _recipe(space, sampler="random", pruner="none"))
    beat = ("--heartbeat", "1", "--grace", "2")
    first = _worker("kill", url, tmp_path, 2, *beat)
    ckpt = tmp_path / "kill/trial_0/seed_0/checkpoints/step_00000002"
    deadline = time.monotonic() + 120
    while not ckpt.is_dir():
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # mid-trial: step 2 of 6 is saved
    first.wait()
    study = optuna.load_study(study_name="kill", storage=open_storage(url, heartbeat=None))
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    time.sleep(3)  # past the grace period
    (out,) = _wait([_worker("kill", url, tmp_path, 2, *beat)])
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    killed, retry = trials[0], trials[1]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == killed.params
    assert retry.user_attrs["output_dir"] == killed.user_attrs["output_dir"]
    assert killed.user_attrs["fail_reason"].startswith("stale: no heartbeat for 2 s")
    assert "fail_reason" not in retry.user_attrs  # the completed retry has no failure
    assert "resumed from" in out and "step_0000000" in out
    metrics = json.loads((tmp_path / "kill/trial_0/seed_0/metrics.json").read_text())
    assert metrics["step"] == 6 and [h["step"] for h in metrics["history"]] == [2, 4, 6]


def _study_with_a_strong_trial(tmp_path: Path, name: str, space: Path) -> optuna.Study:
    url = default_url(tmp_path, name)
    study = create(name, url, _recipe(space, sampler="random", pruner="median",
                                      prune_startup_trials=1))
    study.add_trial(create_trial(  # a finished trial far above anything 4 steps can reach
        params={"ppc.tau": 0.1}, distributions={"ppc.tau": FloatDistribution(0.05, 0.5, log=True)},
        value=0.99, intermediate_values={2: 0.99, 4: 0.99}))
    return study


def test_median_pruner_prunes_a_bad_run(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM)
    study = _study_with_a_strong_trial(tmp_path, "prune", space)
    run_worker("prune", default_url(tmp_path, "prune"), str(tmp_path), target=2, progress=False)
    trial = study.get_trials()[1]
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [2]  # stopped at the first evaluation
    metrics = json.loads((tmp_path / "prune/trial_1/seed_0/metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["step"] == 2


@pytest.mark.slow
def test_torchrun_trial_pruned_on_both_ranks(tmp_path: Path) -> None:
    # The preset starts PPC late: DDP must cope with a projector that gets no gradient yet.
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM,
                        fixed={"loss.ppc_start_step": 100})
    study = _study_with_a_strong_trial(tmp_path, "tr", space)
    run_worker("tr", default_url(tmp_path, "tr"), str(tmp_path), target=2, launcher="torchrun",
               num_processes=2, progress=False)
    trial = study.get_trials()[1]
    assert trial.state == TrialState.PRUNED, trial.user_attrs.get("fail_reason")
    assert list(trial.intermediate_values) == [2]
    run_dir = tmp_path / "tr/trial_1/seed_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["step"] == 2
    ckpt = run_dir / "checkpoints/step_00000002"  # saved by both ranks when they stopped
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert "Traceback" not in (run_dir / "launcher.log").read_text()


def _wandb_run_record(path: Path, wait: float = 10.0):
    """The run record of an offline .wandb file, waiting for W&B's service to flush it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _read_run_record(path)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _read_run_record(path: Path):
    """The run record of an offline .wandb file."""
    for run in wandb_records(path, "run"):
        return run
    raise AssertionError(f"no run record in {path}")


def test_every_trial_is_a_wandb_run_in_the_study_group(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM)
    url = default_url(tmp_path, "wb")
    create("wb", url, Recipe(space=load_space(space).to_dict(), sampler="random", pruner="none",
                             baseline=False))
    run_worker("wb", url, str(tmp_path), target=2, progress=False)
    for n in range(2):
        (f,) = glob.glob(str(tmp_path / f"wb/trial_{n}/seed_0/wandb/offline-run-*/*.wandb"))
        run = _wandb_run_record(Path(f))
        assert run.run_group == "wb" and run.display_name == f"trial-{n}-seed-0"
        assert f"trial-{n}" in list(run.tags)
    assert main(["report", "--study", "wb", "--root", str(tmp_path)]) == 0
    (summary,) = glob.glob(str(tmp_path / "wb/report/wandb/offline-run-*/*.wandb"))
    assert _wandb_run_record(Path(summary)).run_group == "wb"
    assert (tmp_path / "wb/report/report.md").is_file()


def test_bad_space_fails_before_any_trial(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  ppc.tau: {type: float, low: 0.5, high: 0.1}\n")
    rc = main(["run", "--study", "b", "--root", str(tmp_path), "--space", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "params.ppc.tau" in err and "empty range" in err
    assert not (tmp_path / "b").exists()  # no study, no trial directory
