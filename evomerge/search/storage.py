"""Study storage and the coordination of workers that share it.

A study is a plain Optuna study in an RDB storage (SQLite by default, PostgreSQL for many
machines), so optuna-dashboard and any Optuna tool can open it. On top of it:

- Heartbeats: each running trial records a heartbeat; a trial whose worker stopped beating is
  failed and re-queued once with the same parameters (Optuna's heartbeat only runs inside
  `optimize()`, and evomerge drives trials with ask/tell, so it keeps its own beat).
- Dead local workers are recognised at once (same host, process gone) instead of after the
  grace period, so a search killed with -9 and restarted picks up immediately.
- Admission: counting the trials and asking for a new one happen under one lock (a file lock
  for SQLite, a PostgreSQL advisory lock), so N workers stop at exactly `n_trials` trials.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from evomerge import trials as record
from evomerge.errors import EvomergeError

log = logging.getLogger(__name__)
# evomerge drives trials with ask/tell and keeps its own heartbeat (see Heartbeat below), which is
# exactly what these two warnings are about; they would otherwise open every worker's log.
warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*(heartbeat_interval|fail_stale_trials).*",
                        category=optuna.exceptions.ExperimentalWarning)

STORAGE_ENV = "EVOMERGE_STORAGE"  # how a storage URL (and its password) reaches a worker: never in argv
HEARTBEAT_INTERVAL = 5  # seconds
GRACE_PERIOD = 30  # seconds without a heartbeat before a remote trial counts as dead
# Trials that hold (or will hold) a place in the budget.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def worker_id() -> str:
    process = psutil.Process()
    return f"{socket.gethostname()}:{process.pid}:{int(process.create_time())}"


def default_storage(results: Path) -> str:
    return f"sqlite:///{(results / 'study.db').resolve()}"


def open_results(folder: Path, what: str) -> tuple[dict, optuna.Study]:
    """A results folder's summary.json and its study (the folder's study.db, else the storage the
    summary names); `what` names the argument in errors."""
    import json

    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        raise EvomergeError(f"{what} {folder}: no summary.json (a results folder of evomerge search)")
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"{what} {summary_file}: not a summary evomerge wrote ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("study"), str):
        raise EvomergeError(f"{what} {summary_file}: no study name in it (a summary evomerge wrote has 'study')")
    storage = default_storage(folder) if (folder / "study.db").is_file() else summary.get("storage")
    if not isinstance(storage, str):
        raise EvomergeError(f"{what} {folder}: no study.db here and the summary names no storage; "
                            "was study.db moved? (--storage names it)")
    return summary, load_study(storage, summary["study"])


def load_study(storage: str, study_name: str) -> optuna.Study:
    """An existing study, or one line: no such study, or a storage that cannot be read (a corrupt or
    locked SQLite file, a wrong password). A SQLite file that is not there is refused, not created."""
    database = sqlite_path(normalize_url(storage))
    if database is not None and not database.is_file():
        raise EvomergeError(f"no study database at {database} (moved or deleted?)")
    opened = open_storage(storage, attempts=1)
    try:
        return optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        raise EvomergeError(f"no study '{study_name}' in {shown(storage)}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors for a damaged database
        raise EvomergeError(f"cannot read the study storage {redacted(normalize_url(storage))}: "
                            f"{' '.join(str(exc).split()[:30])}") from None


def requeue_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial lost with its worker is tried again once, with the same parameters."""
    if record.TrialRecord.of(trial).retry_of is not None:
        log.warning("trial %d was itself a retry; not re-queued again", trial.number)
        return
    study.enqueue_trial(trial.params, user_attrs=record.user_attrs(retry_of=trial.number), skip_if_exists=False)
    log.warning("trial %d lost its worker: failed and re-queued once", trial.number)


