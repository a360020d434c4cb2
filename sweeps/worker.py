"""A sweep worker's loop: ask a trial, train it under a heartbeat, tell the result; until the
study holds its target of finished trials.

Optuna's `study.optimize` is not used: it cannot stop a trial whose heartbeat lost the
database, and a failing `tell` there ends in `AssertionError: Should not reach.` with the trial
left RUNNING. Here:

- SIGTERM / SIGINT: the trial in flight finishes its step, saves a checkpoint (the training
  loop does that and raises `TrainingInterrupted`), is recorded FAIL with the reason and
  re-queued (its retry resumes from the checkpoint; it does not count toward the target), and
  the worker exits 143 / 130 with one line. A signal between trials stops before the next one;
  a second signal stops at once.
- A database outage: every storage call waits for the database (`sweeps.storage`); the
  heartbeat retries with back-off. If the database stays away for 3/4 of the grace period, the
  worker stops its trial the way SIGTERM does, before any other worker may call it stale and
  start a retry in the same folder; when the database returns it records and re-queues the trial
  and goes on (usually with that very retry).
- A full disk fails the trial with a reason that says so and stops the worker.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweeps.storage import StorageUnavailable, has_heartbeat, is_connection_error, requeue
from sweeps.study import is_search

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
EXIT_DISK_FULL = 1
EXIT_DATABASE = 1
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


class WorkerStop(BaseException):
    """A signal reached the worker outside the training loop (a BaseException, like
    KeyboardInterrupt: nothing may swallow it)."""

    def __init__(self, signal: str) -> None:
        super().__init__(signal)
        self.signal = signal


@dataclass
class TrialInterrupted(Exception):
    """The trial stopped early on purpose and can resume: `step` is its last checkpoint's
    (None: stopped before training began)."""

    signal: str
    step: int | None = None
    checkpoint: Path | None = None

    def __str__(self) -> str:
        at = "before training" if self.step is None else f"at step {self.step}"
        return f"interrupted by {self.signal} {at}"


@dataclass
class _Signals:
    """What the worker was asked: signals received, and whether one may interrupt now."""

    received: list[str] = field(default_factory=list)
    interruptible: bool = False
    stop_trial: Callable[[], None] | None = None  # how the heartbeat stops the trial in flight
    database_lost: bool = False


SIGNALS = _Signals()


@contextmanager
def interruptible(stop_trial: Callable[[], None]) -> Iterator[None]:
    """A signal raises WorkerStop in this block (training, a launched trial); elsewhere it waits
    for the current storage call to finish. `stop_trial` is what a lost heartbeat calls."""
    SIGNALS.interruptible, SIGNALS.stop_trial = True, stop_trial
    try:
        if SIGNALS.received:
            raise WorkerStop(SIGNALS.received[0])
        yield
    finally:
        SIGNALS.interruptible, SIGNALS.stop_trial = False, None


@contextmanager
def _handle_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(num: int, _frame) -> None:
        name = signal.Signals(num).name
        if SIGNALS.database_lost and name == "SIGTERM":  # the heartbeat's own, outside training
            if SIGNALS.interruptible:
                raise WorkerStop(name)
            return
        SIGNALS.received.append(name)
        if SIGNALS.interruptible or len(SIGNALS.received) > 1:
            raise WorkerStop(name)
        print(f"{name}: stopping after the database call in flight (again to stop now)",
              file=sys.stderr, flush=True)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    SIGNALS.received.clear()
    SIGNALS.database_lost = False
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Heartbeat:
    """A trial's heartbeat, in a thread: retries with back-off while the database is away, and
    stops the trial (SIGNALS.stop_trial) once it has been away for `stop_after` seconds, so
    the trial is checkpointed and still before another worker may fail it as stale (grace)."""

    def __init__(self, storage, trial_id: int, interval: float, grace: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop_after = 0.75 * grace
        self.lost_for = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        last_ok, wait, backoff, failing, stopped = time.monotonic(), 0.0, 0.0, False, False
        while not self._stop.wait(wait):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:
                away = time.monotonic() - last_ok
                if not failing:
                    what = "unreachable" if is_connection_error(err) else "failing"
                    print(f"heartbeat: database {what} ({type(err).__name__}); retrying; the "
                          f"trial stops if it stays away {self.stop_after:.0f} s",
                          file=sys.stderr, flush=True)
                failing = True
                stop_trial = SIGNALS.stop_trial
                if away >= self.stop_after and not stopped and stop_trial is not None:
                    stopped, self.lost_for = True, away
                    SIGNALS.database_lost = True
                    print(f"heartbeat: no database for {away:.0f} s: stopping the trial at its "
                          "next step (checkpoint kept)", file=sys.stderr, flush=True)
                    stop_trial()
                wait = backoff = min(max(2 * backoff, 0.5), self.interval)
                continue
            if failing:
                print("heartbeat: database reachable again", file=sys.stderr, flush=True)
            last_ok, wait, backoff, failing = time.monotonic(), self.interval, 0.0, False


def finished(study: optuna.Study) -> int:
    """Finished search trials (not the baseline), not counting failed ones that were re-queued
    (their retry counts)."""
    trials = [t for t in study.get_trials(deepcopy=False) if is_search(t)]
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    retried |= {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(t.state.name in FINISHED and not (t.state.name == "FAIL" and t.number in retried)
               for t in trials)


def disk_full(err: BaseException) -> str | None:
    """A short description if `err` (or its cause) is a full disk or a file-size limit."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return f"{os.strerror(e.errno)}" + (f": {e.filename}" if e.filename else "")
        text = str(e)
        # torch.save / safetensors and SQLite report a short write in their own words
        for marker in ("unexpected pos", "No space left", "database or disk is full",
                       "File too large", "Disk quota exceeded"):
            if marker in text:
                return text.splitlines()[0][:300]
        e = e.__cause__ or e.__context__
    return None


