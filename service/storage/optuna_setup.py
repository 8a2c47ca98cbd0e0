"""Schema set-up: Optuna's RDB schema (created and stamped, or upgraded by Optuna's own version
manager) and ours (:mod:`._schema`), once per database, under a cross-process lock."""

from __future__ import annotations

import functools
import os
from typing import Any

from alembic.script import ScriptDirectory
from optuna import __version__ as optuna_version
from optuna.storages._rdb import models as om
from optuna.storages._rdb.storage import _VersionManager
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import scoped_session, sessionmaker

from largebatch.service.storage import _schema as sch
from largebatch.service.storage._db import Database, short_error
from largebatch.service.storage.base import StoreError, StoreUnavailable
from largebatch.service.storage.summaries import rebuild_all

__all__ = ["initialize", "initialize_schema", "schema_is_current", "versions"]


def _init_optuna_schema(db: Database) -> None:
    """What ``RDBStorage.__init__`` does (tables, ``version_info``, Alembic stamp), on our engine.

    A fresh database is created and stamped at Optuna's Alembic head directly (with a cached
    revision map: loading Optuna's ~40 migration scripts costs ~0.1 s per load). A database that
    Optuna already knows goes through Optuna's own ``_VersionManager``, which also upgrades an
    older schema like ``optuna storage upgrade`` would.
    """
    from alembic.runtime.migration import MigrationContext

    om.BaseModel.metadata.create_all(db.engine)
    with db.write_engine.begin() as conn:
        fresh = (
            conn.execute(select(func.count()).select_from(om.VersionInfoModel.__table__)).scalar() == 0
            and MigrationContext.configure(conn).get_current_revision() is None
        )
        if fresh:
            conn.execute(
                om.VersionInfoModel.__table__.insert().values(
                    version_info_id=1, schema_version=om.SCHEMA_VERSION, library_version=optuna_version
                )
            )
            MigrationContext.configure(conn).stamp(_optuna_script(), _optuna_head())
    if fresh:
        return
    sessions = scoped_session(sessionmaker(bind=db.engine))
    try:
        manager = _VersionManager(db.url, db.engine, sessions)
        if manager.get_current_version() != _optuna_head():
            if db.kind == "memory":
                raise StoreError("in-memory Optuna schema is not at head")
            manager.upgrade()  # `optuna storage upgrade`, under our init lock
        manager.check_table_schema_compatibility()
    finally:
        sessions.remove()


def schema_is_current(db: Database) -> bool:
    def check(conn: Connection) -> bool:
        insp = inspect(conn)
        if not insp.has_table("alembic_version") or not insp.has_table("lb_runs"):
            return False
        rev = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        return rev == _optuna_head() and sch.current_version(conn) == sch.HEAD

    return db.run(check, write=False)


@functools.cache
def _optuna_script() -> ScriptDirectory:
    """Optuna's Alembic script directory (its revision map is loaded once per process)."""
    return ScriptDirectory(os.path.join(os.path.dirname(om.__file__), "alembic"))


@functools.cache
def _optuna_head() -> str:
    """Alembic head revision of the installed Optuna's RDB schema."""
    return _optuna_script().get_current_head() or ""


def initialize(db: Database) -> dict[str, str]:
    try:
        with sch.init_lock(db.engine, db.sqlite_path):
            if not schema_is_current(db):
                _init_optuna_schema(db)
                sch.migrate(db.write_engine, refill_summaries=rebuild_all)
    except (OperationalError, InterfaceError) as e:
        raise StoreUnavailable(f"cannot initialise the schema: {short_error(e)}") from e
    except SQLAlchemyError as e:
        raise StoreError(f"cannot initialise the schema: {short_error(e)}") from e
    return versions(db)


def versions(db: Database) -> dict[str, str]:
    def read(conn: Connection) -> dict[str, str]:
        rev = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        ours = sch.current_version(conn)
        return {
            "optuna": str(rev),
            "optuna_head": _optuna_head(),
            "largebatch": str(ours),
            "largebatch_head": str(sch.HEAD),
        }

    return db.run(read, write=False)


def initialize_schema(url: str | None = None, **engine_kwargs: Any) -> dict[str, str]:
    """Create or upgrade the Optuna schema and ours, once, before any worker serves.

    Safe when many processes call it at once: they serialise on a PostgreSQL advisory lock or an
    ``flock`` beside the SQLite file; the first one creates, the others find it done. Optuna's
    own ``create_study(load_if_exists=True)`` races here on a fresh database (optuna#1092,
    #4621); this does not.

    Returns:
        :meth:`StudyStore.schema_versions`.

    Raises:
        StoreUnavailable: The database cannot be reached.
        InvalidArgument: Bad URL.
    """
    db = Database(url, engine_kwargs=engine_kwargs or None)
    try:
        return initialize(db)
    finally:
        db.dispose()
