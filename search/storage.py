"""Opening a search's study: the storage, the study itself, and the check of its stored settings.

With ``storage`` (a SQLite path or any SQLAlchemy URL, e.g. PostgreSQL) the study persists: a
killed search started again with the same storage and study name continues, and several
processes can share one study. A stored study remembers the settings it was made with, and a
search with other settings is refused rather than mixed into it.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings

import optuna
import sqlalchemy

from . import identity

SETTINGS_ATTR = "mpqc_config"  # the study user attribute holding its settings
SQLITE_LOCK_SECONDS = 60.0  # how long a worker waits for another's SQLite transaction


def open_storage(storage, *, heartbeat: int):
    """None (in memory), an Optuna storage as it is, or an RDB storage for a path or URL."""
    if storage is None:
        return None
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = storage if "://" in str(storage) else f"sqlite:///{os.path.abspath(storage)}"
    last_error = None
    for attempt in range(5):  # workers starting together race to create the tables: retry
        try:
            return _rdb_storage(url, heartbeat)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many kinds
            last_error = e
            racing = "IntegrityError" in type(e).__name__ or "UniqueViolation" in str(e) or "already exists" in str(e)
            if not racing:
                break
            time.sleep(0.5 * (attempt + 1))
    e = last_error
    raise ValueError(f"cannot open search storage {url!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _rdb_storage(url: str, heartbeat: int):
    # Heartbeats let a restarted or sibling worker see a killed worker's trial as failed;
    # the retry callback runs that trial again, so completed trials stay once each.
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    new_api = "heartbeat_stale_trial_callback" in params  # optuna >= 4.9 renamed both
    key = "heartbeat_stale_trial_callback" if new_api else "failed_trial_callback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_cls = (
            optuna.storages.RetryHeartbeatStaleTrialCallback if new_api else optuna.storages.RetryFailedTrialCallback
        )
        retry = retry_cls(max_retry=2)
        sqlite = url.startswith("sqlite")
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            engine_kwargs={"connect_args": {"timeout": SQLITE_LOCK_SECONDS}} if sqlite else None,
            **{key: retry},
        )
    if sqlite:
        _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    SQLite ignores SELECT ... FOR UPDATE, and Python's sqlite3 begins a transaction only at its
    first write, so optuna's read-then-write of a trial's state is not atomic there: two
    workers both read an enqueued trial as WAITING and both run it (measured: 8 of 300 enqueued
    trials taken twice by two processes), and the second to finish fails with "Cannot tell a
    PRUNED trial". With the lock taken at BEGIN the read and the write are one step; a worker
    waits up to ``SQLITE_LOCK_SECONDS`` for another's transaction."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # sqlite3 then leaves BEGIN to the listener below

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections the storage opened before the listeners


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C with a traceback; the caller gets the interrupt anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


_OPTIMIZE_LOGGER = logging.getLogger("optuna.study._optimize")
if not any(isinstance(f, _NoInterruptTraceback) for f in _OPTIMIZE_LOGGER.filters):
    _OPTIMIZE_LOGGER.addFilter(_NoInterruptTraceback())


def open_study(storage, name: str, sampler, *, multi: bool, heartbeat: int, pruner=None) -> optuna.Study:
    """Create the study, or load it when it exists (a resumed or shared search)."""
    rdb = open_storage(storage, heartbeat=heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize", "maximize"] if multi else ["minimize"]
    try:
        return optuna.create_study(
            storage=rdb, study_name=name, sampler=sampler, pruner=pruner, directions=directions, load_if_exists=True
        )
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot create or load study {name!r} in {storage!r}: {e}") from e


def check_settings(study: optuna.Study, settings: dict) -> None:
    """Store ``settings`` in a new study; refuse a stored study that was made with others,
    naming each differing field (``identity.differences``)."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return
    if stored == settings:
        return
    what = ""
    if stored.get("objective") != settings.get("objective"):
        what = (
            f" It was made with objective {objective_label(stored.get('objective'))}, "
            f"asked {objective_label(settings.get('objective'))}."
        )
    differing = "; ".join(identity.differences(stored, settings))
    raise ValueError(
        f"study {study.study_name!r} was created for another search;{what} differing: {differing}. "
        "Use another study_name (or leave it out: the default name follows the model, text and settings), "
        "or the same model, text and settings."
    )


def objective_label(config: dict | None) -> str:
    if config is None:
        return "perplexity on windows"
    if config.get("kind") == "lm_eval":
        return (
            f"lm-eval {config.get('task')}"
            + (f" {config['metric']}" if config.get("metric") else "")
            + (f" (limit {config['limit']})" if config.get("limit") is not None else "")
        )
    return str(config.get("kind", config))
