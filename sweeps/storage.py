"""Storage URL -> Optuna storage, with the settings that make shared studies safe.

- `sqlite:///path/study.db`: one machine, a few workers. A busy timeout, because SQLite locks
  the whole file per write and concurrent workers otherwise fail with "database is locked".
- `postgresql://user@host:port/db` (psycopg 3): many workers or several machines.
- `journal:///path/study.log` (or a path ending in `.log`): a file that workers append to;
  works on network file systems without a database server, but has no heartbeat (below).

RDB storages (SQLite, PostgreSQL) get a heartbeat: a worker killed mid-trial stops beating, and
after `grace` seconds the next worker to start a trial marks it FAIL (with a `fail_reason`) and
re-queues its parameters (`requeue`, Optuna's RetryHeartbeatStaleTrialCallback without carrying
the failure over to the retry); the retry resumes from the killed trial's checkpoints.
Journal storage cannot do that: a killed worker leaves its trial RUNNING until
`ppc-sweep status --fail-stale SECONDS` (`fail_stale`) fails and re-queues it.

PostgreSQL outages: connections time out (connect, statement) instead of hanging, and every
storage call of a worker waits for the database (with back-off, up to `wait_s`) instead of
failing; what a worker does meanwhile with its running trial is `sweeps.worker`'s business.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import inspect
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

DEFAULT_HEARTBEAT_S = 30
DEFAULT_RETRIES = 2
SQLITE_TIMEOUT_S = 60
# A port that accepts TCP but never answers must not hang a command: libpq's connect timeout
# covers the whole start-up; a statement that waits longer than this on a lock or a dead
# server is cancelled (and retried like a lost connection).
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_S = 60
DEFAULT_DB_WAIT_S = 300


class StorageUnavailable(RuntimeError):
    """The database did not answer for the whole wait; the message says what to do."""


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


def _file_path(url: str) -> Path | None:
    """The file a SQLite or journal URL names (None for a database server)."""
    k = kind(url)
    return Path(url[len("sqlite:///"):]) if k == "sqlite" else \
        _journal_path(url) if k == "journal" else None


def storage_exists(url: str) -> bool:
    """False where a file storage was never created (a server database: always True)."""
    path = _file_path(url)
    return path is None or path.is_file()


def _postgres_url(url: str) -> str:
    # SQLAlchemy's bare postgresql:// means psycopg2; this project ships psycopg 3.
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        return f"postgresql+psycopg://{rest}"
    return url


def is_connection_error(err: BaseException) -> bool:
    """A lost or refused database connection (or a timed-out statement), anywhere in the chain
    (Optuna wraps SQLAlchemy errors in StorageInternalError)."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in (
                "OperationalError", "InterfaceError", "QueryCanceled", "ConnectionTimeout"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(err: BaseException) -> str:
    e: BaseException = err
    while e.__cause__ is not None:  # the driver's own words, not the wrapper's
        e = e.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _safe(url: str) -> str:
    """The URL without its password."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}@{host}"


_waiting = threading.local()


@contextmanager
def without_waiting() -> Iterator[None]:
    """Storage calls of this thread fail at once in an outage (a trial's reports: training must
    not stall on the database; a lost intermediate value only weakens pruning)."""
    _waiting.off = True
    try:
        yield
    finally:
        _waiting.off = False


class SweepStorage(RDBStorage):
    """Optuna's RDBStorage, plus: calls wait out a database outage (`wait_s`, with back-off),
    and a trial failed for a stale heartbeat gets a `fail_reason`."""

    def __init__(self, url: str, wait_s: float = 0, **kwargs) -> None:
        self.wait_s = wait_s
        super().__init__(url, **kwargs)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        for trial_id in stale:
            try:  # while still RUNNING: a finished trial's attributes are read-only
                self.set_trial_user_attr(trial_id, "fail_reason", (
                    f"stale: no heartbeat for {self.grace_period} s (its worker was killed or "
                    "lost the database); re-queued, the retry resumes from its checkpoint"))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        return stale


def _waits(method):
    @functools.wraps(method)
    def call(self: SweepStorage, *args, **kwargs):
        start, delay, warned = time.monotonic(), 0.5, False
        while True:
            try:
                result = method(self, *args, **kwargs)
                if warned:
                    print("database reachable again", file=sys.stderr, flush=True)
                return result
            except Exception as err:
                if not (self.wait_s > 0 and is_connection_error(err)):
                    raise
                waited = time.monotonic() - start
                if getattr(_waiting, "off", False) or waited >= self.wait_s:
                    raise StorageUnavailable(
                        f"database {_safe(self.url)} unreachable for {waited:.0f} s "
                        f"({_first_line(err)})") from None
                if not warned:
                    print(f"database unreachable ({_first_line(err)}); waiting up to "
                          f"{self.wait_s:.0f} s for it", file=sys.stderr, flush=True)
                    warned = True
                time.sleep(min(delay, self.wait_s - waited))
                delay = min(2 * delay, 5.0)
    return call


# Every storage call a worker makes waits; the heartbeat has its own loop (sweeps.worker).
for _name, _method in inspect.getmembers(RDBStorage, inspect.isfunction):
    if (_name in vars(BaseStorage) and not _name.startswith("__")) or _name == "_get_stale_trial_ids":
        setattr(SweepStorage, _name, _waits(getattr(SweepStorage, _name)))


def open_storage(url: str, heartbeat: int | None = DEFAULT_HEARTBEAT_S, grace: int | None = None,
                 retries: int | None = DEFAULT_RETRIES, *, readonly: bool = False,
                 wait_s: float = 0) -> optuna.storages.BaseStorage:
    """Open `url`. `heartbeat` seconds between beats (None: off); stale after `grace` seconds
    (default 2 x heartbeat); a stale trial is re-queued at most `retries` times.

    `readonly`: never create anything (a missing file storage is a ValueError). `wait_s`: on
    PostgreSQL, how long each call waits out an outage. Errors that a user must fix (a bad
    URL, an unreachable server, an unwritable path) are ValueErrors of one line.
    """
    k = kind(url)
    path, given = _file_path(url), _safe(url)
    if readonly and not storage_exists(url):
        raise ValueError(f"no storage at {path}")
    if path is not None and not readonly:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--storage {url}: cannot create the folder {path.parent} "
                             f"({err.strerror}); pick a writable path") from None
    if k == "journal":
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise ValueError(f"--storage {url}: cannot write {path} ({err.strerror}); "
                             "pick a writable path") from None
    beat = {}
    if heartbeat:
        grace = grace or 2 * heartbeat
        beat = {"heartbeat_interval": heartbeat, "grace_period": grace,
                "heartbeat_stale_trial_callback": functools.partial(requeue, retries=retries)}
    if k == "sqlite":
        engine: dict = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        wait_s = 0  # a local file has no outage; its errors (full disk) must surface
    else:
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
            raise ValueError(f"--storage {url!r} needs psycopg: pip install 'ppc-sweeps[postgres]'")
        url = _postgres_url(url)
        # A server that vanishes mid-query (a network partition: no RST) is detected by TCP
        # keepalives and the user timeout, not by the statement timeout (server side).
        engine = {"pool_pre_ping": True, "connect_args": {
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={PG_STATEMENT_TIMEOUT_S * 1000}",
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "tcp_user_timeout": PG_STATEMENT_TIMEOUT_S * 1000}}
    try:
        with warnings.catch_warnings():  # heartbeat and retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SweepStorage(url, wait_s=wait_s, engine_kwargs=engine,
                                skip_table_creation=readonly, **beat)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:  # e.g. a port that is no number
        raise ValueError(f"--storage {given}: not a valid database URL ({err})") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        if k == "sqlite":
            raise ValueError(f"--storage {url}: cannot open {path} ({_first_line(err)}); "
                             "pick a writable path on a disk with free space") from None
        raise ValueError(f"--storage {given}: cannot reach PostgreSQL ({_first_line(err)});"
                         " check host, port, user and database, and that the server runs") from None


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    return is_heartbeat_enabled(storage)


def retried_from(system_attrs: dict) -> int | None:
    """The number of the first trial in a retry chain (None for an original trial)."""
    return system_attrs.get("failed_trial")


def requeue(study: optuna.Study, trial: FrozenTrial, retries: int | None = DEFAULT_RETRIES,
            crashed: bool = True) -> bool:
    """Queue a retry of finished (FAIL) `trial`: same parameters, linked to the first trial of
    its chain (whose folder it reuses, so it resumes from the checkpoints there).

    `crashed`: the trial died (stale heartbeat); at most `retries` crashes per chain.
    An interrupted trial (SIGTERM, Ctrl-C, a lost database) is always re-queued. Returns
    whether a retry was queued. Like Optuna's RetryHeartbeatStaleTrialCallback, except that
    the retry does not inherit the failed trial's `fail_reason` and interruptions are free.
    """
    system = {"failed_trial": trial.number, "retry_history": [], "crashes": 0,
              **trial.system_attrs}
    system["retry_history"] = [*system["retry_history"], trial.number]
    system["crashes"] = system["crashes"] + int(crashed)
    if crashed and retries is not None and system["crashes"] > retries:
        return False
    user = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user, system_attrs=system))
    return True


def fail_stale(study: optuna.Study, older_than_s: float, retries: int | None = DEFAULT_RETRIES,
               ) -> list[int]:
    """Fail RUNNING trials started more than `older_than_s` ago and re-queue their parameters.

    For storages without a heartbeat (journal): the caller asserts no live worker runs them.
    Returns the failed trial numbers.
    """
    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start and (now - t.datetime_start).total_seconds() > older_than_s:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", (
                    f"stale: running > {older_than_s:.0f} s, failed by `ppc-sweep status "
                    "--fail-stale`; re-queued, the retry resumes from its checkpoint"))
                if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # it finished meanwhile
                continue
            requeue(study, study._storage.get_trial(t._trial_id), retries)
            failed.append(t.number)
    return failed
