"""W&B for sweeps. Each trial is its own W&B run, started by the training engine (Accelerate's
tracker) with `track.group=<study>` and `track.run_name=trial-<n>-seed-<s>`; its config holds the
sampled values under their dotted names and `trial.number`. This module adds one study-level
summary run to the same group: best value and parameters, importances, the trial table and the
report's plots. Offline unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from sweeps.report import best_trials, importances, trial_rows


def log_study_summary(study: optuna.Study, report_dir: str | Path, project: str = "ppc",
                      ) -> Path | None:
    """Log the study summary run into `report_dir/wandb`; returns the run's directory."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    report_dir = Path(report_dir)
    best = best_trials(study)
    imps, _ = importances(study)
    config = {"study": study.study_name, "directions": [d.name for d in study.directions],
              **study.user_attrs}
    run = wandb.init(project=project, group=study.study_name, name=f"{study.study_name}-summary",
                     job_type="sweep-summary", dir=str(report_dir), config=config,
                     tags=["sweep-summary"], reinit="finish_previous")
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
