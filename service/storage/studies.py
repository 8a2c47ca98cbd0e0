"""Studies: create, read, list, delete (an Optuna study plus its ``lb_studies`` row)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, get_args

from optuna.study import StudyDirection
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _aware, _int, _json, _now, _page_args, _text
from largebatch.service.storage._queries import (
    T_DIRECTIONS,
    T_STUDIES,
    T_STUDY_SYSTEM,
    T_STUDY_USER,
    T_TRIALS,
    find_study,
    optuna_children,
)
from largebatch.service.storage.base import (
    AlreadyExists,
    Direction,
    InvalidArgument,
    Page,
    StudyRecord,
    validate_name,
)

__all__ = ["StudyOps"]

#: The study user attrs the store itself sets (the caller's ``user_attrs`` may not).
STUDY_CORE_ATTRS = frozenset({"namespace", "name", "model_family", "model_params", "metric"})


def _user_attrs(user_attrs: object) -> dict[str, Any]:
    if user_attrs is not None and not isinstance(user_attrs, dict):
        raise InvalidArgument(f"user_attrs must be a dict, got {type(user_attrs).__name__}")
    extra = dict(user_attrs or {})
    clash = sorted(set(extra) & STUDY_CORE_ATTRS)
    if clash:
        raise InvalidArgument(f"user_attrs must not set reserved keys {clash}")
    _json("user_attrs", extra)
    return extra


def _insert_study(conn: Connection, core: dict[str, Any], extra: dict[str, Any], direction: str,
                  now: datetime) -> int:
    """The Optuna study (direction, user attrs, metric name) and its ``lb_studies`` row."""
    namespace, name, metric = core["namespace"], core["name"], core["metric"]
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
        T_STUDY_SYSTEM.insert().values(study_id=study_id, key="study:metric_names", value_json=json.dumps([metric]))
    )
    conn.execute(
        sch.lb_studies.insert().values(
            study_id=study_id, namespace=namespace, name=name, model_family=core["model_family"],
            model_params=core["model_params"], metric=metric, direction=direction, created_at=now, n_runs=0,
        )
    )
    return study_id


class StudyOps:
    """The study operations of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read`` and
    ``_write``)."""

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
            if key not in STUDY_CORE_ATTRS:
                out[sid][key] = json.loads(value)
        return out

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
        _text("metric", metric)
        if direction not in get_args(Direction):
            raise InvalidArgument(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        extra = _user_attrs(user_attrs)
        core = {
            "namespace": namespace,
            "name": name,
            "model_family": model_family,
            "model_params": model_params,
            "metric": metric,
        }
        now = _now()
        try:
            study_id = self._write(lambda conn: _insert_study(conn, core, extra, direction, now))
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
            row = find_study(conn, namespace, name)
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
            return Page(items=[self._study_record(r, attrs[r.study_id]) for r in rows], total=total,
                        limit=limit, offset=offset)

        return self._read(tx)

    def delete_study(self, namespace: str, name: str) -> None:
        validate_name("namespace", namespace)
        validate_name("name", name)

        def tx(conn: Connection) -> None:
            sid = find_study(conn, namespace, name, for_update=True).study_id
            runs = select(sch.lb_runs.c.run_id).where(sch.lb_runs.c.study_id == sid).scalar_subquery()
            conn.execute(delete(sch.lb_grad_norms).where(sch.lb_grad_norms.c.run_id.in_(runs)))
            conn.execute(delete(sch.lb_noise_trajectory).where(sch.lb_noise_trajectory.c.run_id.in_(runs)))
            conn.execute(delete(sch.lb_critical_batches).where(sch.lb_critical_batches.c.study_id == sid))
            conn.execute(delete(sch.lb_batch_summary).where(sch.lb_batch_summary.c.study_id == sid))
            conn.execute(delete(sch.lb_runs).where(sch.lb_runs.c.study_id == sid))
            conn.execute(delete(sch.lb_studies).where(sch.lb_studies.c.study_id == sid))
            trials = select(T_TRIALS.c.trial_id).where(T_TRIALS.c.study_id == sid).scalar_subquery()
            for table, column in optuna_children("trials"):
                conn.execute(delete(table).where(column.in_(trials)))
            conn.execute(delete(T_TRIALS).where(T_TRIALS.c.study_id == sid))
            for table, column in optuna_children("studies"):
                conn.execute(delete(table).where(column == sid))
            conn.execute(delete(T_STUDIES).where(T_STUDIES.c.study_id == sid))

        self._write(tx)
