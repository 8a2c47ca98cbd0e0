"""Optuna-backed :class:`StudyStore`.

Layout. Studies and runs are genuine Optuna studies and trials, written through Optuna's own
table definitions (``optuna.storages._rdb.models``) so ``optuna.load_study(storage=url)`` and
optuna-dashboard read them like any other study:

=====================  ======================================================================
ours                   Optuna
=====================  ======================================================================
study                  ``studies`` row named ``"{namespace}/{name}"``, one direction, the
                       metric name as Optuna's ``study:metric_names`` system attr, and user
                       attrs ``namespace``, ``name``, ``model_family``, ``model_params``,
                       ``metric`` (+ the caller's ``user_attrs``)
run                    trial; params ``batch_size`` (int, log), ``peak_lr`` (float, log),
                       ``warmup_ratio``/``const_ratio`` (float), ``optimizer`` (categorical),
                       ``steps`` (int, log); user attrs ``recipe``, ``recipe_hash``,
                       ``environment``, ``client_key``, ``stage``
running                RUNNING
completed              COMPLETE, value = metric
diverged               FAIL, user attrs ``outcome="diverged"``, ``reason``, ``diverged_step``
failed                 FAIL, ``outcome="failed"``, ``reason``
preempted              FAIL, ``outcome="preempted"``, ``reason="lease expired"``
pruned                 PRUNED, value = metric or last reported loss (as ``Study.tell`` does)
report                 intermediate value (step, loss); grad norm in ``lb_grad_norms``
=====================  ======================================================================

Stock Optuna tools may *read* the store (``optuna.load_study``, ``optuna-dashboard`` behind
read-only auth). Writing to a store-managed study through plain Optuna (``study.ask``/``tell``,
the dashboard's tell button) is not supported: those trials get no ``lb_runs`` row and would
reuse trial numbers. Importing past results with ``study.add_trial`` followed by
:meth:`OptunaStudyStore.rebuild_summaries` does feed the summaries, but such trials are not runs.

Each store operation is exactly one database transaction, so an Optuna trial and our row for it
are written together or not at all (a crash or a kill between "two writes" cannot happen).
Trial numbers come from the ``lb_studies.n_runs`` counter, updated first in the transaction;
that row lock serialises run creation within one study the way Optuna's ``SELECT ... FOR UPDATE``
on the study does, without Optuna's ``COUNT(*)`` of past trials.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, get_args

from alembic.script import ScriptDirectory
from optuna import __version__ as optuna_version
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.storages._rdb import models as om
from optuna.storages._rdb.storage import _VersionManager
from optuna.study import StudyDirection
from optuna.trial import TrialState
from pydantic import ValidationError
from sqlalchemy import and_, case, delete, func, inspect, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import scoped_session, sessionmaker

from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.scaling_rules.models import Recipe, RecipeOptimizerName
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._db import Database, default_url, short_error
from largebatch.service.storage.base import (
    DEFAULT_LEASE_SECONDS,
    FINAL_OUTCOMES,
    OUTCOMES,
    AlreadyExists,
    ApiKeyRecord,
    Conflict,
    Direction,
    FinalOutcome,
    InvalidArgument,
    NotFound,
    Outcome,
    Page,
    Report,
    RunRecord,
    Scope,
    StoreError,
    StoreUnavailable,
    StudyRecord,
    StudyStore,
    validate_name,
)

__all__ = ["OptunaStudyStore", "default_url", "initialize_schema", "open_store"]

# Optuna's tables (Core objects of Optuna's own declarative models).
T_STUDIES = om.StudyModel.__table__
T_DIRECTIONS = om.StudyDirectionModel.__table__
T_STUDY_USER = om.StudyUserAttributeModel.__table__
T_STUDY_SYSTEM = om.StudySystemAttributeModel.__table__
T_TRIALS = om.TrialModel.__table__
T_PARAMS = om.TrialParamModel.__table__
T_VALUES = om.TrialValueModel.__table__
T_INTERMEDIATE = om.TrialIntermediateValueModel.__table__
T_TRIAL_USER = om.TrialUserAttributeModel.__table__
IVT = om.TrialIntermediateValueModel.TrialIntermediateValueType
VT = om.TrialValueModel.TrialValueType

OPTIMIZERS: tuple[str, ...] = get_args(RecipeOptimizerName)
INT_MAX = 2**31 - 1
#: The search space every run's params are recorded in (fixed, so every trial of every study is
#: compatible with Optuna samplers and with each other).
DISTRIBUTIONS = {
    "batch_size": IntDistribution(1, INT_MAX, log=True),
    "peak_lr": FloatDistribution(1e-12, 1e4, log=True),
    "warmup_ratio": FloatDistribution(0.0, 1.0),
    "const_ratio": FloatDistribution(0.0, 1.0),
    "optimizer": CategoricalDistribution(OPTIMIZERS),
    "steps": IntDistribution(1, INT_MAX, log=True),
}
_DIST_JSON = {k: distribution_to_json(v) for k, v in DISTRIBUTIONS.items()}
_FAIL_OUTCOMES = {"diverged", "failed", "preempted"}
_MAX_JSON_BYTES = 256 * 1024
_MAX_REASON = 2000
_KEY_PREFIX = "lbk_"


def _now() -> datetime:
    """Naive UTC (what we store; Optuna 5 stores naive UTC too)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _naive_utc(argument: str, dt: datetime) -> datetime:
    if not isinstance(dt, datetime):
        raise InvalidArgument(f"{argument} must be a datetime, got {dt!r}")
    if dt.tzinfo is None:
        raise InvalidArgument(f"{argument} must be timezone-aware (UTC), got naive {dt!r}")
    return dt.astimezone(timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------------------- validation


def _int(argument: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{argument} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidArgument(f"{argument} must be {bound}, got {value!r}")
    return value


def _float(argument: str, value: object, *, finite: bool = True, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{argument} must be a number, got {value!r}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise InvalidArgument(f"{argument} must be a finite number, got {value!r}")
    if positive and not v > 0:
        raise InvalidArgument(f"{argument} must be > 0, got {value!r}")
    return v


def _json(argument: str, value: object) -> str:
    try:
        blob = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{argument} must be JSON-serialisable (no NaN/inf): {e}") from e
    if len(blob) > _MAX_JSON_BYTES:
        raise InvalidArgument(f"{argument} is too large ({len(blob)} bytes > {_MAX_JSON_BYTES})")
    return blob


def _page_args(limit: object, offset: object) -> tuple[int, int]:
    return _int("limit", limit, minimum=1, maximum=1000), _int("offset", offset, minimum=0)


def _client_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or not value.isprintable():
        raise InvalidArgument(f"client_key must be 1..200 printable characters, got {value!r}")
    return value


def _nonfinite_repr(v: float) -> tuple[float | None, str | None]:
    if math.isfinite(v):
        return v, None
    return None, ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _from_nonfinite(v: float | None, tag: str | None) -> float | None:
    return float(tag) if tag is not None else v


def _same_metric(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _better(direction: str, metric: float, lr: float, best_metric: float | None, best_lr: float | None) -> bool:
    """Strictly better metric wins; on a tie the smaller LR (deterministic whatever the order)."""
    if best_metric is None:
        return True
    if metric == best_metric:
        return best_lr is None or lr < best_lr
    return metric < best_metric if direction == "minimize" else metric > best_metric


@dataclass
class _Existing(Exception):
    """Raised inside a transaction to roll it back when the client key is already taken."""

    run_id: int


# ---------------------------------------------------------------------------------- schema


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


def _schema_is_current(db: Database) -> bool:
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


def _initialize(db: Database) -> dict[str, str]:
    try:
        with sch.init_lock(db.engine, db.sqlite_path):
            if not _schema_is_current(db):
                _init_optuna_schema(db)
                sch.migrate(db.write_engine)
    except (OperationalError, InterfaceError) as e:
        raise StoreUnavailable(f"cannot initialise the schema: {short_error(e)}") from e
    except SQLAlchemyError as e:
        raise StoreError(f"cannot initialise the schema: {short_error(e)}") from e
    return _versions(db)


def _versions(db: Database) -> dict[str, str]:
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
        return _initialize(db)
    finally:
        db.dispose()


def open_store(url: str | None = None, *, initialize: bool = True, **options: Any) -> OptunaStudyStore:
    """Open a study store.

    Args:
        url: ``None`` for the default SQLite file (:func:`default_url`, honouring
            ``XDG_DATA_HOME``); ``"memory"`` or ``"sqlite://"`` for a private in-memory database;
            ``"sqlite:///path"``; ``"postgresql+psycopg://user@host/db"`` (``postgresql://`` is
            mapped to psycopg 3).
        initialize: Create/upgrade the schema if needed (under the cross-process init lock). With
            False, a missing or outdated schema raises :class:`StoreUnavailable`; use that in
            workers when a deploy step ran :func:`initialize_schema`.
        **options: ``engine_kwargs`` (dict for ``sqlalchemy.create_engine``), ``busy_timeout_s``,
            ``busy_deadline_s``.
    """
    return OptunaStudyStore(url, initialize=initialize, **options)


# ---------------------------------------------------------------------------------- the store


class OptunaStudyStore(StudyStore):
    """:class:`StudyStore` on an Optuna RDB schema (SQLite file, PostgreSQL, or SQLite in memory)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        initialize: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        busy_timeout_s: float = 5.0,
        busy_deadline_s: float = 60.0,
    ) -> None:
        self._db = Database(
            url, engine_kwargs=engine_kwargs, busy_timeout_s=busy_timeout_s, busy_deadline_s=busy_deadline_s
        )
        self.url = self._db.url
        self.kind = self._db.kind
        try:
            if initialize or self.kind == "memory":
                _initialize(self._db)
            elif not _schema_is_current(self._db):
                raise StoreUnavailable(
                    f"the schema of {self._db.engine.url!r} is missing or outdated: run initialize_schema(url)"
                )
        except BaseException:
            self._db.dispose()
            raise
        self._insert = pg_insert if self._db.engine.dialect.name == "postgresql" else sqlite_insert
        self._pg = self._db.engine.dialect.name == "postgresql"
        # (run_id, created_at) -> (recipe JSON, environment JSON); JSON text, so that no caller can
        # mutate what the next caller gets.
        self._attr_cache: OrderedDict[tuple[int, datetime], tuple[str, str]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OptunaStudyStore({self._db.engine.url!r})"

    # --------------------------------------------------------------------------- helpers

    def _write(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=True)

    def _read(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=False)

    @staticmethod
    def _study_row(conn: Connection, namespace: str, name: str, *, for_update: bool = False):  # type: ignore[no-untyped-def]
        q = select(sch.lb_studies).where(sch.lb_studies.c.namespace == namespace, sch.lb_studies.c.name == name)
        if for_update:
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"study {namespace}/{name} not found")
        return row

    @staticmethod
    def _study_record(row: Any, user_attrs: dict[str, Any] | None = None) -> StudyRecord:
        return StudyRecord(
            id=row.study_id,
            name=row.name,
            namespace=row.namespace,
            model_family=row.model_family,
            model_params=row.model_params,
            metric=row.metric,
            direction=row.direction,
            created_at=_aware(row.created_at),
            n_runs=row.n_runs,
            user_attrs=user_attrs or {},
        )

    def _study_user_attrs(self, conn: Connection, study_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {sid: {} for sid in study_ids}
        if not study_ids:
            return out
        rows = conn.execute(
            select(T_STUDY_USER.c.study_id, T_STUDY_USER.c.key, T_STUDY_USER.c.value_json).where(
                T_STUDY_USER.c.study_id.in_(study_ids)
            )
        )
        for sid, key, value in rows:
            if key not in _STUDY_CORE_ATTRS:
                out[sid][key] = json.loads(value)
        return out

    _RUN_COLUMNS = (sch.lb_runs, sch.lb_studies.c.namespace, sch.lb_studies.c.name.label("study_name"))

    def _run_records(self, conn: Connection, rows: Sequence[Any]) -> list[RunRecord]:
        """Records from rows holding every ``lb_runs`` column plus ``namespace``/``study_name``.

        The recipe and environment never change after creation: they are read from Optuna's
        trial user attrs once and then kept in a small per-process cache, keyed by run id *and*
        creation time (SQLite may reuse the ids of a deleted study's trials).
        """
        maps = [r._mapping if hasattr(r, "_mapping") else r for r in rows]
        missing = [m["run_id"] for m in maps if self._cache_get(m["run_id"], m["created_at"]) is None]
        if missing:
            fetched: dict[int, dict[str, Any]] = {i: {} for i in missing}
            for tid, key, value in conn.execute(
                select(T_TRIAL_USER.c.trial_id, T_TRIAL_USER.c.key, T_TRIAL_USER.c.value_json).where(
                    T_TRIAL_USER.c.trial_id.in_(missing), T_TRIAL_USER.c.key.in_(("recipe", "environment"))
                )
            ):
                fetched[tid][key] = value
            for m in maps:
                if m["run_id"] in fetched:
                    f = fetched[m["run_id"]]
                    self._cache_put(m["run_id"], m["created_at"], f.get("recipe", "{}"), f.get("environment", "{}"))
        out = []
        for m in maps:
            recipe, environment = self._cache_get(m["run_id"], m["created_at"]) or ("{}", "{}")
            out.append(_run_record(m, recipe, environment))
        return out

    def _cache_get(self, run_id: int, created_at: datetime) -> tuple[str, str] | None:
        with self._cache_lock:
            hit = self._attr_cache.get((run_id, created_at))
            if hit is not None:
                self._attr_cache.move_to_end((run_id, created_at))
            return hit

    def _cache_put(self, run_id: int, created_at: datetime, recipe: str, environment: str) -> None:
        with self._cache_lock:
            self._attr_cache[(run_id, created_at)] = (recipe, environment)
            while len(self._attr_cache) > _CACHE_SIZE:
                self._attr_cache.popitem(last=False)

    def _load_run(self, conn: Connection, run_id: int) -> RunRecord:
        row = conn.execute(
            select(*self._RUN_COLUMNS)
            .join(sch.lb_studies, sch.lb_studies.c.study_id == sch.lb_runs.c.study_id)
            .where(sch.lb_runs.c.run_id == run_id)
        ).first()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return self._run_records(conn, [row])[0]

    def _bump_summary(
        self,
        conn: Connection,
        study_id: int,
        batch_size: int,
        direction: str,
        *,
        outcome: str,
        lr: float,
        metric: float | None = None,
        new_run: bool = False,
    ) -> None:
        """Fold one event into the (study, batch size) summary row, with one upsert.

        SET expressions see the row's old values (SQL semantics on both backends), so the
        ``best_*`` pair is updated under the same condition.
        """
        s = sch.lb_batch_summary
        completed = outcome == "completed"
        diverged = outcome == "diverged"
        values = {
            "study_id": study_id,
            "batch_size": batch_size,
            "n_runs": 1 if new_run else 0,
            "n_completed": int(completed),
            "n_diverged": int(diverged),
            "best_lr": lr if completed else None,
            "best_metric": metric if completed else None,
            "min_diverged_lr": lr if diverged else None,
            "max_stable_lr": lr if completed else None,
        }
        stmt = self._insert(s).values(**values)
        set_: dict[str, Any] = {}
        if new_run:
            set_["n_runs"] = s.c.n_runs + 1
        if completed:
            assert metric is not None
            cmp = s.c.best_metric > metric if direction == "minimize" else s.c.best_metric < metric
            better = or_(s.c.best_metric.is_(None), cmp, and_(s.c.best_metric == metric, s.c.best_lr > lr))
            set_["n_completed"] = s.c.n_completed + 1
            set_["best_metric"] = case((better, literal(metric)), else_=s.c.best_metric)
            set_["best_lr"] = case((better, literal(lr)), else_=s.c.best_lr)
            set_["max_stable_lr"] = case(
                (or_(s.c.max_stable_lr.is_(None), s.c.max_stable_lr < lr), literal(lr)), else_=s.c.max_stable_lr
            )
        if diverged:
            set_["n_diverged"] = s.c.n_diverged + 1
            set_["min_diverged_lr"] = case(
                (or_(s.c.min_diverged_lr.is_(None), s.c.min_diverged_lr > lr), literal(lr)),
                else_=s.c.min_diverged_lr,
            )
        if not set_:
            stmt = stmt.on_conflict_do_nothing(index_elements=["study_id", "batch_size"])
        else:
            stmt = stmt.on_conflict_do_update(index_elements=["study_id", "batch_size"], set_=set_)
        conn.execute(stmt)

    # --------------------------------------------------------------------------- studies

    def create_study(
        self,
        namespace: str,
        name: str,
        *,
        model_family: str,
        model_params: int,
        metric: str = "loss",
        direction: Direction = "minimize",
        user_attrs: dict[str, Any] | None = None,
    ) -> StudyRecord:
        validate_name("namespace", namespace)
        validate_name("name", name)
        if not isinstance(model_family, str) or not 1 <= len(model_family) <= 64:
            raise InvalidArgument(f"model_family must be a string of 1..64 characters, got {model_family!r}")
        _int("model_params", model_params, minimum=1, maximum=2**62)
        if not isinstance(metric, str) or not 1 <= len(metric) <= 128:
            raise InvalidArgument(f"metric must be a string of 1..128 characters, got {metric!r}")
        if direction not in ("minimize", "maximize"):
            raise InvalidArgument(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        extra = dict(user_attrs or {}) if isinstance(user_attrs, dict) or user_attrs is None else None
        if extra is None:
            raise InvalidArgument(f"user_attrs must be a dict, got {type(user_attrs).__name__}")
        clash = sorted(set(extra) & _STUDY_CORE_ATTRS)
        if clash:
            raise InvalidArgument(f"user_attrs must not set reserved keys {clash}")
        _json("user_attrs", extra)
        core = {
            "namespace": namespace,
            "name": name,
            "model_family": model_family,
            "model_params": model_params,
            "metric": metric,
        }
        now = _now()

        def tx(conn: Connection) -> int:
            study_id = conn.execute(T_STUDIES.insert().values(study_name=f"{namespace}/{name}")).inserted_primary_key[0]
            conn.execute(
                T_DIRECTIONS.insert().values(
                    study_id=study_id,
                    objective=0,
                    direction=StudyDirection.MINIMIZE if direction == "minimize" else StudyDirection.MAXIMIZE,
                )
            )
            conn.execute(
                T_STUDY_USER.insert(),
                [{"study_id": study_id, "key": k, "value_json": json.dumps(v)} for k, v in {**core, **extra}.items()],
            )
            conn.execute(
                T_STUDY_SYSTEM.insert().values(
                    study_id=study_id, key="study:metric_names", value_json=json.dumps([metric])
                )
            )
            conn.execute(
                sch.lb_studies.insert().values(
                    study_id=study_id,
                    namespace=namespace,
                    name=name,
                    model_family=model_family,
                    model_params=model_params,
                    metric=metric,
                    direction=direction,
                    created_at=now,
                    n_runs=0,
                )
            )
            return study_id

        try:
            study_id = self._write(tx)
        except IntegrityError as e:
            raise AlreadyExists(f"study {namespace}/{name} already exists") from e
        return StudyRecord(
            id=study_id,
            created_at=_aware(now),
            n_runs=0,
            user_attrs=extra,
            direction=direction,
            **core,
        )

    def get_study(self, namespace: str, name: str) -> StudyRecord:
        validate_name("namespace", namespace)
        validate_name("name", name)

        def tx(conn: Connection) -> StudyRecord:
            row = self._study_row(conn, namespace, name)
            return self._study_record(row, self._study_user_attrs(conn, [row.study_id])[row.study_id])

        return self._read(tx)

    def list_studies(self, namespace: str | None = None, *, limit: int = 100, offset: int = 0) -> Page:
        if namespace is not None:
            validate_name("namespace", namespace)
        limit, offset = _page_args(limit, offset)
        s = sch.lb_studies

        def tx(conn: Connection) -> Page:
            where = [] if namespace is None else [s.c.namespace == namespace]
            total = conn.execute(select(func.count()).select_from(s).where(*where)).scalar_one()
            rows = conn.execute(
                select(s).where(*where).order_by(s.c.study_id).limit(limit).offset(offset)
            ).all()
            attrs = self._study_user_attrs(conn, [r.study_id for r in rows])
            return Page(items=[self._study_record(r, attrs[r.study_id]) for r in rows], total=total)

        return self._read(tx)

    def delete_study(self, namespace: str, name: str) -> None:
        validate_name("namespace", namespace)
        validate_name("name", name)

        def tx(conn: Connection) -> None:
            sid = self._study_row(conn, namespace, name, for_update=True).study_id
            runs = select(sch.lb_runs.c.run_id).where(sch.lb_runs.c.study_id == sid).scalar_subquery()
            conn.execute(delete(sch.lb_grad_norms).where(sch.lb_grad_norms.c.run_id.in_(runs)))
            conn.execute(delete(sch.lb_batch_summary).where(sch.lb_batch_summary.c.study_id == sid))
            conn.execute(delete(sch.lb_runs).where(sch.lb_runs.c.study_id == sid))
            conn.execute(delete(sch.lb_studies).where(sch.lb_studies.c.study_id == sid))
            trials = select(T_TRIALS.c.trial_id).where(T_TRIALS.c.study_id == sid).scalar_subquery()
            for table, column in _optuna_children("trials"):
                conn.execute(delete(table).where(column.in_(trials)))
            conn.execute(delete(T_TRIALS).where(T_TRIALS.c.study_id == sid))
            for table, column in _optuna_children("studies"):
                conn.execute(delete(table).where(column == sid))
            conn.execute(delete(T_STUDIES).where(T_STUDIES.c.study_id == sid))

        self._write(tx)

    # --------------------------------------------------------------------------- runs

    def create_run(
        self,
        namespace: str,
        study: str,
        recipe: Recipe,
        *,
        client_key: str | None = None,
        environment: dict[str, Any] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        stage: int = 0,
    ) -> tuple[RunRecord, bool]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        if isinstance(recipe, dict):
            try:
                recipe = Recipe.model_validate(recipe)
            except ValidationError as e:
                raise InvalidArgument(f"recipe is not a valid Recipe: {e}") from e
        if not isinstance(recipe, Recipe):
            raise InvalidArgument(f"recipe must be a Recipe, got {type(recipe).__name__}")
        client_key = _client_key(client_key)
        if environment is not None and not isinstance(environment, dict):
            raise InvalidArgument(f"environment must be a dict, got {type(environment).__name__}")
        environment = environment or {}
        environment_blob = _json("environment", environment)
        lease_seconds = _float("lease_seconds", lease_seconds, positive=True)
        if not recipe.stages:
            raise InvalidArgument("recipe.stages must not be empty")
        _int("stage", stage, minimum=0, maximum=len(recipe.stages) - 1)
        st = recipe.stages[stage]
        params: dict[str, Any] = {
            "batch_size": st.batch_size,
            "peak_lr": st.peak_lr,
            "warmup_ratio": st.warmup_ratio,
            "const_ratio": st.const_ratio,
            "optimizer": recipe.optimizer.name,
            "steps": st.steps,
        }
        for key, dist in DISTRIBUTIONS.items():
            v = params[key]
            if isinstance(dist, CategoricalDistribution):
                ok = v in dist.choices
            else:
                ok = isinstance(v, (int, float)) and math.isfinite(v) and dist.low <= v <= dist.high
            if not ok:
                raise InvalidArgument(f"recipe: {key}={v!r} is outside the recorded range {dist}")
        recipe_json = recipe.model_dump(mode="json")
        recipe_blob = _json("recipe", recipe_json)
        recipe_hash = recipe.fingerprint()
        trial_attrs = {
            "recipe": recipe_json,
            "recipe_hash": recipe_hash,
            "environment": environment,
            "client_key": client_key,
            "stage": stage,
        }

        def tx(conn: Connection) -> int:
            s = sch.lb_studies
            if client_key is not None:  # fast path for a retry; the unique constraint decides races
                existing = conn.execute(
                    select(sch.lb_runs.c.run_id)
                    .join(s, s.c.study_id == sch.lb_runs.c.study_id)
                    .where(s.c.namespace == namespace, s.c.name == study, sch.lb_runs.c.client_key == client_key)
                ).scalar()
                if existing is not None:
                    raise _Existing(existing)
            row = conn.execute(
                update(s)
                .where(s.c.namespace == namespace, s.c.name == study)
                .values(n_runs=s.c.n_runs + 1)
                .returning(s.c.study_id, s.c.n_runs, s.c.direction)
            ).first()
            if row is None:
                raise NotFound(f"study {namespace}/{study} not found")
            study_id, number, direction = row.study_id, row.n_runs - 1, row.direction
            now = _now()
            trial_id = conn.execute(
                T_TRIALS.insert().values(
                    study_id=study_id, number=number, state=TrialState.RUNNING, datetime_start=now
                )
            ).inserted_primary_key[0]
            run_row = {
                "run_id": trial_id,
                "study_id": study_id,
                "number": number,
                "client_key": client_key,
                "state": "running",
                "swept": False,
                "recipe_hash": recipe_hash,
                "created_at": now,
                "updated_at": now,
                "lease_seconds": lease_seconds,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
                **params,
            }
            conn.execute(sch.lb_runs.insert().values(**run_row))
            conn.execute(
                T_PARAMS.insert(),
                [
                    {
                        "trial_id": trial_id,
                        "param_name": k,
                        "param_value": DISTRIBUTIONS[k].to_internal_repr(v),
                        "distribution_json": _DIST_JSON[k],
                    }
                    for k, v in params.items()
                ],
            )
            conn.execute(
                T_TRIAL_USER.insert(),
                [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in trial_attrs.items()],
            )
            self._bump_summary(
                conn, study_id, st.batch_size, direction, outcome="running", lr=st.peak_lr, new_run=True
            )
            return run_row

        try:
            run_row = self._write(tx)
        except (_Existing, IntegrityError) as e:
            if client_key is None:
                raise StoreError(f"could not create run: {e}") from e

            # The in-transaction check, or the constraint in a race, found the key: that run.
            def find(conn: Connection) -> int | None:
                return conn.execute(
                    select(sch.lb_runs.c.run_id)
                    .join(sch.lb_studies, sch.lb_studies.c.study_id == sch.lb_runs.c.study_id)
                    .where(
                        sch.lb_studies.c.namespace == namespace,
                        sch.lb_studies.c.name == study,
                        sch.lb_runs.c.client_key == client_key,
                    )
                ).scalar()

            found = e.run_id if isinstance(e, _Existing) else self._read(find)
            if found is None:
                raise StoreError(f"could not create run: {e}") from e
            run = self.get_run(found)
            if run.recipe_hash != recipe_hash:
                raise Conflict(
                    f"client_key {client_key!r} was already used in study {namespace}/{study} for run "
                    f"{found} with a different recipe"
                ) from None
            return run, False
        self._cache_put(run_row["run_id"], run_row["created_at"], recipe_blob, environment_blob)
        run_row.update(
            namespace=namespace, study_name=study, metric=None, reason=None, diverged_step=None,
            last_step=None, last_loss=None, last_loss_nonfinite=None,
        )
        return _run_record(run_row, recipe_blob, environment_blob), True

    def get_run(self, run_id: int) -> RunRecord:
        _int("run_id", run_id, minimum=0)
        return self._read(lambda conn: self._load_run(conn, run_id))

    def list_runs(
        self,
        namespace: str,
        study: str,
        *,
        state: Outcome | None = None,
        batch_size: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page:
        validate_name("namespace", namespace)
        validate_name("study", study)
        if state is not None and state not in OUTCOMES:
            raise InvalidArgument(f"state must be one of {list(OUTCOMES)}, got {state!r}")
        if batch_size is not None:
            _int("batch_size", batch_size, minimum=1)
        limit, offset = _page_args(limit, offset)
        r = sch.lb_runs

        def tx(conn: Connection) -> Page:
            sid = self._study_row(conn, namespace, study).study_id
            where = [r.c.study_id == sid]
            if state is not None:
                where.append(r.c.state == state)
            if batch_size is not None:
                where.append(r.c.batch_size == batch_size)
            total = conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one()
            rows = conn.execute(
                select(*self._RUN_COLUMNS)
                .join(sch.lb_studies, sch.lb_studies.c.study_id == r.c.study_id)
                .where(*where)
                .order_by(r.c.number)
                .limit(limit)
                .offset(offset)
            ).all()
            return Page(items=self._run_records(conn, rows), total=total)

        return self._read(tx)

    def _lock_running(self, conn: Connection, run_id: int, action: str) -> Any:
        """The run's row (locked on PostgreSQL), revived if the sweeper preempted it; NotFound, or
        Conflict if it finished."""
        q = (
            select(*self._RUN_COLUMNS, sch.lb_studies.c.direction)
            .join(sch.lb_studies, sch.lb_studies.c.study_id == sch.lb_runs.c.study_id)
            .where(sch.lb_runs.c.run_id == run_id)
        )
        if self._pg:
            q = q.with_for_update(of=sch.lb_runs)
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        if row.state == "preempted" and row.swept:
            return self._revive(conn, dict(row._mapping))
        if row.state != "running":
            raise Conflict(f"run {run_id} is {row.state}, not running: cannot {action}")
        return dict(row._mapping)

    def _revive(self, conn: Connection, row: dict[str, Any]) -> dict[str, Any]:
        """Undo the sweeper's guess on a run whose job turns out to be alive (its lease ran out during a
        network partition, say): it is ``running`` again, as if the lease had never expired. The caller
        renews the lease in the same transaction."""
        run_id = row["run_id"]
        changes = {"state": "running", "swept": False, "reason": None}
        conn.execute(update(sch.lb_runs).where(sch.lb_runs.c.run_id == run_id).values(**changes))
        conn.execute(
            update(T_TRIALS).where(T_TRIALS.c.trial_id == run_id).values(state=TrialState.RUNNING,
                                                                         datetime_complete=None)
        )
        conn.execute(
            delete(T_TRIAL_USER).where(T_TRIAL_USER.c.trial_id == run_id, T_TRIAL_USER.c.key.in_(_SWEPT_ATTRS))
        )
        row.update(changes)
        return row

    def heartbeat(self, run_id: int, *, lease_seconds: float | None = None) -> RunRecord:
        """Renew the lease to now + ``lease_seconds`` (default: the run's current lease length)."""
        _int("run_id", run_id, minimum=0)
        if lease_seconds is not None:
            lease_seconds = _float("lease_seconds", lease_seconds, positive=True)
        r = sch.lb_runs

        def tx(conn: Connection) -> RunRecord:
            row = self._lock_running(conn, run_id, "heartbeat")
            secs = lease_seconds if lease_seconds is not None else row["lease_seconds"]
            now = _now()
            changes = {"updated_at": now, "lease_seconds": secs, "lease_expires_at": now + timedelta(seconds=secs)}
            conn.execute(update(r).where(r.c.run_id == run_id).values(**changes))
            row.update(changes)
            return self._run_records(conn, [row])[0]

        return self._write(tx)

    def report(self, run_id: int, step: int, loss: float, grad_norm: float | None = None) -> RunRecord:
        """Record an intermediate report; also renews the lease by the run's lease length."""
        _int("run_id", run_id, minimum=0)
        _int("step", step, minimum=0, maximum=2**62)
        loss = _float("loss", loss, finite=False)
        if grad_norm is not None:
            grad_norm = _float("grad_norm", grad_norm, finite=False)
        r = sch.lb_runs
        stored_loss, loss_tag = _nonfinite_repr(loss)

        def tx(conn: Connection) -> RunRecord:
            # The row is locked (FOR UPDATE on PostgreSQL, the writer lock on SQLite), so the
            # "newest step wins" decision can be made here.
            row = self._lock_running(conn, run_id, "report")
            now = _now()
            changes: dict[str, Any] = {
                "updated_at": now,
                "lease_expires_at": now + timedelta(seconds=row["lease_seconds"]),
            }
            if row["last_step"] is None or row["last_step"] <= step:
                changes.update(last_step=step, last_loss=stored_loss, last_loss_nonfinite=loss_tag)
            conn.execute(update(r).where(r.c.run_id == run_id).values(**changes))
            row.update(changes)
            value, vtype = om.TrialIntermediateValueModel.intermediate_value_to_stored_repr(loss)
            ins = self._insert(T_INTERMEDIATE).values(
                trial_id=run_id, step=step, intermediate_value=value, intermediate_value_type=vtype
            )
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["trial_id", "step"],
                    set_={"intermediate_value": value, "intermediate_value_type": vtype},
                )
            )
            if grad_norm is None:
                conn.execute(
                    delete(sch.lb_grad_norms).where(
                        sch.lb_grad_norms.c.run_id == run_id, sch.lb_grad_norms.c.step == step
                    )
                )
            else:
                g, gtag = _nonfinite_repr(grad_norm)
                gins = self._insert(sch.lb_grad_norms).values(
                    run_id=run_id, step=step, grad_norm=g, grad_norm_nonfinite=gtag
                )
                conn.execute(
                    gins.on_conflict_do_update(
                        index_elements=["run_id", "step"], set_={"grad_norm": g, "grad_norm_nonfinite": gtag}
                    )
                )
            return self._run_records(conn, [row])[0]

        return self._write(tx)

    def reports(self, run_id: int) -> list[Report]:
        _int("run_id", run_id, minimum=0)
        g = sch.lb_grad_norms

        def tx(conn: Connection) -> list[Report]:
            if conn.execute(select(sch.lb_runs.c.run_id).where(sch.lb_runs.c.run_id == run_id)).first() is None:
                raise NotFound(f"run {run_id} not found")
            rows = conn.execute(
                select(
                    T_INTERMEDIATE.c.step,
                    T_INTERMEDIATE.c.intermediate_value,
                    T_INTERMEDIATE.c.intermediate_value_type,
                    g.c.grad_norm,
                    g.c.grad_norm_nonfinite,
                )
                .outerjoin(g, and_(g.c.run_id == T_INTERMEDIATE.c.trial_id, g.c.step == T_INTERMEDIATE.c.step))
                .where(T_INTERMEDIATE.c.trial_id == run_id)
                .order_by(T_INTERMEDIATE.c.step)
            )
            return [
                Report(
                    step=step,
                    loss=om.TrialIntermediateValueModel.stored_repr_to_intermediate_value(v, vt),
                    grad_norm=_from_nonfinite(gn, gtag),
                )
                for step, v, vt, gn, gtag in rows
            ]

        return self._read(tx)

    def complete_run(
        self,
        run_id: int,
        outcome: FinalOutcome,
        *,
        metric: float | None = None,
        reason: str | None = None,
        step: int | None = None,
    ) -> RunRecord:
        _int("run_id", run_id, minimum=0)
        if outcome not in FINAL_OUTCOMES:
            raise InvalidArgument(f"outcome must be one of {list(FINAL_OUTCOMES)}, got {outcome!r}")
        if outcome == "completed" and metric is None:
            raise InvalidArgument("metric is required when outcome is 'completed'")
        if metric is not None:
            if outcome not in ("completed", "pruned"):
                raise InvalidArgument(f"metric is only accepted for 'completed' or 'pruned', not {outcome!r}")
            metric = _float("metric", metric)
        if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            raise InvalidArgument(f"reason must be a string of at most {_MAX_REASON} characters")
        if step is not None:
            _int("step", step, minimum=0, maximum=2**62)
        r = sch.lb_runs

        def tx(conn: Connection) -> RunRecord:
            q = (
                select(*self._RUN_COLUMNS, sch.lb_studies.c.direction)
                .join(sch.lb_studies, sch.lb_studies.c.study_id == r.c.study_id)
                .where(r.c.run_id == run_id)
            )
            if self._pg:
                q = q.with_for_update(of=r)
            found = conn.execute(q).first()
            if found is None:
                raise NotFound(f"run {run_id} not found")
            row = dict(found._mapping)
            state = row["state"]
            reopenable = state == "preempted" and row["swept"] and outcome != "preempted"
            if state != "running" and not reopenable:
                if state == outcome and (metric is None or _same_metric(row["metric"], metric)):
                    return self._run_records(conn, [row])[0]  # retry of the same outcome: no-op
                raise Conflict(
                    f"run {run_id} already finished as {state}"
                    + (f" (metric {row['metric']})" if row["metric"] is not None else "")
                    + f"; cannot record {outcome}" + (f" (metric {metric})" if metric is not None else "")
                )
            now = _now()
            final_value: float | None = metric
            if outcome == "pruned" and metric is None and row["last_step"] is not None:
                last = _from_nonfinite(row["last_loss"], row["last_loss_nonfinite"])
                final_value = last if last is not None and math.isfinite(last) else None
            diverged_step = step if outcome == "diverged" else None
            changes = {
                "state": outcome,
                "swept": False,
                "metric": final_value,
                "reason": reason,
                "diverged_step": diverged_step,
                "updated_at": now,
                "lease_expires_at": None,
                "last_step": row["last_step"] if step is None else max(step, row["last_step"] or 0),
            }
            # The row is locked (FOR UPDATE / SQLite's writer lock); the state guard is a second belt.
            res = conn.execute(update(r).where(r.c.run_id == run_id, r.c.state == state).values(**changes))
            if res.rowcount != 1:  # pragma: no cover - cannot happen under the lock
                raise Conflict(f"run {run_id} changed concurrently; retry")
            row.update(changes)
            tstate = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(outcome, TrialState.FAIL)
            conn.execute(
                update(T_TRIALS).where(T_TRIALS.c.trial_id == run_id).values(state=tstate, datetime_complete=now)
            )
            if state != "running":  # a swept run being reopened: clear what the sweep wrote
                conn.execute(delete(T_VALUES).where(T_VALUES.c.trial_id == run_id))
                conn.execute(
                    delete(T_TRIAL_USER).where(
                        T_TRIAL_USER.c.trial_id == run_id, T_TRIAL_USER.c.key.in_(_OUTCOME_ATTRS)
                    )
                )
            if final_value is not None:
                v, vt = om.TrialValueModel.value_to_stored_repr(final_value)
                conn.execute(T_VALUES.insert().values(trial_id=run_id, objective=0, value=v, value_type=vt))
            attrs: dict[str, Any] = {"outcome": outcome}
            if reason is not None:
                attrs["reason"] = reason
            if diverged_step is not None:
                attrs["diverged_step"] = diverged_step
            elif step is not None:
                attrs["stopped_step"] = step
            conn.execute(
                T_TRIAL_USER.insert(),
                [{"trial_id": run_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()],
            )
            if outcome in ("completed", "diverged"):
                self._bump_summary(
                    conn, row["study_id"], row["batch_size"], row["direction"], outcome=outcome,
                    lr=row["peak_lr"], metric=metric,
                )
            return self._run_records(conn, [row])[0]

        return self._write(tx)

    def expire_leases(self, now: datetime | None = None, *, batch: int = 500) -> list[int]:
        cutoff = _now() if now is None else _naive_utc("now", now)
        _int("batch", batch, minimum=1, maximum=10_000)
        r = sch.lb_runs
        expired: list[int] = []

        def tx(conn: Connection) -> tuple[list[int], int]:
            candidates = select(r.c.run_id).where(r.c.state == "running", r.c.lease_expires_at < cutoff)
            candidates = candidates.order_by(r.c.lease_expires_at).limit(batch)
            if self._pg:
                candidates = candidates.with_for_update(skip_locked=True)
            ids = list(conn.execute(candidates).scalars())
            if not ids:
                return [], 0
            stamp = _now()
            done = list(
                conn.execute(
                    update(r)
                    .where(r.c.run_id.in_(ids), r.c.state == "running", r.c.lease_expires_at < cutoff)
                    .values(
                        state="preempted", swept=True, reason=_SWEPT_ATTRS["reason"], updated_at=stamp,
                        lease_expires_at=None,
                    )
                    .returning(r.c.run_id)
                ).scalars()
            )
            if done:
                conn.execute(
                    update(T_TRIALS)
                    .where(T_TRIALS.c.trial_id.in_(done))
                    .values(state=TrialState.FAIL, datetime_complete=stamp)
                )
                conn.execute(
                    delete(T_TRIAL_USER).where(
                        T_TRIAL_USER.c.trial_id.in_(done), T_TRIAL_USER.c.key.in_(_SWEPT_ATTRS)
                    )
                )
                conn.execute(
                    T_TRIAL_USER.insert(),
                    [
                        {"trial_id": t, "key": k, "value_json": json.dumps(v)}
                        for t in done
                        for k, v in _SWEPT_ATTRS.items()
                    ],
                )
            return done, len(ids)

        while True:
            done, n_candidates = self._write(tx)
            expired.extend(done)
            if n_candidates < batch:
                return sorted(expired)

    # --------------------------------------------------------------------------- history

    def history(self, namespace: str, study: str) -> list[BatchSummary]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        s, b = sch.lb_studies, sch.lb_batch_summary

        def tx(conn: Connection) -> list[BatchSummary]:
            rows = conn.execute(
                select(s.c.study_id, b)
                .select_from(s.outerjoin(b, b.c.study_id == s.c.study_id))
                .where(s.c.namespace == namespace, s.c.name == study)
                .order_by(b.c.batch_size)
            ).all()
            if not rows:
                raise NotFound(f"study {namespace}/{study} not found")
            return [_summary(r) for r in rows if r.batch_size is not None]

        return self._read(tx)

    def evidence(
        self,
        namespace: str,
        study: str,
        *,
        limit: int = 2000,
        family_band: tuple[str, int, int] | None = None,
    ) -> list[RunEvidence]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        _int("limit", limit, minimum=1)
        s, r = sch.lb_studies, sch.lb_runs

        def tx(conn: Connection) -> list[RunEvidence]:
            own = self._study_row(conn, namespace, study)
            scope = s.c.study_id == own.study_id
            if family_band is not None:
                family, lo, hi = family_band
                scope = or_(scope, and_(s.c.namespace == namespace, s.c.model_family == family,
                                        s.c.model_params >= lo, s.c.model_params <= hi,
                                        s.c.direction == own.direction))
            rows = conn.execute(
                select(r.c.run_id, r.c.batch_size, r.c.peak_lr, r.c.warmup_ratio, r.c.optimizer, r.c.state,
                       r.c.metric, s.c.model_params, s.c.name)
                .join(s, s.c.study_id == r.c.study_id)
                .where(scope, r.c.state.in_(("completed", "diverged")))
                .order_by(r.c.run_id.desc())
                .limit(limit)
            ).all()
            return [RunEvidence(batch_size=x.batch_size, lr=x.peak_lr, warmup_ratio=x.warmup_ratio,
                                optimizer=x.optimizer, outcome=x.state, metric=x.metric,
                                model_params=x.model_params, run_id=x.run_id, study=x.name) for x in rows]

        return self._read(tx)

    def family_history(
        self,
        family: str,
        min_params: int | None = None,
        max_params: int | None = None,
        *,
        namespace: str | None = None,
        metric: str | None = None,
        direction: Direction | None = None,
    ) -> list[BatchSummary]:
        """See :meth:`StudyStore.family_history`.

        ``metric`` keeps only studies reporting that metric. ``best_lr``/``best_metric`` merge the
        studies whose direction is ``direction`` (default: the direction shared by every matched
        study, or ``"minimize"`` when they disagree); counts and LR bounds merge all of them.
        """
        if not isinstance(family, str) or not family:
            raise InvalidArgument(f"family must be a non-empty string, got {family!r}")
        if min_params is not None:
            _int("min_params", min_params, minimum=0)
        if max_params is not None:
            _int("max_params", max_params, minimum=0)
        if min_params is not None and max_params is not None and min_params > max_params:
            raise InvalidArgument(f"min_params ({min_params}) must be <= max_params ({max_params})")
        if namespace is not None:
            validate_name("namespace", namespace)
        if direction is not None and direction not in ("minimize", "maximize"):
            raise InvalidArgument(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        s, b = sch.lb_studies, sch.lb_batch_summary

        def tx(conn: Connection) -> list[BatchSummary]:
            where = [s.c.model_family == family]
            if min_params is not None:
                where.append(s.c.model_params >= min_params)
            if max_params is not None:
                where.append(s.c.model_params <= max_params)
            if namespace is not None:
                where.append(s.c.namespace == namespace)
            if metric is not None:
                where.append(s.c.metric == metric)
            return conn.execute(
                select(s.c.direction, b).join(b, b.c.study_id == s.c.study_id).where(*where).order_by(b.c.batch_size)
            ).all()

        rows = self._read(tx)
        dirs = {r.direction for r in rows}
        want = direction or (dirs.pop() if len(dirs) == 1 else "minimize")
        merged: dict[int, dict[str, Any]] = {}
        for r in rows:
            m = merged.setdefault(
                r.batch_size,
                {"batch_size": r.batch_size, "n_runs": 0, "n_completed": 0, "n_diverged": 0, "best_lr": None,
                 "best_metric": None, "min_diverged_lr": None, "max_stable_lr": None, "n_studies": 0},
            )
            m["n_studies"] += 1
            m["n_runs"] += r.n_runs
            m["n_completed"] += r.n_completed
            m["n_diverged"] += r.n_diverged
            if r.min_diverged_lr is not None and (m["min_diverged_lr"] is None or r.min_diverged_lr < m["min_diverged_lr"]):
                m["min_diverged_lr"] = r.min_diverged_lr
            if r.max_stable_lr is not None and (m["max_stable_lr"] is None or r.max_stable_lr > m["max_stable_lr"]):
                m["max_stable_lr"] = r.max_stable_lr
            if (
                r.direction == want
                and r.best_metric is not None
                and _better(want, r.best_metric, r.best_lr, m["best_metric"], m["best_lr"])
            ):
                m["best_metric"], m["best_lr"] = r.best_metric, r.best_lr
        return [BatchSummary(**merged[k]) for k in sorted(merged)]

    def rebuild_summaries(self, namespace: str | None = None, study: str | None = None) -> int:
        """Recompute ``lb_batch_summary`` from the Optuna tables alone (trials, their
        ``batch_size``/``peak_lr`` params, values and ``outcome`` attrs)."""
        if (namespace is None) != (study is None):
            raise InvalidArgument("give both namespace and study, or neither")
        if namespace is not None:
            validate_name("namespace", namespace)
            validate_name("study", study)
        s = sch.lb_studies

        def study_ids(conn: Connection) -> list[tuple[int, str]]:
            q = select(s.c.study_id, s.c.direction).order_by(s.c.study_id)
            if namespace is not None:
                q = q.where(s.c.namespace == namespace, s.c.name == study)
            rows = [(r.study_id, r.direction) for r in conn.execute(q)]
            if namespace is not None and not rows:
                raise NotFound(f"study {namespace}/{study} not found")
            return rows

        total = 0
        for sid, direction in self._read(study_ids):
            total += self._write(lambda conn, sid=sid, direction=direction: self._rebuild_one(conn, sid, direction))
        return total

    def _rebuild_one(self, conn: Connection, study_id: int, direction: str) -> int:
        bs = T_PARAMS.alias("bs")
        lr = T_PARAMS.alias("lr")
        ov = T_VALUES.alias("ov")
        oa = T_TRIAL_USER.alias("oa")
        rows = conn.execute(
            select(T_TRIALS.c.state, bs.c.param_value, lr.c.param_value, ov.c.value, ov.c.value_type, oa.c.value_json)
            .join(bs, and_(bs.c.trial_id == T_TRIALS.c.trial_id, bs.c.param_name == "batch_size"))
            .join(lr, and_(lr.c.trial_id == T_TRIALS.c.trial_id, lr.c.param_name == "peak_lr"))
            .outerjoin(ov, and_(ov.c.trial_id == T_TRIALS.c.trial_id, ov.c.objective == 0))
            .outerjoin(oa, and_(oa.c.trial_id == T_TRIALS.c.trial_id, oa.c.key == "outcome"))
            .where(T_TRIALS.c.study_id == study_id)
        )
        acc: dict[int, dict[str, Any]] = {}
        for state, bsv, lrv, value, vtype, outcome_json in rows:
            outcome = json.loads(outcome_json) if outcome_json is not None else _STATE_OUTCOME.get(state, "failed")
            metric = None if value is None and vtype is None else om.TrialValueModel.stored_repr_to_value(value, vtype)
            fold_summary(acc, direction, round(bsv), outcome, float(lrv), metric)
        conn.execute(delete(sch.lb_batch_summary).where(sch.lb_batch_summary.c.study_id == study_id))
        if acc:
            conn.execute(sch.lb_batch_summary.insert(), [{"study_id": study_id, **v} for v in acc.values()])
        return len(acc)

    # --------------------------------------------------------------------------- API keys

    def create_api_key(self, namespace: str, scope: Scope = "write") -> tuple[int, str]:
        validate_name("namespace", namespace)
        if scope not in ("read", "write"):
            raise InvalidArgument(f"scope must be 'read' or 'write', got {scope!r}")
        plaintext = _KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(plaintext.encode()).hexdigest()

        def tx(conn: Connection) -> int:
            return conn.execute(
                sch.lb_api_keys.insert().values(
                    key_hash=digest, prefix=plaintext[:12], namespace=namespace, scope=scope, created_at=_now()
                )
            ).inserted_primary_key[0]

        return self._write(tx), plaintext

    @staticmethod
    def _key_record(row: Any) -> ApiKeyRecord:
        return ApiKeyRecord(
            id=row.key_id,
            namespace=row.namespace,
            scope=row.scope,
            created_at=_aware(row.created_at),
            revoked_at=_aware(row.revoked_at),
            prefix=row.prefix,
        )

    def list_api_keys(self, namespace: str | None = None) -> list[ApiKeyRecord]:
        if namespace is not None:
            validate_name("namespace", namespace)
        k = sch.lb_api_keys
        q = select(k).order_by(k.c.key_id)
        if namespace is not None:
            q = q.where(k.c.namespace == namespace)
        return self._read(lambda conn: [self._key_record(r) for r in conn.execute(q)])

    def revoke_api_key(self, key_id: int) -> ApiKeyRecord:
        _int("key_id", key_id, minimum=0)
        k = sch.lb_api_keys

        def tx(conn: Connection) -> ApiKeyRecord:
            conn.execute(update(k).where(k.c.key_id == key_id, k.c.revoked_at.is_(None)).values(revoked_at=_now()))
            row = conn.execute(select(k).where(k.c.key_id == key_id)).first()
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            return self._key_record(row)

        return self._write(tx)

    def lookup_api_key(self, plaintext: str) -> ApiKeyRecord | None:
        if not isinstance(plaintext, str) or not plaintext or len(plaintext) > 512:
            return None
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        k = sch.lb_api_keys

        def tx(conn: Connection) -> ApiKeyRecord | None:
            row = conn.execute(select(k).where(k.c.key_hash == digest, k.c.revoked_at.is_(None))).first()
            return None if row is None else self._key_record(row)

        return self._read(tx)

    # --------------------------------------------------------------------------- operations

    def ping(self) -> bool:
        return self._read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar() == 1)

    def schema_versions(self) -> dict[str, str]:
        return _versions(self._db)

    def close(self) -> None:
        self._db.dispose()

    # Extra, not in the ABC: the engine, for tests and tools that need raw access.
    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self._db.engine


# ---------------------------------------------------------------------------------- helpers

_STUDY_CORE_ATTRS = frozenset({"namespace", "name", "model_family", "model_params", "metric"})
_CACHE_SIZE = 4096
_OUTCOME_ATTRS = ("outcome", "reason", "diverged_step", "stopped_step")
# What the lease sweeper writes into a trial's user attrs (and a revival takes back out).
_SWEPT_ATTRS = {"outcome": "preempted", "reason": "lease expired"}
_STATE_OUTCOME = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "running",
    TrialState.COMPLETE: "completed",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def _run_record(m: Any, recipe_json: str, environment_json: str) -> RunRecord:
    return RunRecord(
        id=m["run_id"],
        study=m["study_name"],
        namespace=m["namespace"],
        number=m["number"],
        state=m["state"],
        batch_size=m["batch_size"],
        peak_lr=m["peak_lr"],
        warmup_ratio=m["warmup_ratio"],
        const_ratio=m["const_ratio"],
        optimizer=m["optimizer"],
        steps=m["steps"],
        recipe=json.loads(recipe_json),
        recipe_hash=m["recipe_hash"],
        environment=json.loads(environment_json),
        client_key=m["client_key"],
        metric=m["metric"],
        reason=m["reason"],
        diverged_step=m["diverged_step"],
        created_at=_aware(m["created_at"]),
        updated_at=_aware(m["updated_at"]),
        lease_expires_at=_aware(m["lease_expires_at"]),
        last_step=m["last_step"],
        last_loss=_from_nonfinite(m["last_loss"], m["last_loss_nonfinite"]),
    )


def _summary(row: Any) -> BatchSummary:
    return BatchSummary(
        batch_size=row.batch_size,
        n_runs=row.n_runs,
        n_completed=row.n_completed,
        n_diverged=row.n_diverged,
        best_lr=row.best_lr,
        best_metric=row.best_metric,
        min_diverged_lr=row.min_diverged_lr,
        max_stable_lr=row.max_stable_lr,
    )


def fold_summary(
    acc: dict[int, dict[str, Any]], direction: str, batch_size: int, outcome: str, lr: float, metric: float | None
) -> None:
    """The summary semantics, in Python (used by the rebuild; the upsert is its SQL twin).

    Every run counts in ``n_runs``; ``completed`` runs (with a metric) update ``best_*`` and
    ``max_stable_lr``; ``diverged`` runs update ``min_diverged_lr``. Failed, preempted, pruned and
    running runs say nothing about the LR.
    """
    m = acc.setdefault(
        batch_size,
        {"batch_size": batch_size, "n_runs": 0, "n_completed": 0, "n_diverged": 0, "best_lr": None,
         "best_metric": None, "min_diverged_lr": None, "max_stable_lr": None},
    )
    m["n_runs"] += 1
    if outcome == "completed" and metric is not None:
        m["n_completed"] += 1
        if _better(direction, metric, lr, m["best_metric"], m["best_lr"]):
            m["best_metric"], m["best_lr"] = metric, lr
        if m["max_stable_lr"] is None or lr > m["max_stable_lr"]:
            m["max_stable_lr"] = lr
    elif outcome == "diverged":
        m["n_diverged"] += 1
        if m["min_diverged_lr"] is None or lr < m["min_diverged_lr"]:
            m["min_diverged_lr"] = lr


def _optuna_children(parent: str) -> Iterable[tuple[Any, Any]]:
    """(table, fk column) of every Optuna table with a foreign key to ``parent`` (not trials)."""
    for table in om.BaseModel.metadata.sorted_tables:
        if table.name in ("trials", "studies"):
            continue
        for fk in table.foreign_keys:
            if fk.column.table.name == parent:
                yield table, fk.parent