class Stop(Exception):
    """The worker stops: `line` says why and what to do, `code` is the exit status."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(line)
        self.code, self.line = code, line


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], object], target: int,
               timeout: float | None = None,
               deadline: float | Callable[[], float] | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               retries: int | None = None) -> int:
    """Run trials until the study holds `target` finished ones; returns the exit status.

    `timeout`: seconds after which no new trial starts. `deadline` (time.monotonic, or a
    function returning it): no new trial that the longest one so far says would overrun it.
    """
    storage = study._storage
    beat = has_heartbeat(storage)
    start, longest = time.monotonic(), 0.0
    # Samplers call study.stop() (the grid sampler, when its grid is done): allowed only inside
    # Optuna's optimize loop, which this loop stands in for.
    study._thread_local.in_optimize_loop = True
    study._stop_flag = False
    with _handle_signals():
        try:
            while not study._stop_flag:
                if SIGNALS.received:
                    sig = SIGNALS.received[0]
                    raise Stop(EXIT_CODES[sig], f"stopped by {sig} between trials; run the same "
                                                "command to continue the sweep")
                if finished(study) >= target:
                    return 0
                now = time.monotonic()
                if timeout is not None and now - start >= timeout:
                    return 0
                if deadline is not None and now + longest > (
                        deadline() if callable(deadline) else deadline):
                    return 0
                with warnings.catch_warnings():  # "experimental"; "heartbeat without optimize"
                    warnings.simplefilter("ignore")
                    if beat:
                        optuna.storages.fail_stale_trials(study)  # re-queued by sweeps.storage
                    trial = study.ask()
                tic = time.monotonic()
                _one_trial(study, trial, objective, beat, retries)
                longest = max(longest, time.monotonic() - tic)
                if on_trial is not None:
                    on_trial(study, study._storage.get_trial(trial._trial_id))
        except Stop as stop:
            print(stop.line, file=sys.stderr, flush=True)
            return stop.code
        except StorageUnavailable as err:
            print(f"{err}; stopping. Run the same command when the database is back: interrupted "
                  "trials resume from their checkpoints", file=sys.stderr, flush=True)
            return EXIT_DATABASE
        finally:
            study._thread_local.in_optimize_loop = False
    return 0


def _one_trial(study: optuna.Study, trial: optuna.Trial, objective, beat: bool,
               retries: int | None) -> None:
    storage = study._storage
    grace = getattr(storage, "_backend", storage).grace_period  # Optuna wraps it in a cache
    heartbeat = Heartbeat(storage, trial._trial_id, storage.get_heartbeat_interval(),
                          grace) if beat else None
    state, value, reason, err = TrialState.FAIL, None, None, None
    stop: Stop | None = None
    interrupted: TrialInterrupted | None = None
    SIGNALS.database_lost = False
    try:
        if heartbeat:
            heartbeat.__enter__()
        try:
            value, state = objective(trial), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except WorkerStop as e:  # signalled outside the training loop: nothing new to save
            interrupted = TrialInterrupted(e.signal)
        except TrialInterrupted as e:
            interrupted = e
        except StorageUnavailable:
            raise
        except Exception as e:  # recorded below; the sweep goes on
            err = e
            reason = trial.user_attrs.get("fail_reason") or f"{type(e).__name__}: {e}"[:2000]
    finally:
        if heartbeat:
            heartbeat.__exit__()
    if interrupted is not None:
        if SIGNALS.database_lost and not SIGNALS.received:
            reason = (f"stopped {_at(interrupted)}: no database for {heartbeat.lost_for:.0f} s "
                      "(heartbeat); re-queued, the retry resumes from the checkpoint")
        else:
            sig = interrupted.signal
            reason = (f"interrupted by {sig} {_at(interrupted)}; re-queued, the next "
                      "`ppc-sweep run` resumes it from the checkpoint")
            stop = Stop(EXIT_CODES.get(sig, 143), (
                f"stopped by {sig}: trial {trial.number} saved {_at(interrupted)} and re-queued; "
                "run the same command to resume it"))
    elif err is not None and (full := disk_full(err)):
        reason = f"disk full ({full}); free space and run again: the trial resumes"
        stop = Stop(EXIT_DISK_FULL, f"disk full: trial {trial.number} failed ({full}). Free "
                                    "space, then run the same command: the trial resumes from "
                                    "its last checkpoint")
    _tell(study, trial, state, value, reason, requeue_it=interrupted is not None or stop is not None,
          retries=retries, stop=stop)
    if stop is not None:
        raise stop


def _at(e: TrialInterrupted) -> str:
    return "before training" if e.step is None else f"at step {e.step}"


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, value, reason: str | None,
          requeue_it: bool, retries: int | None, stop: Stop | None) -> None:
    try:
        if reason:
            trial.set_user_attr("fail_reason", reason)
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        _already_failed(trial)
        return
    except ValueError as err:
        if "Cannot tell" not in str(err):
            raise
        _already_failed(trial)
        return
    except StorageUnavailable:
        raise
    except Exception as err:  # the study itself cannot be written (a full disk under SQLite)
        full = disk_full(err)
        what = f"disk full ({full})" if full else f"{type(err).__name__}: {err}"
        line = (f"cannot record trial {trial.number} in the study: {what}. It stays RUNNING until "
                "its heartbeat expires; fix that, then run the same command: it resumes")
        raise Stop(stop.code if stop else EXIT_DISK_FULL, (stop.line + "\n" if stop else "") + line
                   ) from None
    if state == TrialState.COMPLETE:
        print(f"trial {trial.number} finished: value {value}", file=sys.stderr, flush=True)
    elif state == TrialState.FAIL:
        print(f"trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
    if requeue_it:
        requeue(study, study._storage.get_trial(trial._trial_id), retries, crashed=False)


def _already_failed(trial: optuna.Trial) -> None:
    print(f"trial {trial.number}: another worker failed it as stale while the database was "
          "away and queued its retry, which resumes from the checkpoint", file=sys.stderr,
          flush=True)
