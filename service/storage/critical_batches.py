"""Critical batches measured by branching (``job.branch_probe``), kept in ``lb_critical_batches``.

A measurement is study evidence: it calibrates the streaming statistic (B_noise) the study's trajectories
give (:mod:`largebatch.service.critical_batch`). Bounded: a run keeps at most
:data:`~largebatch.scaling_rules.wire.MAX_MEASURED_PER_RUN`, one per step (the same measurement sent again,
after a lost answer, is the stored one; another at that step is a conflict), and a read takes the study's
newest :data:`MAX_MEASURED_READ` by the ``(study_id, id)`` index.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from largebatch.scaling_rules.wire import MAX_MEASURED_PER_RUN, MeasuredCriticalBatch, MeasuredCriticalBatchIn
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _aware, _int, _now
from largebatch.service.storage._queries import find_study
from largebatch.service.storage.records import Conflict, InvalidArgument, validate_name

__all__ = ["MAX_MEASURED_READ", "CriticalBatchOps"]

MAX_MEASURED_READ = 256  # the most measurements one read returns (the study's newest)
_FIELDS = tuple(f for f in MeasuredCriticalBatchIn.model_fields if f != "ks")


def checked(measurement: object) -> MeasuredCriticalBatchIn:
    """The measurement validated again (a model built without validation is checked too)."""
    if not isinstance(measurement, MeasuredCriticalBatchIn):
        raise InvalidArgument(f"a measured critical batch must be a MeasuredCriticalBatchIn, got {measurement!r}")
    try:
        return MeasuredCriticalBatchIn.model_validate(dict(measurement))
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidArgument(f"{'.'.join(map(str, err['loc'])) or 'measurement'}: {err['msg']}") from None


def _record(row: Any) -> MeasuredCriticalBatch:
    m = row._mapping
    return MeasuredCriticalBatch(id=m["id"], run_id=m["run_id"], ks=[int(k) for k in m["ks"].split(",")],
                                 created_at=_aware(m["created_at"]), **{f: m[f] for f in _FIELDS})


class CriticalBatchOps:
    """The measured critical batches of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read``,
    ``_write`` and the runs part's ``_lock_running``)."""

    def add_critical_batch(self, run_id: int, measurement: MeasuredCriticalBatchIn
                           ) -> tuple[MeasuredCriticalBatch, bool, bool]:
        _int("run_id", run_id, minimum=0)
        m = checked(measurement)
        t = sch.lb_critical_batches

        def tx(conn: Connection) -> tuple[MeasuredCriticalBatch, bool, bool]:
            run = self._lock_running(conn, run_id, "record a measured critical batch")  # type: ignore[attr-defined]
            revived = run.get("revived", False)
            if revived:  # the sweeper took its lease: a live run needs one again, or no sweep would ever see it
                r = sch.lb_runs
                now = _now()
                conn.execute(update(r).where(r.c.run_id == run_id).values(
                    updated_at=now, lease_expires_at=now + timedelta(seconds=run["lease_seconds"])))
            same_step = conn.execute(select(t).where(t.c.run_id == run_id, t.c.step == m.step)).first()
            if same_step is not None:
                old = _record(same_step)
                if old.model_dump(include={*_FIELDS, "ks"}) == m.model_dump():
                    return old, False, revived
                raise Conflict(f"run {run_id} already has a different measured critical batch at step {m.step}")
            n = conn.execute(select(func.count()).select_from(t).where(t.c.run_id == run_id)).scalar_one()
            if n >= MAX_MEASURED_PER_RUN:
                raise Conflict(f"run {run_id} already has {n} measured critical batches, the most a run keeps "
                               f"({MAX_MEASURED_PER_RUN})")
            fields = {f: getattr(m, f) for f in _FIELDS}
            now = _now()
            new_id = conn.execute(t.insert().values(**fields, ks=",".join(map(str, m.ks)), run_id=run_id,
                                                    study_id=run["study_id"], created_at=now)).inserted_primary_key[0]
            stored = MeasuredCriticalBatch(id=new_id, run_id=run_id, ks=m.ks, created_at=_aware(now), **fields)
            return stored, True, revived

        return self._write(tx)  # type: ignore[attr-defined]

    def measured_critical_batches(self, namespace: str, study: str, *, limit: int = MAX_MEASURED_READ
                                  ) -> tuple[int, list[MeasuredCriticalBatch]]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        _int("limit", limit, minimum=1, maximum=MAX_MEASURED_READ)
        t = sch.lb_critical_batches

        def tx(conn: Connection) -> tuple[int, list[MeasuredCriticalBatch]]:
            sid = find_study(conn, namespace, study).study_id
            total = conn.execute(select(func.count()).select_from(t).where(t.c.study_id == sid)).scalar_one()
            rows = conn.execute(select(t).where(t.c.study_id == sid).order_by(t.c.id.desc()).limit(limit)).all()
            return total, [_record(r) for r in rows]

        return self._read(tx)  # type: ignore[attr-defined]
