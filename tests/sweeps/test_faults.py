"""Faults a cluster throws at a sweep, with real parts: SIGTERM / Ctrl-C to real workers, a
PostgreSQL server stopped and started under training workers, a full file system, and the
user errors that must end in one line that says what to do."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from sweeps.cli import main
from sweeps.space import load_space
from sweeps.storage import default_url, open_storage
from sweeps.study import Recipe, create

from .conftest import free_port, write_space

ROOT = Path(__file__).resolve().parents[2]
ONE_DIM = {"ppc.tau": {"type": "float", "low": 0.05, "high": 0.5, "log": True}}


def _recipe(space: Path, **kw) -> Recipe:
    kw.setdefault("baseline", False)  # the faults hit search trials; trial 0 is one
    return Recipe(space=load_space(space).to_dict(), overrides=["track.trackers=[]"],
                  sampler="random", pruner="none", **kw)


def _run(study: str, url: str, root: Path, n: int, *extra: str, log: Path | None = None,
         limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sweeps.cli", "run", "--study", study, "--storage", url,
           "--root", str(root), "--n-trials", str(n), *extra]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(path_glob: str, proc: subprocess.Popen, base: Path, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(base.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, f"worker ended early ({proc.returncode})"
        assert time.monotonic() < deadline, f"no {path_glob} after {timeout} s"
        time.sleep(0.05)


def _study(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=None))


# ----------------------------------------------------------------- graceful stop


@pytest.mark.slow
@pytest.mark.parametrize("sig, launcher", [(signal.SIGTERM, "inprocess"),
                                           (signal.SIGINT, "torchrun")])
def test_signal_checkpoints_requeues_and_the_same_run_resumes(tmp_path: Path, sig, launcher
                                                              ) -> None:
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM, fixed={
        "train.steps": 40, "eval.every": 20, "train.checkpoint_every": 2})
    url = default_url(tmp_path, "g")
    create("g", url, _recipe(space))
    args = ("--launcher", launcher)
    log = tmp_path / "first.log"
    first = _run("g", url, tmp_path, 1, *args, log=log)
    _wait_for("g/trial_0/seed_0/checkpoints/step_00000002", first, tmp_path)
    first.send_signal(sig)
    rc = first.wait(timeout=120)
    out = log.read_text()
    assert rc == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], out[-3000:]
    assert f"stopped by {sig.name}: trial 0 saved at step" in out and "Traceback" not in out
    study = _study("g", url)
    interrupted, retry = study.get_trials()
    reason = interrupted.user_attrs["fail_reason"]
    assert interrupted.state == TrialState.FAIL and reason.startswith(f"interrupted by {sig.name}")
    step = int(re.search(r"at step (\d+)", reason).group(1))
    assert 2 <= step < 40
    ckpt = tmp_path / f"g/trial_0/seed_0/checkpoints/step_{step:08d}"
    assert ckpt.is_dir()  # the step it stopped at was saved
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert retry.params == interrupted.params and "fail_reason" not in retry.user_attrs

    again = _run("g", url, tmp_path, 1, *args)  # the same command: resumes, not counted twice
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    run_log = out + (tmp_path / "g/trial_0/seed_0/launcher.log").read_text() \
        if launcher != "inprocess" else out
    assert f"resumed from {ckpt} at step {step}" in run_log
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "fail_reason" not in trials[1].user_attrs
    metrics = json.loads((tmp_path / "g/trial_0/seed_0/metrics.json").read_text())
    assert metrics["step"] == 40 and [h["step"] for h in metrics["history"]] == [20, 40]


# ----------------------------------------------------------------- database outage


@pytest.mark.slow
def test_workers_ride_out_a_postgres_outage(tmp_path: Path, postgres) -> None:
    """The server stops for 12 s while two workers train: each stops its trial at a checkpoint
    before the grace period, records and re-queues it when the server is back, and the retries
    resume; no trial folder is ever trained by two workers (TrialRunner's folder lock)."""
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM, fixed={
        "train.steps": 300, "eval.every": 100, "train.checkpoint_every": 5})
    create("pg", postgres.url, _recipe(space))
    beat = ("--heartbeat", "2", "--grace", "8", "--db-wait", "120")
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = [_run("pg", postgres.url, tmp_path, 2, *beat, log=log) for log in logs]
    try:
        for n in range(2):
            _wait_for(f"pg/trial_{n}/seed_0/checkpoints/step_00000005", workers[n], tmp_path)
        postgres.stop()
        time.sleep(12)  # > 3/4 of the grace: the heartbeats stop both trials
        assert all(w.poll() is None for w in workers), "a worker died in the outage"
        postgres.start()
        rcs = [w.wait(timeout=400) for w in workers]
    finally:
        postgres.start(check=False)  # running again for the next test, whatever happened
        for w in workers:
            if w.poll() is None:
                w.kill()
    outs = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n-----\n".join(o[-3000:] for o in outs)
    joined = "\n".join(outs)
    assert "Traceback" not in joined and "in use by another worker" not in joined
    assert "heartbeat: no database for" in joined and "resumed from" in joined
    study = _study("pg", postgres.url)
    trials = study.get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped, "no trial was stopped by the outage"
    for t in stopped:
        assert "no database for" in t.user_attrs["fail_reason"] or \
            t.user_attrs["fail_reason"].startswith("stale"), t.user_attrs
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    assert all(t.number in retried or t.system_attrs.get("failed_trial") in retried
               for t in stopped)  # every stopped trial has a retry
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 2 and all("fail_reason" not in t.user_attrs for t in complete)
    for t in complete:
        metrics = json.loads(Path(t.user_attrs["best_run_dir"], "metrics.json").read_text())
        assert metrics["step"] == 300


