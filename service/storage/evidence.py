"""All a recommendation reads of a study, in one transaction: the study, its per-batch summaries (and its
family's), the median noise scale, a version of its evidence (runs opened and finished, the newest measured
critical batch), and its finished runs unless the caller's copy is of that version already.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection

from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _int
from largebatch.service.storage._queries import T_TRIAL_USER, find_study
from largebatch.service.storage.records import StudyRecord, validate_name
from largebatch.service.storage.reports import NOISE_KEY
from largebatch.service.storage.summaries import _summary, merge_family

__all__ = ["EvidenceOps", "EvidenceRead"]

FamilyBand = tuple[str, int, int]
# The study's noise scale is the median of its newest runs' measurements: a bounded read at any study size.
NOISE_RUNS = 200


@dataclass(frozen=True)
class EvidenceRead:
    """What :meth:`EvidenceOps.read_evidence` found. ``version`` changes whenever a run of the study (or of
    its family, when asked) is opened or finishes; ``runs`` is None when it equals the caller's version."""

    study: StudyRecord
    history: list[BatchSummary]
    family_history: list[BatchSummary]
    noise_scale: float | None
    version: tuple
    runs: list[RunEvidence] | None


class EvidenceOps:
    """A mixin of :class:`OptunaStudyStore` (it uses ``_read``, ``_study_record`` and ``_study_user_attrs``)."""

    def read_evidence(self, namespace: str, study: str, *, limit: int = 2000, family_band: FamilyBand | None = None,
                      known_version: tuple | None = None) -> EvidenceRead:
        validate_name("namespace", namespace)
        validate_name("study", study)
        _int("limit", limit, minimum=1)
        s, b, r = sch.lb_studies, sch.lb_batch_summary, sch.lb_runs

        def tx(conn: Connection) -> EvidenceRead:
            own = find_study(conn, namespace, study)
            record = self._study_record(own, self._study_user_attrs(conn, [own.study_id])[own.study_id])  # type: ignore[attr-defined]
            rows = conn.execute(select(b).where(b.c.study_id == own.study_id).order_by(b.c.batch_size, b.c.units)).all()
            family_rows: list = []
            scope = s.c.study_id == own.study_id
            if family_band is not None:
                family, lo, hi = family_band
                family_rows = conn.execute(
                    select(s.c.direction, b).join(b, b.c.study_id == s.c.study_id)
                    .where(s.c.model_family == family, s.c.model_params >= lo, s.c.model_params <= hi,
                           s.c.namespace == namespace).order_by(b.c.batch_size, b.c.units)).all()
                scope = or_(scope, and_(s.c.namespace == namespace, s.c.model_family == family,
                                        s.c.model_params >= lo, s.c.model_params <= hi,
                                        s.c.direction == own.direction))
            # The summaries count every run opened and finished, per batch size: their counts version the
            # evidence (a finished run never changes again; a deleted study's id comes with a new created_at).
            # The newest measured critical batch (by the (study, id) index) versions the study's calibration.
            c = sch.lb_critical_batches
            measured = conn.execute(select(c.c.id).where(c.c.study_id == own.study_id)
                                    .order_by(c.c.id.desc()).limit(1)).scalar()
            version = (own.study_id, own.created_at, family_band, measured,
                       tuple(sorted((x.study_id, x.batch_size, x.units, x.n_runs, x.n_completed, x.n_diverged)
                                    for x in [*rows, *family_rows])))
            # The noise scale of the study's newest runs: by (study, number), bounded whatever the study's size.
            newest = (select(r.c.run_id).where(r.c.study_id == own.study_id)
                      .order_by(r.c.number.desc()).limit(NOISE_RUNS).subquery())
            noise = [json.loads(v) for (v,) in conn.execute(
                select(T_TRIAL_USER.c.value_json)
                .select_from(newest.join(T_TRIAL_USER, and_(T_TRIAL_USER.c.trial_id == newest.c.run_id,
                                                            T_TRIAL_USER.c.key == NOISE_KEY))))]
            runs = None
            if version != known_version:
                # Within one study the number orders runs as their ids do, along the (study, number) index.
                newest_first = r.c.run_id.desc() if family_band is not None else r.c.number.desc()
                found = conn.execute(
                    select(r.c.run_id, r.c.batch_size, r.c.peak_lr, r.c.warmup_ratio, r.c.optimizer, r.c.state,
                           r.c.metric, s.c.model_params, s.c.name)
                    .join(s, s.c.study_id == r.c.study_id)
                    .where(scope, r.c.state.in_(("completed", "diverged")))
                    .order_by(newest_first).limit(limit)).all()
                runs = [RunEvidence(batch_size=x.batch_size, lr=x.peak_lr, warmup_ratio=x.warmup_ratio,
                                    optimizer=x.optimizer, outcome=x.state, metric=x.metric,
                                    model_params=x.model_params, run_id=x.run_id, study=x.name) for x in found]
            return EvidenceRead(study=record, history=[_summary(x) for x in rows],
                                family_history=merge_family(family_rows, None) if family_band else [],
                                noise_scale=statistics.median(noise) if noise else None, version=version, runs=runs)

        return self._read(tx)  # type: ignore[attr-defined]