def normalize_url(url: str) -> str:
    """`postgresql://…` means the psycopg 3 driver (SQLAlchemy would default to psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def open_storage(url: str, attempts: int = 6) -> optuna.storages.RDBStorage:
    url = normalize_url(url)
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=requeue_once,
            )
        except Exception as exc:
            # Workers that start together on a new database race to create its tables; the
            # loser sees "already exists" / a unique-constraint error and simply opens what the winner made.
            racing = any(s in str(exc).lower() for s in ("already exists", "duplicate key", "unique constraint"))
            if racing and attempt + 1 < attempts:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise EvomergeError(f"cannot open the study storage {redacted(url)}: {' '.join(str(exc).split()[:40])}") from exc
    raise AssertionError("unreachable")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, None for other storages."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def shown(url: str) -> str:
    """The URL as logs and results files show it: no password, and a SQLite file under the working
    directory as a relative path (results shared from a checkout name no machine's folders)."""
    path = sqlite_path(url)
    if path is not None and path.is_absolute() and path.is_relative_to(Path.cwd()):
        return "sqlite:///" + str(path.relative_to(Path.cwd()))
    return redacted(url)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def recover_dead_trials(study: optuna.Study) -> int:
    """Fails (and re-queues once) running trials whose worker is gone: on this host at once,
    elsewhere when their heartbeat is older than the grace period."""
    host = socket.gethostname()
    recovered = 0
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(record.WORKER)
        if not owner:
            # A worker writes its name within milliseconds of asking; a trial still without one
            # after the grace period lost its worker in between (and never beat).
            started_at = trial.datetime_start
            if started_at is None or (now - started_at).total_seconds() < GRACE_PERIOD:
                continue
        else:
            owner_host, pid, started = owner.rsplit(":", 2)
            if owner_host != host or _alive(int(pid), int(started)):
                continue
        try:
            record.write_to_storage(study._storage, trial._trial_id, interrupted=True, fail_reason="worker process died")
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                requeue_once(study, trial)
                recovered += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    optuna.storages.fail_stale_trials(study)
    return recovered


def _alive(pid: int, started: int) -> bool:
    try:
        return int(psutil.Process(pid).create_time()) == started
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Heartbeat:
    """Records a heartbeat for one trial every HEARTBEAT_INTERVAL seconds while running."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a database hiccup must not kill the evaluation
                log.debug("heartbeat failed: %s", exc)
            if self._stop.wait(HEARTBEAT_INTERVAL):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class AdmissionLock:
    """Serialises 'count the trials, then ask for one' across every worker of a study."""

    def __init__(self, url: str, study_name: str):
        self.url, self.study_name = url, study_name
        self._key = int.from_bytes(hashlib.sha256(f"evomerge:{study_name}".encode()).digest()[:8], "big", signed=True)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        database = sqlite_path(self.url)
        if database is not None:
            from filelock import FileLock, Timeout

            lock = FileLock(str(database) + ".lock")
            try:
                lock.acquire(timeout=5)
            except Timeout:
                log.info("waiting for %s.lock: another worker of this study is asking for a trial", database)
                try:
                    lock.acquire(timeout=600)
                except Timeout:
                    raise EvomergeError(f"{database}.lock: another process has held it for over 10 minutes (a worker "
                                        "of this study stuck while asking for a trial?); stop it and run again") from None
            try:
                yield
            finally:
                lock.release()
        elif self.url.startswith(("postgresql", "postgres")):
            import psycopg

            dsn = self.url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute("SELECT pg_advisory_lock(%s)", (self._key,))
                try:
                    yield
                finally:
                    connection.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        else:
            yield  # other storages: best effort


def admit(study: optuna.Study, lock: AdmissionLock, n_trials: int | None) -> optuna.Trial | None:
    """A new trial, or None when the study already holds n_trials counted trials."""
    with lock.hold():
        if n_trials is not None:
            counted = len(study.get_trials(deepcopy=False, states=COUNTED))
            if counted >= n_trials:
                # Waiting trials (re-queued after a dead worker) still run: they hold a place.
                waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if not waiting:
                    return None
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, record.WORKER, worker_id())
        study._storage.record_heartbeat(trial._trial_id)
        return trial


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

