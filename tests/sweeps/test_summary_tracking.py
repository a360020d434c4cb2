"""The report's W&B summary run: the trials' project (`track.project` of the study's
overrides), and its files inside the report folder, not in $HOME."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from sweeps.space import load_space
from sweeps.storage import default_url
from sweeps.study import Recipe, create
from sweeps.tracking import log_study_summary, study_project
from tests.experiments.test_tracking import wandb_records


def _study(tmp_path: Path, overrides: list[str]) -> optuna.Study:
    recipe = Recipe(space=load_space("demo").to_dict(), overrides=overrides)
    study = create("s", default_url(tmp_path, "s"), recipe)
    for i, tau in enumerate((0.1, 0.2, 0.3)):
        study.add_trial(create_trial(params={"ppc.tau": tau}, value=0.1 * i,
                                     distributions={"ppc.tau": FloatDistribution(0.03, 0.5)}))
    return study


def test_project_comes_from_the_study_overrides(tmp_path: Path) -> None:
    assert study_project(_study(tmp_path / "a", ["train.steps=4"])) == "ppc"
    assert study_project(_study(tmp_path / "b", ["track.project=mine", "train.steps=4"])) == "mine"


def test_summary_run_logs_to_the_trials_project_inside_the_report(tmp_path: Path,
                                                                   monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    study = _study(tmp_path, ["track.project=mine"])
    run_dir = log_study_summary(study, tmp_path / "report")
    assert run_dir.is_relative_to(tmp_path / "report" / "wandb")
    (run_file,) = run_dir.glob("run-*.wandb")
    (run,) = list(wandb_records(run_file, "run"))
    assert run.project == "mine" and run.run_group == "s"
    assert "WANDB_DATA_DIR" not in os.environ
    assert not [p for p in home.rglob("*") if "artifacts" in p.parts]
