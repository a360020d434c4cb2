"""The reporter of a trial that runs as its own (possibly multi-process) program.

`ppc-sweep run --launcher torchrun` starts `sweeps.trial_main` with the trial's storage, study and
number; it calls `make_reporter` on every rank, but the training loop calls the
reporter on the main process only and broadcasts the decision, so the study is opened lazily
on the first call (rank 0) and never from the other ranks.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

import optuna

from sweeps.storage import (
    StorageUnavailable,
    is_connection_error,
    open_storage,
    without_waiting,
)

METRIC = "cam_miou"
# Set by the sweep's subprocess launcher: trials of several seeds report seed i's steps shifted by
# i x train.steps, so one trial's intermediate values never collide.
STEP_OFFSET_ENV = "PPC_SWEEP_STEP_OFFSET"


def make_reporter(storage: str, study: str, number: int, step_offset: int | None = None,
                  ) -> Callable[[int, dict[str, float]], bool]:
    """`(step, metrics) -> stop?`: reports `metrics["cam_miou"]` to trial `number` of `study`.

    `step_offset` shifts reported steps (one trial trains several seeds one after another).
    The sweep worker that launched this program owns the trial (and its heartbeat); this only
    adds intermediate values and asks the study's pruner.
    """
    if step_offset is None:
        step_offset = int(os.environ.get(STEP_OFFSET_ENV, "0"))
    state: dict = {}

    def trial() -> optuna.Trial | None:
        if "trial" not in state:
            s = optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat=None))
            # The sweep recipe names the pruner; without it (a hand-made study) keep Optuna's default.
            from sweeps.study import Recipe, make_pruner

            recipe = s.user_attrs.get("ppc_sweep")
            if recipe:
                s.pruner = make_pruner(Recipe(**recipe))
            trial_id = s._storage.get_trial_id_from_study_id_trial_number(s._study_id, number)
            state["trial"] = None if len(s.directions) > 1 else optuna.Trial(s, trial_id)
        return state["trial"]

    return report_to(trial, step_offset)


def report_to(get_trial: Callable[[], optuna.Trial | None], step_offset: int = 0,
              ) -> Callable[[int, dict[str, float]], bool]:
    """The engine's reporter: `metrics["cam_miou"]` -> the trial `get_trial()` returns (None for
    a multi-objective study, which cannot prune), then the pruner's verdict."""

    def report(step: int, metrics: dict[str, float]) -> bool:
        # Training never waits for the database: in an outage this report is skipped (pruning
        # sees a gap) and the worker's heartbeat decides whether the trial must stop.
        try:
            with without_waiting():
                t = get_trial()
                value = float(metrics.get(METRIC, math.nan))
                if t is None or not math.isfinite(value):
                    return False
                t.report(value, step + step_offset)
                return t.should_prune()
        except Exception as err:
            if not isinstance(err, StorageUnavailable) and not is_connection_error(err):
                raise
            print(f"step {step}: not reported to the study (database unreachable); training "
                  "goes on", file=sys.stderr, flush=True)
            return False

    return report
