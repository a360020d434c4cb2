"""Storage URL -> Optuna storage, with the settings that make shared studies safe.

- `sqlite:///path/study.db`: one machine, a few workers. A busy timeout, because SQLite locks
  the whole file per write and concurrent workers otherwise fail with "database is locked".
- `postgresql://user@host:port/db` (psycopg 3): many workers or several machines.
- `journal:///path/study.log` (or a path ending in `.log`): a file that workers append to;
  works on network file systems without a database server, but has no heartbeat (below).

RDB storages (SQLite, PostgreSQL) get a heartbeat: a worker killed mid-trial stops beating, and
after `grace` seconds the next worker to start a trial marks it FAIL and re-queues its parameters
(RetryHeartbeatStaleTrialCallback); the retry resumes from the killed trial's checkpoints.
Journal storage cannot do that: a killed worker leaves its trial RUNNING until
`ppc-sweep status --fail-stale SECONDS` (`fail_stale`) fails and re-queues it.
"""

from __future__ import annotations

import datetime
import importlib.util
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

DEFAULT_HEARTBEAT_S = 30
DEFAULT_RETRIES = 2
SQLITE_TIMEOUT_S = 60


def default_url(root: str | Path, study: str) -> str:
    return f"sqlite:///{Path(root, study, 'study.db').resolve()}"


def kind(url: str) -> str:
    """'sqlite', 'postgresql' or 'journal'; a clear error for anything else."""
    if url.startswith("sqlite:///"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        return "postgresql"
    if url.startswith("journal://") or url.endswith((".log", ".jsonl")):
        return "journal"
    raise ValueError(f"--storage {url!r}: use sqlite:///PATH, postgresql://USER@HOST:PORT/DB, "
                     "or journal:///PATH (a .log file)")


def _journal_path(url: str) -> Path:
    return Path(url[len("journal://"):] if url.startswith("journal://") else url)


def _postgres_url(url: str) -> str:
    # SQLAlchemy's bare postgresql:// means psycopg2; this project ships psycopg 3.
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        return f"postgresql+psycopg://{rest}"
    return url


def open_storage(url: str, heartbeat: int | None = DEFAULT_HEARTBEAT_S, grace: int | None = None,
                 retries: int | None = DEFAULT_RETRIES) -> optuna.storages.BaseStorage:
    """Open `url`. `heartbeat` seconds between beats (None: off); stale after `grace` seconds
    (default 2 x heartbeat); a stale trial is re-queued at most `retries` times."""
    k = kind(url)
    if k == "journal":
        path = _journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    beat = {}
    if heartbeat:
        beat = {"heartbeat_interval": heartbeat, "grace_period": grace or 2 * heartbeat,
                "heartbeat_stale_trial_callback": _retry_callback(retries)}
    if k == "sqlite":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
            raise ValueError(f"--storage {url!r} needs psycopg: pip install 'ppc-sweeps[postgres]'")
        url = _postgres_url(url)
        engine = {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeat and retry callback are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine, **beat)


def _retry_callback(retries: int | None) -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=retries)


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    return is_heartbeat_enabled(storage)


def retried_from(system_attrs: dict) -> int | None:
    """The number of the first trial in a retry chain (None for an original trial)."""
    return system_attrs.get("failed_trial")


def fail_stale(study: optuna.Study, older_than_s: float, retries: int | None = DEFAULT_RETRIES,
               ) -> list[int]:
    """Fail RUNNING trials started more than `older_than_s` ago and re-queue their parameters.

    For storages without a heartbeat (journal): the caller asserts no live worker runs them.
    Returns the failed trial numbers.
    """
    now = datetime.datetime.now()
    failed = []
    callback = _retry_callback(retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start and (now - t.datetime_start).total_seconds() > older_than_s:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                                   f"stale: running > {older_than_s:.0f} s")
                if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # it finished meanwhile
                continue
            callback(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed
