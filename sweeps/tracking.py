"""W&B for sweeps. Each trial is its own W&B run, started by the training engine (Accelerate's
tracker) with `track.group=<study>` and `track.run_name=trial-<n>-seed-<s>`; its config holds the
sampled values under their dotted names and `trial.number`. This module adds one study-level
summary run to the same group: best value and parameters, importances, the trial table and the
report's plots. Its W&B project is the trials' (`track.project` of the study's overrides) and
its mode is chosen as the trials' is (`experiments.tracking.wandb_mode`).
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from experiments.config import TrackConfig
from experiments.tracking import announce_wandb_mode, wandb_mode
from sweeps.report import best_trials, importances, trial_rows
from sweeps.study import _RECIPE_KEY


def study_project(study: optuna.Study) -> str:
    """The W&B project the study's trials log to: the last `track.project=` among the study's
    stored overrides, else the training default."""
    project = TrackConfig().project
    for override in study.user_attrs.get(_RECIPE_KEY, {}).get("overrides", []):
        key, _, value = override.lstrip("+").partition("=")
        if key == "track.project" and value:
            project = value.strip("'\"")
    return project


def log_study_summary(study: optuna.Study, report_dir: str | Path, project: str | None = None,
                      ) -> Path | None:
    """Log the study summary run into `report_dir/wandb` (project: `study_project` unless
    given); returns the run's directory."""
    import wandb

    report_dir = Path(report_dir)
    project = project or study_project(study)
    announce_wandb_mode(report_dir / "wandb")
    best = best_trials(study)
    imps, _ = importances(study)
    config = {"study": study.study_name, "directions": [d.name for d in study.directions],
              **study.user_attrs}
    # W&B stages the trial table's files in WANDB_DATA_DIR ($HOME by default): keep them in
    # the report folder, which is what gets copied and synced.
    data_dir = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = data_dir or str((report_dir / "wandb" / "data").resolve())
    run = wandb.init(project=project, group=study.study_name, name=f"{study.study_name}-summary",
                     job_type="sweep-summary", dir=str(report_dir), config=config,
                     tags=["sweep-summary"], reinit="finish_previous", mode=wandb_mode()[0])
    try:
        if best:
            run.summary["best/trial"] = best[0].number
            for i, v in enumerate(best[0].values):
                run.summary[f"best/value_{i}"] = v
            run.summary.update({f"best/{k}": v for k, v in best[0].params.items()})
        run.summary.update({f"importance/{k}": v for k, v in imps.items()})
        header, rows = trial_rows(study)
        images = {f"report/{p.stem}": wandb.Image(str(p)) for p in sorted(report_dir.glob("*.png"))}
        run.log({"trials": wandb.Table(columns=header, data=rows), **images})
        return Path(run.dir).parent
    finally:
        run.finish()
        if data_dir is None:
            os.environ.pop("WANDB_DATA_DIR", None)
