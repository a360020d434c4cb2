"""The baseline arm of every study, `ppc-sweep confirm` (killed and restarted), and the paired
statistics of the verdict."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from sweeps.cli import run_worker
from sweeps.confirm import confirm_name, fresh_seeds, top_trials
from sweeps.report import best_trials
from sweeps.space import load_space
from sweeps.storage import default_url, open_storage
from sweeps.study import BASELINE, ROLE, Recipe, create, load
from sweeps.verdict import BETTER, SAME, WORSE, paired_t

from .conftest import write_space

ROOT = Path(__file__).resolve().parents[2]


def test_paired_t_interval_by_hand() -> None:
    arm = {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.80, 9: 0.99}  # seed 9 has no baseline: unpaired
    base = {1: 0.40, 2: 0.45, 3: 0.60, 4: 0.60}
    # d = 0.10, 0.15, 0.10, 0.20: mean 0.1375, sd sqrt(0.006875 / 3) = 0.047871,
    # t(0.975, 3) = 3.182446, half width 3.182446 * 0.047871 / 2 = 0.076173
    p = paired_t(arm, base)
    assert p.n == 4 and math.isclose(p.mean, 0.1375)
    assert math.isclose(p.lo, 0.061326, abs_tol=2e-6) and math.isclose(p.hi, 0.213674, abs_tol=2e-6)
    assert p.verdict == BETTER
    assert paired_t(base, {s: v for s, v in arm.items() if s != 9}).verdict == WORSE
    noisy = paired_t({1: 0.5, 2: 0.4, 3: 0.6}, {1: 0.45, 2: 0.45, 3: 0.45})
    assert noisy.lo < 0 < noisy.hi and noisy.verdict == SAME
    one = paired_t({1: 0.9}, {1: 0.1})
    assert one.n == 1 and math.isnan(one.lo) and one.verdict == SAME  # no interval from 1 pair


def _recipe(space: Path, **kw) -> Recipe:
    return Recipe(space=load_space(space).to_dict(), overrides=["track.trackers=[]"], **kw)


def test_baseline_is_a_trial_the_sampler_and_pruner_never_see(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", fixed={"loss.use_ppc": True},
                        params={"ppc.tau": {"type": "categorical", "choices": [0.1, 0.2]}})
    url = default_url(tmp_path, "b")
    study = create("b", url, _recipe(space, sampler="grid", pruner="median",
                                     prune_startup_trials=1))
    assert study.metric_names == ["final CAM mIoU"]
    # A finished trial far above anything 4 steps reach: the median pruner prunes what it sees.
    study.add_trial(create_trial(
        params={"ppc.tau": 0.1}, distributions={"ppc.tau": CategoricalDistribution([0.1, 0.2])},
        value=0.99, intermediate_values={2: 0.99, 4: 0.99}))
    run_worker("b", url, str(tmp_path), target=3, progress=False)
    trials = study.get_trials()
    base = trials[0]
    assert base.user_attrs[ROLE] == BASELINE and base.params == {}
    # the pruner left it alone, and it trained CAM only into its own folder
    assert base.state == TrialState.COMPLETE and len(base.intermediate_values) == 2
    assert base.user_attrs["output_dir"] == str(tmp_path / "b" / BASELINE)
    config = json.loads((tmp_path / "b/baseline/seed_0/config.json").read_text())
    assert config["loss.use_ppc"] is False and config["train.steps"] == 4
    # the grid sampler gave the baseline no grid point: both points of the space were tried
    search = [t for t in trials[2:] if t.params]
    assert sorted(t.params["ppc.tau"] for t in search) == [0.1, 0.2]
    assert all(t.state == TrialState.PRUNED for t in search)
    assert best_trials(study)[0].number == 1  # the strong trial; never the baseline


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_confirm_killed_and_restarted_repeats_no_finished_run(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", fixed={"train.steps": 6, "data.eval_images": 32},
                        params={"ppc.tau": {"type": "float", "low": 0.05, "high": 0.5}})
    url = default_url(tmp_path, "c")
    create("c", url, _recipe(space, sampler="random", pruner="none"))
    run_worker("c", url, str(tmp_path), target=1, progress=False)  # the baseline and trial 1
    study, recipe = load("c", url)
    assert fresh_seeds(recipe, 2) == [1, 2] and top_trials(study, 5)[0].number == 1
    args = ("confirm", "--study", "c", "--root", str(tmp_path), "--top", "1", "--seeds", "2",
            "--heartbeat", "1", "--grace", "2")
    first = _cli(*args)
    done = tmp_path / "c/confirm/test/baseline/seed_1/metrics.json"
    ckpt = tmp_path / "c/confirm/test/trial-1/seed_1/checkpoints/step_00000002"
    deadline = time.monotonic() + 180
    while not ckpt.is_dir():  # the first run finished, the second is mid-way
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished_at = done.stat().st_mtime_ns
    time.sleep(3)  # past the grace period: the killed run is stale
    out, _ = _cli(*args).communicate(timeout=300)
    assert "verdict" in out, out[-3000:]
    cstudy = optuna.load_study(study_name=confirm_name("c"), storage=open_storage(url, None))
    keys = [(t.user_attrs["arm"], t.user_attrs["seed"], t.state) for t in cstudy.get_trials()]
    complete = sorted(k[:2] for k in keys if k[2] == TrialState.COMPLETE)
    assert complete == [("baseline", 1), ("baseline", 2), ("trial-1", 1), ("trial-1", 2)]
    assert [k[:2] for k in keys if k[2] == TrialState.FAIL] == [("trial-1", 1)]  # the killed one
    assert done.stat().st_mtime_ns == finished_at  # the finished run was not repeated
    assert "resumed from" in out
    run = tmp_path / "c/confirm/test/trial-1/seed_2"
    config = json.loads((run / "config.json").read_text())
    assert config["data.eval_split"] == "test" and config["train.seed"] == 2
    assert config["ppc.tau"] == study.trials[1].params["ppc.tau"]
    verdict = json.loads((tmp_path / "c/confirm/verdict.json").read_text())
    assert verdict["splits"] == {"selected_on": "val", "confirmed_on": "test"}
    arm = verdict["arms"]["trial-1"]
    assert arm["seeds"] == [1, 2] and arm["cam_diff"]["n"] == 2
    assert arm["cam_diff"]["verdict"] in (BETTER, SAME, WORSE)
    # a third call finds nothing to do
    out, _ = _cli(*args).communicate(timeout=120)
    assert "0 runs queued" in out and len(cstudy.get_trials()) == len(keys)


def test_confirm_refuses_the_split_the_sweep_selected_on(tmp_path: Path, capsys) -> None:
    from sweeps.cli import main

    space = write_space(tmp_path / "s.yaml")
    url = default_url(tmp_path, "v")
    create("v", url, _recipe(space))
    rc = main(["confirm", "--study", "v", "--root", str(tmp_path), "--eval-split", "val"])
    assert rc == 2 and "selected on" in capsys.readouterr().err
