"""The query layer: the tables the store reads and writes, and the few queries its parts share.

Optuna's tables are used through Optuna's own declarative models (``optuna.storages._rdb.models``),
so what we write is what ``optuna.load_study`` reads. Ours are in :mod:`._schema`. Each query that
more than one aggregate needs is written here once: find a study, the runs join (every ``lb_runs``
column plus the study's namespace and name), the locked run, a run by its client key, and the
writes of trial user attributes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, get_args

from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.storages._rdb import models as om
from sqlalchemy import Select, delete, select
from sqlalchemy.engine import Connection, Row

from largebatch.scaling_rules.models import RecipeOptimizerName
from largebatch.service.storage import _schema as sch
from largebatch.service.storage.base import NotFound

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

_s, _r = sch.lb_studies, sch.lb_runs
#: The columns of a run record: every ``lb_runs`` column plus the study's namespace and name.
RUN_COLUMNS = (_r, _s.c.namespace, _s.c.name.label("study_name"))


def find_study(conn: Connection, namespace: str, name: str, *, for_update: bool = False) -> Row:
    """The study's ``lb_studies`` row; NotFound if there is none."""
    q = select(_s).where(_s.c.namespace == namespace, _s.c.name == name)
    if for_update:
        q = q.with_for_update()
    row = conn.execute(q).first()
    if row is None:
        raise NotFound(f"study {namespace}/{name} not found")
    return row


def runs_join(*extra: Any) -> Select:
    """``SELECT`` :data:`RUN_COLUMNS` (plus ``extra``) ``FROM lb_runs JOIN lb_studies``."""
    return select(*RUN_COLUMNS, *extra).join(_s, _s.c.study_id == _r.c.study_id)


def locked_run(conn: Connection, run_id: int, *, lock: bool) -> dict[str, Any]:
    """The run's columns (:data:`RUN_COLUMNS` plus the study's ``direction``), its ``lb_runs`` row
    locked ``FOR UPDATE`` when ``lock`` (PostgreSQL; SQLite's writer lock already serialises);
    NotFound if there is no such run."""
    q = runs_join(_s.c.direction).where(_r.c.run_id == run_id)
    if lock:
        q = q.with_for_update(of=_r)
    row = conn.execute(q).first()
    if row is None:
        raise NotFound(f"run {run_id} not found")
    return dict(row._mapping)


def run_id_by_client_key(conn: Connection, namespace: str, study: str, client_key: str) -> int | None:
    return conn.execute(
        select(_r.c.run_id)
        .join(_s, _s.c.study_id == _r.c.study_id)
        .where(_s.c.namespace == namespace, _s.c.name == study, _r.c.client_key == client_key)
    ).scalar()


def write_trial_attrs(conn: Connection, trial_ids: Iterable[int], attrs: Mapping[str, Any]) -> None:
    """Insert Optuna trial user attributes (JSON values) for each trial."""
    rows = [{"trial_id": t, "key": k, "value_json": json.dumps(v)} for t in trial_ids for k, v in attrs.items()]
    if rows:
        conn.execute(T_TRIAL_USER.insert(), rows)


def delete_trial_attrs(conn: Connection, trial_ids: Iterable[int], keys: Iterable[str]) -> None:
    conn.execute(
        delete(T_TRIAL_USER).where(T_TRIAL_USER.c.trial_id.in_(list(trial_ids)), T_TRIAL_USER.c.key.in_(list(keys)))
    )


def optuna_children(parent: str) -> Iterable[tuple[Any, Any]]:
    """(table, fk column) of every Optuna table with a foreign key to ``parent`` (not trials)."""
    for table in om.BaseModel.metadata.sorted_tables:
        if table.name in ("trials", "studies"):
            continue
        for fk in table.foreign_keys:
            if fk.column.table.name == parent:
                yield table, fk.parent
