"""Trial -> Hydra overrides -> validated RunConfig -> training on n seeds -> objective value.

The objective is the **final** CAM mIoU (the last evaluation), averaged over seeds: the model a
sweep hands over is the one at the end of training, and the best-over-evaluations value would
select on the evaluation split twice. The best-over-evaluations mean, the per-seed values and
their spread are kept as user attributes.

Each trial writes to `<root>/<study>/trial_<number>/seed_<seed>/`; the study's baseline trial
(user attribute `role: baseline`: CAM only, the fixed overrides, the study's seeds) to
`<root>/<study>/baseline/seed_<seed>/`. A trial re-queued after its worker died (heartbeat)
reuses the original trial's directory, so training resumes from its last checkpoint. Seeds run one after another; seed i reports its evaluation steps shifted by
i x train.steps, so the pruner sees one increasing curve per trial.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna

from experiments.config import RunConfig, compose_config
from ppc_core.checkpoint import latest_checkpoint
from ppc_core.train import TrainingInterrupted
from sweeps.space import format_value
from sweeps.storage import retried_from
from sweeps.study import BASELINE, METRIC, ROLE, Recipe
from sweeps.trial_main import EXIT_INTERRUPTED, INTERRUPTED_FILE
from sweeps.trial_reporter import STEP_OFFSET_ENV, report_to
from sweeps.worker import TrialInterrupted, WorkerStop, interruptible

LAUNCHERS = ("inprocess", "torchrun", "accelerate")


@dataclass
class TrialRunner:
    """The objective function of one sweep worker."""

    study_name: str
    storage_url: str
    root: Path
    recipe: Recipe
    launcher: str = "inprocess"
    num_processes: int = 1
    group: str = ""  # W&B group and artifact store: the sweep's study (default study_name)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {list(LAUNCHERS)}, got {self.launcher!r}")
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.launcher == "inprocess" and self.num_processes != 1:
            raise ValueError("--launcher inprocess runs one process; use torchrun or accelerate "
                             "for --num-processes > 1")
        self.space = self.recipe.parsed_space()
        self.multi = self.recipe.multi_objective
        if self.launcher == "inprocess":  # heavy (accelerate, data): import once, outside timings
            from experiments.train import run

            self._train = run

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            with _folder_lock(self.trial_dir(trial)):
                return self._run(trial)
        except (optuna.TrialPruned, TrialInterrupted):  # the worker records these
            raise
        except Exception as err:  # recorded, then the worker marks the trial FAIL
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:2000])
            raise

    def trial_dir(self, trial: optuna.Trial) -> Path:
        if trial.user_attrs.get(ROLE) == BASELINE:
            return self.root / self.study_name / BASELINE
        attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
        origin = retried_from(attrs)
        return self.root / self.study_name / f"trial_{trial.number if origin is None else origin}"

    def baseline_arm(self) -> list[str]:
        """The control arm's overrides: CAM only, with the space's fixed values (PPC's inert)."""
        fixed = {**self.space.fixed, "loss.use_ppc": False}
        return [f"{k}={format_value(v)}" for k, v in fixed.items()]

    def arm(self, trial: optuna.Trial) -> tuple[list[str], str, list[str]]:
        """(Hydra overrides, W&B run-name prefix, W&B tags) of the trial's arm."""
        if trial.user_attrs.get(ROLE) == BASELINE:
            return self.baseline_arm(), BASELINE, ["sweep", BASELINE]
        sampled = self.space.sample(trial)
        return (self.space.overrides(sampled), f"trial-{trial.number}",
                ["sweep", f"trial-{trial.number}"])

    def _run(self, trial: optuna.Trial) -> float | tuple[float, float]:
        arm, name, tags = self.arm(trial)
        out = self.trial_dir(trial)
        trial.set_user_attr("output_dir", str(out))
        seeds = [self.recipe.base_seed + i for i in range(self.recipe.seeds)]
        result = self.train_seeds(trial, arm, seeds, out, name, tags)
        return (result, statistics.fmean(trial.user_attrs["seconds_per_seed"])) if self.multi \
            else result

    def train_seeds(self, trial: optuna.Trial, arm: list[str], seeds: list[int], out: Path,
                    name: str, tags: list[str], extra: tuple[str, ...] = ()) -> float:
        """Train `arm` on each seed into `out/seed_<s>`; records per-seed results on the trial
        and returns the mean final CAM mIoU (pruned: raises optuna.TrialPruned)."""
        finals, bests, pseudo, seconds, dirs, wandb_runs = [], [], [], [], [], []
        for i, seed in enumerate(seeds):
            run_dir = out / f"seed_{seed}"
            overrides = [
                *self.recipe.overrides, *arm, *extra,
                f"train.seed={seed}", f"train.output_dir={format_value(str(run_dir))}",
                f"track.group={format_value(self.group or self.study_name)}",
                f"track.run_name={name}-seed-{seed}",
                f"track.tags=[{','.join(tags)}]",
            ]
            cfg = compose_config(self.recipe.preset, overrides)
            offset = i * cfg.train.steps
            tic = time.perf_counter()
            if self.launcher == "inprocess":
                metrics = self._inprocess(cfg, trial, offset)
            else:
                metrics = self._subprocess(overrides, run_dir, trial, offset)
            seconds.append(time.perf_counter() - tic)
            trial.set_user_attr("train_seconds", sum(seconds))
            trial.set_user_attr("seconds_per_seed", seconds)
            if (run := wandb_run(run_dir, cfg.track.project)) is not None:
                wandb_runs.append(run)
                trial.set_user_attr("wandb_runs", wandb_runs)
            # A stop decided at the last evaluation saved nothing: the run is complete.
            if metrics.get("stopped_early") and metrics.get("step", 0) < cfg.train.steps:
                raise optuna.TrialPruned(f"pruned at step {metrics.get('step')} of seed {seed}")
            finals.append(float(metrics[METRIC]))
            bests.append(float(metrics.get("best_cam_miou", math.nan)))
            pseudo.append(float(metrics.get("pseudo_miou", math.nan)))
            dirs.append(run_dir)
        value = statistics.fmean(finals)
        best_run = dirs[max(range(len(finals)), key=lambda k: finals[k])]
        ckpt = latest_checkpoint(best_run)
        for key, v in {
            "seeds": seeds, "cam_miou_per_seed": finals, "cam_miou_std": statistics.pstdev(finals),
            "pseudo_miou_per_seed": pseudo,
            "best_cam_miou_mean": statistics.fmean(bests), "best_run_dir": str(best_run),
            "checkpoint_dir": str(ckpt) if ckpt else "",
        }.items():
            trial.set_user_attr(key, v)
        self._upload_overlays(trial, best_run / "overlays.png", cfg.data.name)
        if not math.isfinite(value):
            raise FloatingPointError(f"{METRIC} is not finite: {finals}")
        return value

    def _upload_overlays(self, trial: optuna.Trial, png: Path, data: str) -> None:
        # An Optuna artifact, so optuna-dashboard shows the trial's overlays on its page.
        if not png.is_file():
            return
        import numpy as np
        from optuna.artifacts import upload_artifact
        from PIL import Image

        from ppc_core.data import dataset_info
        from ppc_core.viz import overlay_figure

        png = overlay_figure(np.asarray(Image.open(png).convert("RGB")),
                             dataset_info(data).class_names, png.with_name("overlays_legend.png"))
        trial.set_user_attr("overlay_artifact", upload_artifact(
            artifact_store=artifact_store(self.root, self.group or self.study_name),
            file_path=str(png),
            study_or_trial=trial, mimetype="image/png"))

    # ------------------------------------------------------------------ launchers

    def _reporter(self, trial: optuna.Trial, offset: int):
        return report_to(lambda: None if self.multi else trial, offset)

    def _inprocess(self, cfg: RunConfig, trial: optuna.Trial, offset: int) -> dict:
        # A lost heartbeat stops the trial the way `docker stop` would: SIGTERM to this process
        # (the training loop checkpoints and raises TrainingInterrupted).
        with interruptible(lambda: os.kill(os.getpid(), signal.SIGTERM)):
            try:
                return self._train(cfg, self._reporter(trial, offset))
            except TrainingInterrupted as err:
                raise TrialInterrupted(err.signal, err.step, err.checkpoint) from None

    def command(self, overrides: list[str], number: int) -> list[str]:
        n = str(self.num_processes)
        if self.launcher == "torchrun":
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", n]
        else:
            head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", n, "--main_process_port", str(_free_port())]
        return [*head, "-m", "sweeps.trial_main", "--storage", self.storage_url,
                "--study", self.study_name, "--number", str(number),
                "--preset", self.recipe.preset, "--", *overrides]

    def _subprocess(self, overrides: list[str], run_dir: Path, trial: optuna.Trial,
                    offset: int) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").unlink(missing_ok=True)
        marker = run_dir / INTERRUPTED_FILE
        marker.unlink(missing_ok=True)
        env = {**os.environ, STEP_OFFSET_ENV: str(offset), "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # one thread per CPU rank, or ranks fight
        log = run_dir / "launcher.log"
        with open(log, "ab") as sink:
            # Its own process group: a terminal's Ctrl-C reaches the worker only, which forwards
            # it once (ranks that got it twice, from the terminal and the launcher, could not
            # tell a second Ctrl-C from the first).
            proc = subprocess.Popen(self.command(overrides, trial.number), stdout=sink,
                                    stderr=subprocess.STDOUT, env=env, process_group=0,
                                    preexec_fn=_die_with_parent)
            try:
                with interruptible(lambda: proc.send_signal(signal.SIGTERM)):
                    rc = proc.wait()
            except WorkerStop as stop:  # forward: the launcher passes it on, ranks checkpoint
                proc.send_signal(signal.Signals[stop.signal])
                try:
                    rc = proc.wait()
                except BaseException:  # a second signal: stop now
                    _kill_group(proc)
                    raise
            except BaseException:  # an error here: never leave ranks behind
                _kill_group(proc)
                raise
        if marker.is_file() or rc == EXIT_INTERRUPTED:
            info = json.loads(marker.read_text()) if marker.is_file() else {}
            ckpt = latest_checkpoint(run_dir)
            raise TrialInterrupted(info.get("signal", "SIGTERM"), info.get("step"),
                                   Path(info["checkpoint"]) if "checkpoint" in info else ckpt)
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{self.launcher} exited with {rc}; end of {log}:\n"
                               + "\n".join(tail))
        return json.loads((run_dir / "metrics.json").read_text())


def artifact_store(root: str | Path, study: str):
    """The study's Optuna artifact store: `<root>/<study>/artifacts` (optuna-dashboard reads it
    with `ppc-sweep dashboard`)."""
    from optuna.artifacts import FileSystemArtifactStore

    path = Path(root, study, "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def wandb_run(run_dir: Path, project: str) -> str | None:
    """`project/run_id` of the W&B run that last wrote into `run_dir` (None: no W&B run).

    Read from the run folder (`wandb/latest-run` -> `[offline-]run-<time>-<id>`), so the recipe
    need not hand the id back."""
    latest = Path(run_dir, "wandb", "latest-run")
    if not latest.exists():
        return None
    return f"{project}/{latest.resolve().name.rsplit('-', 1)[-1]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the trial folder: two workers must never train one trial (a retry and a trial still
    running). The heartbeat prevents that; this lock makes a breach an error, not a mix-up."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{folder} is in use by another worker (two workers on one "
                               "trial: a heartbeat grace period shorter than a stop takes?)"
                               ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _die_with_parent() -> None:
    # A SIGKILLed sweep worker must not leave its training ranks running (Linux only).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
