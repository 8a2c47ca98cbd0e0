"""How runs end: the job's final outcome (:meth:`OutcomeOps.complete_run`), the lease sweeper's
``preempted`` (:meth:`OutcomeOps.expire_leases`), and the revival of a swept run whose job speaks.

Optuna sees each outcome as a trial state plus user attrs (see :mod:`.optuna_store`); the summary
fold is bumped in the same transaction.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from optuna.storages._rdb import models as om
from optuna.trial import TrialState
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import (
    MAX_INT,
    MAX_REASON,
    _float,
    _from_nonfinite,
    _int,
    _naive_utc,
    _now,
    _same_metric,
    _text,
)
from largebatch.service.storage._queries import (
    T_TRIALS,
    T_VALUES,
    delete_trial_attrs,
    locked_run,
    write_trial_attrs,
)
from largebatch.service.storage.base import (
    FINAL_OUTCOMES,
    Conflict,
    InvalidArgument,
    RunRecord,
    StoredOutcome,
)

__all__ = ["SWEPT_ATTRS", "OutcomeOps"]

_OUTCOME_ATTRS = ("outcome", "reason", "diverged_step", "stopped_step")
#: What the lease sweeper writes into a trial's user attrs (and a revival takes back out).
SWEPT_ATTRS = {"outcome": "preempted", "reason": "lease expired"}
_TRIAL_STATE = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED}  # else FAIL


def _check_outcome(outcome: object, metric: object, reason: object, step: object) -> float | None:
    if outcome not in FINAL_OUTCOMES:
        raise InvalidArgument(f"outcome must be one of {list(FINAL_OUTCOMES)}, got {outcome!r}")
    if outcome == "completed" and metric is None:
        raise InvalidArgument("metric is required when outcome is 'completed'")
    if metric is not None:
        if outcome not in ("completed", "pruned"):
            raise InvalidArgument(f"metric is only accepted for 'completed' or 'pruned', not {outcome!r}")
        metric = _float("metric", metric)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InvalidArgument(f"reason must be a string of at most {MAX_REASON} characters")
    if reason is not None:
        _text("reason", reason)
    if step is not None:
        _int("step", step, minimum=0, maximum=MAX_INT)
    return metric  # type: ignore[return-value]


def _same_complete(row: dict[str, Any], metric: float | None, reason: str | None, step: int | None) -> bool:
    """A repeated complete says nothing new: each field it gives equals what is recorded (a field it
    leaves out is not compared; a retry may say less, never something else)."""
    if metric is not None and not _same_metric(row["metric"], metric):
        return False
    if reason is not None and reason != row["reason"]:
        return False
    if step is None:
        return True
    if row["state"] == "diverged":
        return step == row["diverged_step"]
    return row["last_step"] is not None and step <= row["last_step"]  # the first complete's step was folded in


class OutcomeOps:
    """The outcome operations of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read``,
    ``_write``, ``_pg``, ``_run_records`` and ``_bump_summary``)."""

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
        delete_trial_attrs(conn, [run_id], SWEPT_ATTRS)
        row.update(changes)
        return row

    def complete_run(
        self,
        run_id: int,
        outcome: StoredOutcome,
        *,
        metric: float | None = None,
        reason: str | None = None,
        step: int | None = None,
    ) -> RunRecord:
        _int("run_id", run_id, minimum=0)
        metric = _check_outcome(outcome, metric, reason, step)

        def tx(conn: Connection) -> RunRecord:
            row = locked_run(conn, run_id, lock=self._pg)
            state = row["state"]
            reopenable = state == "preempted" and row["swept"] and outcome != "preempted"
            if state != "running" and not reopenable:
                if state == outcome and _same_complete(row, metric, reason, step):
                    return self._run_records(conn, [row])[0]  # retry of the same complete: no-op
                raise Conflict(
                    f"run {run_id} already finished as {state}"
                    + (f" (metric {row['metric']})" if row["metric"] is not None else "")
                    + f"; cannot record {outcome}" + (f" (metric {metric})" if metric is not None else "")
                )
            self._finish(conn, row, outcome, metric, reason, step)
            if outcome in ("completed", "diverged"):
                self._bump_summary(
                    conn, row["study_id"], row["batch_size"], row["direction"], optimizer=row["optimizer"],
                    outcome=outcome, lr=row["peak_lr"], metric=metric,
                )
            return self._run_records(conn, [row])[0]

        return self._write(tx)

    def _finish(self, conn: Connection, row: dict[str, Any], outcome: str, metric: float | None,
                reason: str | None, step: int | None) -> None:
        """Write the final outcome into ``lb_runs`` and the Optuna trial; ``row`` is updated."""
        run_id, state, now = row["run_id"], row["state"], _now()
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
        r = sch.lb_runs
        # The row is locked (FOR UPDATE / SQLite's writer lock); the state guard is a second belt.
        res = conn.execute(update(r).where(r.c.run_id == run_id, r.c.state == state).values(**changes))
        if res.rowcount != 1:  # pragma: no cover - cannot happen under the lock
            raise Conflict(f"run {run_id} changed concurrently; retry")
        row.update(changes)
        tstate = _TRIAL_STATE.get(outcome, TrialState.FAIL)
        conn.execute(update(T_TRIALS).where(T_TRIALS.c.trial_id == run_id).values(state=tstate, datetime_complete=now))
        if state != "running":  # a swept run being reopened: clear what the sweep wrote
            conn.execute(delete(T_VALUES).where(T_VALUES.c.trial_id == run_id))
            delete_trial_attrs(conn, [run_id], _OUTCOME_ATTRS)
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
        write_trial_attrs(conn, [run_id], attrs)

    def expire_leases(self, now: datetime | None = None, *, batch: int = 500) -> list[int]:
        cutoff = _now() if now is None else _naive_utc("now", now)
        _int("batch", batch, minimum=1, maximum=10_000)
        expired: list[int] = []
        while True:
            done, n_candidates = self._write(lambda conn: self._sweep(conn, cutoff, batch))
            expired.extend(done)
            if n_candidates < batch:
                return sorted(expired)

    def _sweep(self, conn: Connection, cutoff: datetime, batch: int) -> tuple[list[int], int]:
        """Preempt up to ``batch`` runs whose lease expired before ``cutoff``: (their ids, candidates)."""
        r = sch.lb_runs
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
                .values(state="preempted", swept=True, reason=SWEPT_ATTRS["reason"], updated_at=stamp,
                        lease_expires_at=None)
                .returning(r.c.run_id)
            ).scalars()
        )
        if done:
            conn.execute(
                update(T_TRIALS).where(T_TRIALS.c.trial_id.in_(done)).values(state=TrialState.FAIL,
                                                                             datetime_complete=stamp)
            )
            delete_trial_attrs(conn, done, SWEPT_ATTRS)
            write_trial_attrs(conn, done, SWEPT_ATTRS)
        return done, len(ids)
