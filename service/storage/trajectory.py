"""Each run's gradient noise scale along the examples it has seen, kept in ``lb_noise_trajectory``.

A run reports B_noise at every step; the store keeps a bounded trajectory of it: fixed bins of
examples seen, :data:`BUCKETS_PER_DOUBLING` per doubling (the bins are the same for every run and
every report, so merging never moves a point and a run has at most :data:`MAX_BUCKETS` rows whatever
its length). A bin holds sums (reports, examples, log B_noise, the components), so a report batch
adds to the one or two bins it touches in one upsert: O(1) rows written per batch, O(1) read per run.
B_noise grows over a run roughly as a power of the examples seen, so log-spaced bins give every
stretch of the run the same weight in a log-log fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from largebatch.scaling_rules.wire import MAX_SEEN
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _float, _int
from largebatch.service.storage._queries import find_study
from largebatch.service.storage.records import (
    InvalidArgument,
    NoisePoint,
    RunTrajectory,
    TrajectoryPoint,
    validate_name,
)

__all__ = ["BUCKETS_PER_DOUBLING", "MAX_BUCKETS", "MAX_TRAJECTORY_RUNS", "TrajectoryOps", "bucket_of",
           "checked_point"]

BUCKETS_PER_DOUBLING = 4  # bins 19% apart in examples seen
MAX_BUCKETS = 1 + BUCKETS_PER_DOUBLING * math.ceil(math.log2(MAX_SEEN))  # bin 0 holds examples_seen < 1
MAX_TRAJECTORY_RUNS = 256  # the most runs one read returns (the newest)


def bucket_of(examples_seen: float) -> int:
    return 0 if examples_seen < 1 else 1 + int(BUCKETS_PER_DOUBLING * math.log2(examples_seen))


def _seen(argument: str, value: object) -> float:
    v = _float(argument, value)
    if not 0 <= v <= MAX_SEEN:
        raise InvalidArgument(f"{argument} must be in [0, {MAX_SEEN:g}], got {value!r}")
    return v


def _fine(p: NoisePoint) -> bool:
    # What the wire gives (checked floats): one comparison chain each, no conversion; NaN fails them all.
    e, t, g, s = p
    return (type(e) is float and 0 <= e <= MAX_SEEN and (t is None or (type(t) is float and 0 <= t <= MAX_SEEN))
            and ((g is None and s is None) or (type(g) is float and type(s) is float and 0 < g < math.inf
                                               and 0 < s < math.inf)))


def checked_point(point: object) -> NoisePoint | None:
    if point is None:
        return None
    if not isinstance(point, tuple) or len(point) != 4:
        raise InvalidArgument(f"a report's trajectory point must be a NoisePoint, got {point!r}")
    if isinstance(point, NoisePoint) and _fine(point):
        return point
    examples, tokens, grad_sq, trace = point
    if (grad_sq is None) != (trace is None):
        raise InvalidArgument("grad_sq and trace_sigma come together")
    return NoisePoint(_seen("examples_seen", examples), None if tokens is None else _seen("tokens_seen", tokens),
                      None if grad_sq is None else _float("grad_sq", grad_sq, positive=True),
                      None if trace is None else _float("trace_sigma", trace, positive=True))


def _bins(rows: list[tuple[int, float, NoisePoint, int]]) -> dict[int, dict[str, Any]]:
    """The sums each bin adds, from ``(step, noise_scale, point, bin)`` in step order."""
    by_bin: dict[int, list[tuple[int, float, NoisePoint, int]]] = {}
    for row in rows:
        by_bin.setdefault(row[3], []).append(row)
    out = {}
    for b, rs in by_bin.items():
        tokens = [p.tokens_seen for _, _, p, _ in rs if p.tokens_seen is not None]
        parts = [p for _, _, p, _ in rs if p.grad_sq is not None]
        out[b] = {"n": len(rs), "first_step": rs[0][0], "last_step": rs[-1][0],
                  "sum_examples": math.fsum(p.examples_seen for _, _, p, _ in rs),
                  "sum_log_noise": math.fsum(map(math.log, (noise for _, noise, _, _ in rs))),
                  "n_tokens": len(tokens), "sum_tokens": math.fsum(tokens), "n_components": len(parts),
                  "sum_grad_sq": math.fsum(p.grad_sq for p in parts),
                  "sum_trace_sigma": math.fsum(p.trace_sigma for p in parts)}
    return out


_ADDED = ("n", "sum_examples", "sum_log_noise", "n_tokens", "sum_tokens", "n_components", "sum_grad_sq",
          "sum_trace_sigma")


class TrajectoryOps:
    """The trajectory operations of :class:`OptunaStudyStore` (a mixin: it uses the store's ``_read``
    and ``_insert``; :meth:`_add_to_trajectory` runs inside ``report_batch``'s transaction)."""

    def _add_to_trajectory(self, conn: Connection, run_id: int,
                           rows: Sequence[tuple[int, float | None, NoisePoint | None]]) -> None:
        """Add ``(step, noise_scale, point)`` (in step order) to the run's bins, in one statement. A bin
        takes a batch's reports only when they all come after the last step it counted: bins fill in step
        order, so a batch resent after a lost answer is not counted twice (nor are steps trained again after
        a resume; a batch that mixes those with new steps of the same bin leaves that bin as it was)."""
        t = sch.lb_noise_trajectory
        added = _bins([(step, noise, point, bucket_of(point.examples_seen)) for step, noise, point in rows
                       if noise is not None and point is not None])
        if not added:
            return
        ins = self._insert(t)  # type: ignore[attr-defined]
        conn.execute(ins.on_conflict_do_update(
            index_elements=["run_id", "bucket"],
            set_={**{k: getattr(t.c, k) + getattr(ins.excluded, k) for k in _ADDED},
                  "last_step": ins.excluded.last_step},
            where=t.c.last_step < ins.excluded.first_step),
            [{"run_id": run_id, "bucket": b, **sums} for b, sums in sorted(added.items())])

    def noise_trajectories(self, namespace: str, study: str, *, max_runs: int = MAX_TRAJECTORY_RUNS
                           ) -> tuple[int, list[RunTrajectory]]:
        validate_name("namespace", namespace)
        validate_name("study", study)
        _int("max_runs", max_runs, minimum=1, maximum=MAX_TRAJECTORY_RUNS)
        t, r = sch.lb_noise_trajectory, sch.lb_runs

        def tx(conn: Connection) -> tuple[int, list[RunTrajectory]]:
            sid = find_study(conn, namespace, study).study_id
            with_points = (select(t.c.run_id).distinct()
                           .select_from(r.join(t, t.c.run_id == r.c.run_id)).where(r.c.study_id == sid))
            total = conn.execute(select(func.count()).select_from(with_points.subquery())).scalar_one()
            chosen = [rid for (rid,) in conn.execute(with_points.order_by(t.c.run_id.desc()).limit(max_runs))]
            if not chosen:
                return total, []
            by_run: dict[int, list[TrajectoryPoint]] = {rid: [] for rid in chosen}
            batch = dict(conn.execute(select(r.c.run_id, r.c.batch_size).where(r.c.run_id.in_(chosen))).all())
            for row in conn.execute(select(t).where(and_(t.c.run_id.in_(chosen))).order_by(t.c.run_id, t.c.bucket)):
                n = row.n
                parts = row.n_components
                by_run[row.run_id].append(TrajectoryPoint(
                    examples_seen=row.sum_examples / n,
                    tokens_seen=row.sum_tokens / n if row.n_tokens == n else None,
                    noise_scale=math.exp(row.sum_log_noise / n),
                    grad_sq=row.sum_grad_sq / parts if parts else None,
                    trace_sigma=row.sum_trace_sigma / parts if parts else None,
                    reports=n, first_step=row.first_step, last_step=row.last_step))
            return total, [RunTrajectory(run_id=rid, batch_size=batch[rid], points=by_run[rid])
                           for rid in sorted(chosen)]

        return self._read(tx)  # type: ignore[attr-defined]
