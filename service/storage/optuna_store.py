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
noise trajectory       ``lb_noise_trajectory``: B_noise by examples seen, binned (:mod:`.trajectory`)
measured B_crit        ``lb_critical_batches``: branch probes' critical batches (:mod:`.critical_batches`)
=====================  ======================================================================

Stock Optuna tools may *read* the store (``optuna.load_study``, ``optuna-dashboard`` behind
read-only auth). Writing to a store-managed study through plain Optuna (``study.ask``/``tell``,
the dashboard's tell button) is not supported: those trials get no ``lb_runs`` row and would
reuse trial numbers. Importing past results with ``study.add_trial`` followed by
:meth:`OptunaStudyStore.rebuild_summaries` does feed the summaries, but such trials are not runs.

The store is split by aggregate, each part in its own module: studies (:mod:`.studies`), runs
(:mod:`.runs`) and how they end (:mod:`.outcomes`), summaries and evidence (:mod:`.summaries`),
API keys (:mod:`.api_keys`, their own :class:`ApiKeyStore`), Optuna schema set-up
(:mod:`.optuna_setup`); the queries several parts share are in :mod:`._queries`, argument checks
in :mod:`._checks`. :class:`OptunaStudyStore` puts them together.

Each store operation is exactly one database transaction, so an Optuna trial and our row for it
are written together or not at all (a crash or a kill between "two writes" cannot happen).
Trial numbers come from the ``lb_studies.n_runs`` counter, updated first in the transaction;
that row lock serialises run creation within one study the way Optuna's ``SELECT ... FOR UPDATE``
on the study does, without Optuna's ``COUNT(*)`` of past trials.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from largebatch.service.storage._checks import _now  # noqa: F401
from largebatch.service.storage._db import Database, default_url

# Optuna's tables and the recorded search space, re-exported for tools that write rows directly
# (benchmarks/store.py seeds large stores this way).
from largebatch.service.storage._queries import (  # noqa: F401
    _DIST_JSON,
    DISTRIBUTIONS,
    IVT,
    T_INTERMEDIATE,
    T_PARAMS,
    T_TRIAL_USER,
    T_TRIALS,
    T_VALUES,
    VT,
)
from largebatch.service.storage.api_keys import SqlApiKeyStore
from largebatch.service.storage.base import ApiKeyRecord, Scope, StoreUnavailable, StudyStore
from largebatch.service.storage.critical_batches import CriticalBatchOps
from largebatch.service.storage.evidence import EvidenceOps
from largebatch.service.storage.optuna_setup import initialize as _initialize
from largebatch.service.storage.optuna_setup import initialize_schema, schema_is_current, versions
from largebatch.service.storage.outcomes import OutcomeOps
from largebatch.service.storage.reports import ReportOps
from largebatch.service.storage.runs import RunOps
from largebatch.service.storage.studies import StudyOps
from largebatch.service.storage.summaries import SummaryOps, fold_summary  # noqa: F401
from largebatch.service.storage.trajectory import TrajectoryOps

__all__ = ["OptunaStudyStore", "default_url", "initialize_schema", "open_store"]


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
            ``busy_deadline_s``, ``statement_timeout_s`` (PostgreSQL: cancel any statement after it;
            :class:`StoreUnavailable`).
    """
    return OptunaStudyStore(url, initialize=initialize, **options)


class OptunaStudyStore(StudyOps, RunOps, ReportOps, TrajectoryOps, CriticalBatchOps, OutcomeOps, SummaryOps,
                       EvidenceOps, StudyStore):
    """:class:`StudyStore` on an Optuna RDB schema (SQLite file, PostgreSQL, or SQLite in memory).

    The operations come from one part per aggregate; this class owns what they share: the
    :class:`Database` (one transaction per operation), the dialect's upsert, and the run-record
    cache. API keys are a store of their own (:attr:`api_keys`) on the same database.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        initialize: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        busy_timeout_s: float = 5.0,
        busy_deadline_s: float = 60.0,
        statement_timeout_s: float | None = None,
    ) -> None:
        self._db = Database(
            url, engine_kwargs=engine_kwargs, busy_timeout_s=busy_timeout_s, busy_deadline_s=busy_deadline_s
        )
        self.url = self._db.url
        self.kind = self._db.kind
        try:
            if initialize or self.kind == "memory":
                _initialize(self._db)
            elif not schema_is_current(self._db):
                raise StoreUnavailable(
                    f"the schema of {self._db.engine.url!r} is missing or outdated: run initialize_schema(url)"
                )
        except BaseException:
            self._db.dispose()
            raise
        if statement_timeout_s is not None:
            self._db.set_statement_timeout(statement_timeout_s)
        self._pg = self._db.engine.dialect.name == "postgresql"
        self._insert = pg_insert if self._pg else sqlite_insert
        self._init_cache()
        self._init_report_counts()
        self.api_keys = SqlApiKeyStore(self._db)

    def __repr__(self) -> str:
        return f"OptunaStudyStore({self._db.engine.url!r})"

    def _write(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=True)

    def _read(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=False)

    # --------------------------------------------------------------------------- API keys

    def create_api_key(self, namespace: str, scope: Scope = "write") -> tuple[int, str]:
        return self.api_keys.create_api_key(namespace, scope)

    def list_api_keys(self, namespace: str | None = None) -> list[ApiKeyRecord]:
        return self.api_keys.list_api_keys(namespace)

    def revoke_api_key(self, key_id: int) -> ApiKeyRecord:
        return self.api_keys.revoke_api_key(key_id)

    def lookup_api_key(self, plaintext: str) -> ApiKeyRecord | None:
        return self.api_keys.lookup_api_key(plaintext)

    # --------------------------------------------------------------------------- operations

    def ping(self, *, write: bool = False) -> bool:
        path = self._db.sqlite_path
        if self._db.kind == "sqlite" and path is not None and not os.path.exists(path):
            raise StoreUnavailable(f"the database file {path} is gone")  # not recreated empty
        if write:  # takes the write lock (and the write queue) and changes nothing
            return self._write(lambda conn: conn.exec_driver_sql(
                "UPDATE lb_studies SET n_runs = n_runs WHERE 1 = 0").rowcount == 0)
        return self._read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar() == 1)

    def schema_versions(self) -> dict[str, str]:
        return versions(self._db)

    def close(self) -> None:
        self._db.dispose()

    # Extra, not in the ABC: the engine, for tests and tools that need raw access.
    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self._db.engine