def test_status_does_not_hang_on_a_port_that_never_answers() -> None:
    with socket.socket() as server:  # the kernel completes the TCP handshake; nobody answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        tic = time.monotonic()
        done = subprocess.run(  # a process of its own: a hang fails the test, not the suite
            [sys.executable, "-m", "sweeps.cli", "status", "--study", "s", "--storage",
             f"postgresql://u@127.0.0.1:{port}/db"], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        took = time.monotonic() - tic
    err = done.stderr
    assert done.returncode == 2 and took < 30, (took, err)
    assert err.count("\n") == 1 and "cannot reach PostgreSQL" in err and "timeout" in err.lower()


def test_unreachable_postgres_is_one_line(capsys) -> None:
    url = f"postgresql://someone:secret@127.0.0.1:{free_port()}/nope"  # nothing listens
    assert main(["status", "--study", "s", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach PostgreSQL" in err and "refused" in err
    assert "secret" not in err  # the password stays out of logs


# ----------------------------------------------------------------- full disk


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MB tmpfs (root only), for a disk that fills up mid-trial."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_disk_fails_the_trial_in_one_line_and_it_resumes(tmp_path: Path, small_fs: Path
                                                              ) -> None:
    # The study on a disk with room, the trial folders on one that fills after a checkpoint or
    # two (a cnn4 checkpoint is ~0.5 MB).
    space = write_space(tmp_path / "s.yaml", params=ONE_DIM, fixed={
        "train.steps": 12, "eval.every": 12, "train.checkpoint_every": 2})
    url = default_url(tmp_path, "full")
    create("full", url, _recipe(space))
    proc = _run("full", url, small_fs, 1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("disk full")]
    assert "trial 0 failed" in line and "Free space" in line
    study = _study("full", url)
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith(
        "disk full")
    assert retry.state == TrialState.WAITING
    saved = sorted((small_fs / "full/trial_0/seed_0/checkpoints").glob("step_????????"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = _run("full", url, small_fs, 1)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    if saved:
        assert f"resumed from {saved[-1]}" in out
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


# ----------------------------------------------------------------- errors that say what to do


def test_unwritable_storage_paths_are_one_line(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for url in (f"sqlite:///{blocker}/study.db", f"journal://{blocker}/study.log"):
        assert main(["create", "--study", "s", "--storage", url, "--space", "demo"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot create the folder" in err and str(blocker) in err


def test_space_values_outside_a_field_range_are_refused_at_create(tmp_path: Path, capsys) -> None:
    space = tmp_path / "tau.yaml"
    space.write_text(yaml.safe_dump({"fixed": {"ppc.tau": -1},
                                     "params": {"optim.lr": {"type": "float", "low": 0.001,
                                                             "high": 0.1, "log": True}}}))
    assert main(["create", "--study", "s", "--root", str(tmp_path), "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert str(space) in err and "fixed.ppc.tau" in err and "> 0" in err
    high = write_space(tmp_path / "bg.yaml", params={
        "ppc.bg_threshold": {"type": "float", "low": 0.1, "high": 1.5}})
    assert main(["create", "--study", "s", "--root", str(tmp_path), "--space", str(high)]) == 2
    err = capsys.readouterr().err
    assert "params.ppc.bg_threshold (high 1.5)" in err and "[0, 1]" in err
    assert not (tmp_path / "s/study.db").exists()


def test_read_only_commands_on_a_missing_study_create_nothing(tmp_path: Path, capsys) -> None:
    for cmd in ("status", "report"):
        assert main([cmd, "--study", "nope", "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "no study 'nope'" in err and "ppc-sweep create --study nope" in err
    assert not (tmp_path / "nope").exists()


def test_run_needs_an_existing_study_and_says_whose_settings_win(tmp_path: Path, capsys,
                                                                  tiny_space: Path) -> None:
    base = ["--root", str(tmp_path), "--n-trials", "0", "--space", str(tiny_space)]
    assert main(["run", "--study", "tpyo", *base]) == 2  # a mistyped name starts nothing
    err = capsys.readouterr().err
    assert "no study 'tpyo'" in err and "--create" in err
    assert not (tmp_path / "tpyo").exists()
    assert main(["run", "--study", "s", "--create", "--seeds", "2", *base]) == 0
    assert main(["run", "--study", "s", "--sampler", "random", "--seeds", "3", "--space", "demo",
                 *base[:-2], "--", "optim.lr=0.02"]) == 0
    err = capsys.readouterr().err
    (note,) = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert "stored settings win" in note and "--sampler tpe (not random)" in note
    assert "--seeds 2 (not 3)" in note and f"--space {tiny_space} (not demo)" in note
    assert "overrides [] (not ['optim.lr=0.02'])" in note
    assert main(["run", "--study", "s", "--seeds", "2", *base]) == 0  # the same: no note
    assert "note:" not in capsys.readouterr().err


def test_fail_reasons_stale_trial_has_one_its_retry_not(tmp_path: Path) -> None:
    url = default_url(tmp_path, "st")
    storage = open_storage(url, heartbeat=1, grace=1)
    study = optuna.create_study(storage=storage, study_name="st")
    dead = study.ask({"x": FloatDistribution(0, 1)})  # a worker that beat once, then died
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith(
        "stale: no heartbeat for 1 s")
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert "fail_reason" not in retry.user_attrs
    trial = study.ask()  # the retry
    study.tell(trial, 0.5)
    assert "fail_reason" not in study.get_trials()[1].user_attrs
