"""A running job's reports: written a batch per transaction, read by keyset on (run, step) and summarised
into a bounded curve, all through Optuna's ``trial_intermediate_values`` (unique on trial and step: the
index every query here walks) and our ``lb_grad_norms``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from optuna.storages._rdb import models as om
from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.engine import Connection

from largebatch.service.lru import Lru
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import (
    MAX_INT,
    _float,
    _from_nonfinite,
    _int,
    _noise_scale,
    _nonfinite_repr,
    _now,
)
from largebatch.service.storage._queries import T_INTERMEDIATE, T_TRIAL_USER, find_study
from largebatch.service.storage.records import NoisePoint, NotFound, Report, RunRecord, validate_name
from largebatch.service.storage.trajectory import checked_point

__all__ = ["MAX_REPORT_PAGE", "NOISE_KEY", "ReportOps", "ReportRow"]

NOISE_KEY = "noise_scale"  # the run's latest B_noise, an Optuna trial user attr (it changes: not cached)
MAX_REPORT_PAGE = 10_000
# step, loss, grad_norm, noise_scale[, NoisePoint: where the noise scale sits on the run's trajectory]
_Checked = tuple[int, float, "float | None", "float | None", "NoisePoint | None"]
ReportRow = tuple[int, float, "float | None", "float | None"] | _Checked
_COUNT_CACHE = 4096
_TO_STORED = om.TrialIntermediateValueModel.intermediate_value_to_stored_repr
_FROM_STORED = om.TrialIntermediateValueModel.stored_repr_to_intermediate_value


def _checked(rows: Sequence[ReportRow]) -> list[_Checked]:
    """Checked and de-duplicated by step (the later of two reports of one step wins), in step order."""
    by_step: dict[int, _Checked] = {}
    for row in rows:
        step, loss, grad_norm, noise = row[:4]
        _int("step", step, minimum=0, maximum=MAX_INT)
        by_step[step] = (step, _float("loss", loss, finite=False),
                         None if grad_norm is None else _float("grad_norm", grad_norm, finite=False),
                         None if noise is None else _noise_scale(noise),
                         checked_point(row[4] if len(row) > 4 else None))
    return [by_step[s] for s in sorted(by_step)]


class ReportOps:
    """The report operations of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read``,
    ``_write``, ``_insert``, ``_lock_running`` and ``_run_records``)."""

    def _init_report_counts(self) -> None:
        # (run_id, updated_at) -> number of reports: a finished run's count is read once.
        self._report_counts: Lru[tuple[int, datetime], int] = Lru(_COUNT_CACHE)

    def report(self, run_id: int, step: int, loss: float, grad_norm: float | None = None,
               noise_scale: float | None = None) -> RunRecord:
        return self.report_batch(run_id, [(step, loss, grad_norm, noise_scale)])

    def report_batch(self, run_id: int, reports: Sequence[ReportRow]) -> RunRecord:
        _int("run_id", run_id, minimum=0)
        rows = _checked(reports)
        if not rows:
            return self.get_run(run_id)  # type: ignore[attr-defined]
        r = sch.lb_runs
        g = sch.lb_grad_norms

        def tx(conn: Connection) -> RunRecord:
            # The row is locked (FOR UPDATE on PostgreSQL, the writer lock on SQLite), so the
            # "newest step wins" decision can be made here.
            row = self._lock_running(conn, run_id, "report")  # type: ignore[attr-defined]
            now = _now()
            changes: dict[str, Any] = {"updated_at": now,
                                       "lease_expires_at": now + timedelta(seconds=row["lease_seconds"])}
            newest = rows[-1]
            if row["last_step"] is None or row["last_step"] <= newest[0]:
                stored_loss, loss_tag = _nonfinite_repr(newest[1])
                changes.update(last_step=newest[0], last_loss=stored_loss, last_loss_nonfinite=loss_tag)
                noises = [x for x in rows if x[3] is not None and (row["last_step"] is None or x[0] >= row["last_step"])]
                if noises:
                    value_json = json.dumps(noises[-1][3])
                    conn.execute(self._insert(T_TRIAL_USER).values(  # type: ignore[attr-defined]
                        trial_id=run_id, key=NOISE_KEY, value_json=value_json)
                        .on_conflict_do_update(index_elements=["trial_id", "key"], set_={"value_json": value_json}))
            conn.execute(update(r).where(r.c.run_id == run_id).values(**changes))
            row.update(changes)
            values = []
            for step, loss, *_ in rows:
                v, vt = _TO_STORED(loss)
                values.append({"trial_id": run_id, "step": step, "intermediate_value": v, "intermediate_value_type": vt})
            ins = self._insert(T_INTERMEDIATE)  # type: ignore[attr-defined]
            conn.execute(ins.on_conflict_do_update(
                index_elements=["trial_id", "step"],
                set_={"intermediate_value": ins.excluded.intermediate_value,
                      "intermediate_value_type": ins.excluded.intermediate_value_type}), values)
            without = [step for step, _, gn, *_ in rows if gn is None]
            if without:
                conn.execute(delete(g).where(g.c.run_id == run_id, g.c.step.in_(without)))
            norms = []
            for step, _, gn, *_ in rows:
                if gn is not None:
                    value, tag = _nonfinite_repr(gn)
                    norms.append({"run_id": run_id, "step": step, "grad_norm": value, "grad_norm_nonfinite": tag})
            if norms:
                gins = self._insert(g)  # type: ignore[attr-defined]
                conn.execute(gins.on_conflict_do_update(
                    index_elements=["run_id", "step"],
                    set_={"grad_norm": gins.excluded.grad_norm, "grad_norm_nonfinite": gins.excluded.grad_norm_nonfinite}),
                    norms)
            self._add_to_trajectory(conn, run_id, [(x[0], x[3], x[4]) for x in rows])  # type: ignore[attr-defined]
            return self._run_records(conn, [row])[0]  # type: ignore[attr-defined]

        return self._write(tx)  # type: ignore[attr-defined]

    def noise_scale(self, namespace: str, study: str) -> float | None:
        validate_name("namespace", namespace)
        validate_name("study", study)
        r = sch.lb_runs

        def tx(conn: Connection) -> float | None:
            sid = find_study(conn, namespace, study).study_id
            # Driven from the study's runs (their index), never from every run's attributes.
            values = [json.loads(v) for (v,) in conn.execute(
                select(T_TRIAL_USER.c.value_json)
                .select_from(r.join(T_TRIAL_USER, and_(T_TRIAL_USER.c.trial_id == r.c.run_id,
                                                       T_TRIAL_USER.c.key == NOISE_KEY)))
                .where(r.c.study_id == sid))]
            return statistics.median(values) if values else None

        return self._read(tx)  # type: ignore[attr-defined]

    def reports(self, run_id: int, *, after_step: int | None = None, offset: int = 0,
                limit: int | None = None) -> list[Report]:
        _int("run_id", run_id, minimum=0)
        if after_step is not None:
            _int("after_step", after_step, minimum=-1, maximum=MAX_INT)
        _int("offset", offset, minimum=0)
        if limit is not None:
            _int("limit", limit, minimum=1)
        g = sch.lb_grad_norms
        iv = T_INTERMEDIATE

        def tx(conn: Connection) -> list[Report]:
            self._check_run(conn, run_id)
            query = (select(iv.c.step, iv.c.intermediate_value, iv.c.intermediate_value_type, g.c.grad_norm,
                            g.c.grad_norm_nonfinite)
                     .outerjoin(g, and_(g.c.run_id == iv.c.trial_id, g.c.step == iv.c.step))
                     .where(iv.c.trial_id == run_id))
            if after_step is not None:
                query = query.where(iv.c.step > after_step)
            query = query.order_by(iv.c.step).offset(offset or None).limit(limit)
            return [Report(step=step, loss=_FROM_STORED(v, vt), grad_norm=_from_nonfinite(gn, gtag))
                    for step, v, vt, gn, gtag in conn.execute(query)]

        return self._read(tx)  # type: ignore[attr-defined]

    def report_count(self, run_id: int) -> int:
        _int("run_id", run_id, minimum=0)

        def tx(conn: Connection) -> int:
            updated = self._check_run(conn, run_id)
            key = (run_id, updated)
            known = self._report_counts.get(key)
            if known is not None:
                return known
            n = conn.execute(select(func.count()).select_from(T_INTERMEDIATE)
                             .where(T_INTERMEDIATE.c.trial_id == run_id)).scalar_one()
            return self._report_counts.put(key, n)

        return self._read(tx)  # type: ignore[attr-defined]

    def report_curve(self, run_id: int, buckets: int) -> list[tuple[int, int, float, float, int]]:
        _int("run_id", run_id, minimum=0)
        _int("buckets", buckets, minimum=1, maximum=MAX_REPORT_PAGE)
        iv = T_INTERMEDIATE

        def tx(conn: Connection) -> list[tuple[int, int, float, float, int]]:
            self._check_run(conn, run_id)
            lo, hi = conn.execute(select(func.min(iv.c.step), func.max(iv.c.step)).where(iv.c.trial_id == run_id)).one()
            if lo is None:
                return []
            width = max(1, -(-(hi - lo + 1) // buckets))
            finite = iv.c.intermediate_value_type == om.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
            bucket = (iv.c.step - lo) // width
            rows = conn.execute(
                select(func.min(iv.c.step), func.max(iv.c.step),
                       func.min(iv.c.intermediate_value).filter(finite), func.max(iv.c.intermediate_value).filter(finite),
                       func.count().filter(~finite))
                .where(iv.c.trial_id == run_id).group_by(bucket).order_by(func.min(iv.c.step)))
            return [(a, b, lo_v, hi_v, bad) for a, b, lo_v, hi_v, bad in rows]

        return self._read(tx)  # type: ignore[attr-defined]

    @staticmethod
    def _check_run(conn: Connection, run_id: int) -> datetime:
        found = conn.execute(select(sch.lb_runs.c.updated_at).where(sch.lb_runs.c.run_id == run_id)).first()
        if found is None:
            raise NotFound(f"run {run_id} not found")
        return found[0]
