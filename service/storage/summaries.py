"""The per-batch-size summaries and the evidence the recommender reads.

The summary of a (study, batch size, LR units) is a fold over its runs (:class:`BatchSummary`). It is
kept up to date by one upsert per event (:meth:`SummaryOps._bump_summary`: the fold in SQL) and can be
recomputed from the Optuna tables alone (:func:`fold_summary`: the same fold in Python, used by
:func:`rebuild_study`); the two twins sit side by side here so that they cannot drift apart, and
:func:`merge_family` merges the summaries of several studies with the same comparison (:func:`_better`).
A run's LR units are ``optimizers.run_units`` of the optimizer it names (the store knows no reference,
so a run naming none is in ``UNNAMED_UNITS``): the rule ``EvidenceModel.in_units_of`` reads runs by.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, get_args

from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages._rdb import models as om
from optuna.trial import TrialState
from sqlalchemy import and_, case, delete, literal, or_, select
from sqlalchemy.engine import Connection

from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.scaling_rules.optimizers import run_units
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _int
from largebatch.service.storage._queries import T_PARAMS, T_TRIAL_USER, T_TRIALS, T_VALUES, find_study
from largebatch.service.storage.base import Direction, InvalidArgument, NotFound, validate_name

__all__ = ["STATE_OUTCOME", "SummaryOps", "fold_summary", "merge_family", "rebuild_all", "rebuild_study"]

#: The outcome of an Optuna trial without an ``outcome`` attribute (one imported with ``add_trial``).
STATE_OUTCOME = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "running",
    TrialState.COMPLETE: "completed",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def _better(direction: str, metric: float, lr: float, best_metric: float | None, best_lr: float | None) -> bool:
    """Strictly better metric wins; on a tie the smaller LR (deterministic whatever the order)."""
    if best_metric is None:
        return True
    if metric == best_metric:
        return best_lr is None or lr < best_lr
    return metric < best_metric if direction == "minimize" else metric > best_metric


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
        units=row.units,
    )


def fold_summary(
    acc: dict[tuple[int, str], dict[str, Any]], direction: str, batch_size: int, outcome: str, lr: float,
    metric: float | None, units: str,
) -> None:
    """The summary semantics, in Python (used by the rebuild; the upsert is its SQL twin).

    Every run counts in ``n_runs`` of its (batch size, LR units); ``completed`` runs (with a metric)
    update ``best_*`` and ``max_stable_lr``; ``diverged`` runs update ``min_diverged_lr``. Failed,
    preempted, pruned and running runs say nothing about the LR.
    """
    m = acc.setdefault(
        (batch_size, units),
        {"batch_size": batch_size, "units": units, "n_runs": 0, "n_completed": 0, "n_diverged": 0,
         "best_lr": None, "best_metric": None, "min_diverged_lr": None, "max_stable_lr": None},
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


def merge_family(rows: Sequence[Any], direction: str | None) -> list[BatchSummary]:
    """Merge the summary rows (each with its study's ``direction``) of several studies, per (batch size,
    LR units): one optimizer's divergences stay no bound on another's LRs across a family too.

    Counts and LR bounds merge every row; ``best_*`` merge the rows of ``direction`` (default: the
    direction every row shares, else ``"minimize"``), by the fold's own comparison (:func:`_better`).
    """
    dirs = {r.direction for r in rows}
    want = direction or (dirs.pop() if len(dirs) == 1 else "minimize")
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        m = merged.setdefault(
            (r.batch_size, r.units),
            {"batch_size": r.batch_size, "units": r.units, "n_runs": 0, "n_completed": 0, "n_diverged": 0,
             "best_lr": None, "best_metric": None, "min_diverged_lr": None, "max_stable_lr": None, "n_studies": 0},
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


class SummaryOps:
    """History, family history, evidence and the summary fold of :class:`OptunaStudyStore` (a mixin:
    it uses the store's ``_read``, ``_write`` and ``_insert``)."""

    def _bump_summary(
        self,
        conn: Connection,
        study_id: int,
        batch_size: int,
        direction: str,
        *,
        optimizer: str,
        outcome: str,
        lr: float,
        metric: float | None = None,
        new_run: bool = False,
    ) -> None:
        """Fold one event of a run of ``optimizer`` into its (study, batch size, LR units) summary row, with
        one upsert.

        SET expressions see the row's old values (SQL semantics on both backends), so the
        ``best_*`` pair is updated under the same condition.
        """
        s = sch.lb_batch_summary
        completed = outcome == "completed"
        diverged = outcome == "diverged"
        values = {
            "study_id": study_id,
            "batch_size": batch_size,
            "units": run_units(optimizer),
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
        key = ["study_id", "batch_size", "units"]
        if not set_:
            stmt = stmt.on_conflict_do_nothing(index_elements=key)
        else:
            stmt = stmt.on_conflict_do_update(index_elements=key, set_=set_)
        conn.execute(stmt)

    def history(self, namespace: str, study: str) -> list[BatchSummary]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        s, b = sch.lb_studies, sch.lb_batch_summary

        def tx(conn: Connection) -> list[BatchSummary]:
            rows = conn.execute(
                select(s.c.study_id, b)
                .select_from(s.outerjoin(b, b.c.study_id == s.c.study_id))
                .where(s.c.namespace == namespace, s.c.name == study)
                .order_by(b.c.batch_size, b.c.units)
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
            own = find_study(conn, namespace, study)
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
        if direction is not None and direction not in get_args(Direction):
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
                select(s.c.direction, b).join(b, b.c.study_id == s.c.study_id).where(*where)
                .order_by(b.c.batch_size, b.c.units)
            ).all()

        return merge_family(self._read(tx), direction)

    def rebuild_summaries(self, namespace: str | None = None, study: str | None = None) -> int:
        """Recompute ``lb_batch_summary`` from the Optuna tables alone (trials, their
        ``batch_size``/``peak_lr``/``optimizer`` params, values and ``outcome`` attrs)."""
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
            total += self._write(lambda conn, sid=sid, direction=direction: rebuild_study(conn, sid, direction))
        return total


def rebuild_all(conn: Connection) -> None:
    """Recompute every study's summary rows, in the caller's transaction (a schema migration's)."""
    for study_id, direction in conn.execute(select(sch.lb_studies.c.study_id, sch.lb_studies.c.direction)).all():
        rebuild_study(conn, study_id, direction)


def rebuild_study(conn: Connection, study_id: int, direction: str) -> int:
    """Recompute one study's summary rows from its Optuna trials; the number of rows written."""
    bs = T_PARAMS.alias("bs")
    lr = T_PARAMS.alias("lr")
    opt = T_PARAMS.alias("opt")
    ov = T_VALUES.alias("ov")
    oa = T_TRIAL_USER.alias("oa")
    rows = conn.execute(
        select(T_TRIALS.c.state, bs.c.param_value, lr.c.param_value, ov.c.value, ov.c.value_type, oa.c.value_json,
               opt.c.param_value, opt.c.distribution_json)
        .join(bs, and_(bs.c.trial_id == T_TRIALS.c.trial_id, bs.c.param_name == "batch_size"))
        .join(lr, and_(lr.c.trial_id == T_TRIALS.c.trial_id, lr.c.param_name == "peak_lr"))
        .outerjoin(opt, and_(opt.c.trial_id == T_TRIALS.c.trial_id, opt.c.param_name == "optimizer"))
        .outerjoin(ov, and_(ov.c.trial_id == T_TRIALS.c.trial_id, ov.c.objective == 0))
        .outerjoin(oa, and_(oa.c.trial_id == T_TRIALS.c.trial_id, oa.c.key == "outcome"))
        .where(T_TRIALS.c.study_id == study_id)
    )
    acc: dict[tuple[int, str], dict[str, Any]] = {}
    # An imported trial may record its optimizer in a distribution of its own: decoded by that one, once each.
    dists: dict[str, BaseDistribution] = {}
    for state, bsv, lrv, value, vtype, outcome_json, optv, opt_json in rows:
        outcome = json.loads(outcome_json) if outcome_json is not None else STATE_OUTCOME.get(state, "failed")
        metric = None if value is None and vtype is None else om.TrialValueModel.stored_repr_to_value(value, vtype)
        optimizer = None
        if optv is not None:
            if opt_json not in dists:
                dists[opt_json] = json_to_distribution(opt_json)
            name = dists[opt_json].to_external_repr(optv)
            optimizer = None if name is None else str(name)
        fold_summary(acc, direction, round(bsv), outcome, float(lrv), metric, run_units(optimizer))
    conn.execute(delete(sch.lb_batch_summary).where(sch.lb_batch_summary.c.study_id == study_id))
    if acc:
        conn.execute(sch.lb_batch_summary.insert(), [{"study_id": study_id, **v} for v in acc.values()])
    return len(acc)
