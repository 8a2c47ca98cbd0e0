"""Recipes for a namespace: the engine, fed with what the study store remembers."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from largebatch.scaling_rules.engine import recommend
from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence
from largebatch.scaling_rules.models import Recipe, RecommendationRequest
from largebatch.scaling_rules.wire import CriticalBatchOut
from largebatch.service.convert import MAX_BIGINT, check_recipe
from largebatch.service.critical_batch import critical_batch, reference_trajectory
from largebatch.service.lru import Lru
from largebatch.service.storage.base import StudyStore

__all__ = ["FAMILY_BAND", "Evidence", "EvidenceCache", "RecipeMemo", "compute_recipe", "fresh_serial",
           "gather_history", "summarise_warnings"]

# Family evidence: studies of the same family whose model is within this factor of the request's size.
FAMILY_BAND = 2.0


# How many of a study's finished runs the scaling-curve fit reads (newest first): enough for any
# sweep a team runs by hand, bounded so the hot path stays a single small indexed query.
EVIDENCE_LIMIT = 2000


class Evidence:
    """What the store knows for one recommendation: per-batch summaries, the finished runs and their
    fitted model (shared by every request while the study's evidence has not changed)."""

    def __init__(self) -> None:
        self.history: list[BatchSummary] = []
        self.runs: list[RunEvidence] = []
        self.model: EvidenceModel | None = None
        self.warnings: list[str] = []
        self.direction = "minimize"
        self.noise_scale: float | None = None  # the median B_noise the study's runs measured
        self.critical: CriticalBatchOut | None = None  # the study's fitted critical batch along the run
        self.serial: int | None = None  # the cached read this came from (same serial, same evidence)


@dataclass
class _Fitted:
    version: tuple
    runs: list[RunEvidence]
    model: EvidenceModel
    read: Any  # the store's last EvidenceRead of the study
    read_at: float
    generation: int  # the cache's write count when that read began
    critical: CriticalBatchOut
    serial: int | None = None  # names what the engine sees (answers are memoised under it), None: not cached


class EvidenceCache:
    """Fitted evidence models by study, each kept with the store's version of the evidence it was fitted
    on: a request reads the version (and the runs only when it changed) and fits only then.

    ``fresh_s``: for that long after a read, a request of the same study reuses it without asking the store
    (the read, one transaction of several queries, costs more than the engine), unless this worker has
    written a run since (:meth:`written`): its own writes are seen at once, another worker's or replica's
    within ``fresh_s``."""

    def __init__(self, max_studies: int = 256, fresh_s: float = 0.0):
        self.max_studies = max_studies
        self.fresh_s = fresh_s
        self._entries: Lru[tuple, _Fitted] = Lru(max_studies)
        self._lock = threading.Lock()
        self._generation = 0
        self._serials = itertools.count()

    def written(self) -> None:
        """A run was opened, reported on, finished or deleted through this worker: no read made before
        is fresh any more."""
        with self._lock:
            self._generation += 1

    def get(self, key: tuple) -> _Fitted | None:
        return self._entries.get(key)

    def fresh(self, hit: _Fitted) -> bool:
        return hit.generation == self._generation and time.monotonic() - hit.read_at < self.fresh_s

    def begin(self) -> tuple[int, float]:
        """The write count and the time, taken before a read (a write during the read makes it stale)."""
        return self._generation, time.monotonic()

    def put(self, key: tuple, entry: _Fitted) -> None:
        if entry.serial is None:
            entry.serial = next(self._serials)  # itertools.count: atomic
        self._entries.put(key, entry)


class RecipeMemo:
    """Answers to recommendations by the request's exact bytes and what the answer read: the engine is a
    pure function of the request and the evidence, so the same bytes with the same evidence (no study, or
    the same cached read of the study's) always get the same answer; a sweep's jobs ask for the same recipe
    many times. Bounded: bodies up to ``max_body`` bytes, ``max_entries`` answers (least recently used go)."""

    def __init__(self, max_entries: int = 256, max_body: int = 8192):
        self.max_entries = max_entries
        self.max_body = max_body
        self._answers: Lru[tuple, bytes] = Lru(max_entries)

    def get(self, body: bytes, context: tuple = ()) -> bytes | None:
        return self._answers.get((body, *context))

    def put(self, body: bytes, answer: bytes, context: tuple = ()) -> bytes:
        if len(body) <= self.max_body:
            self._answers.put((body, *context), answer)
        return answer


def _fitted(store: StudyStore, namespace: str, study: str, band: tuple[str, int, int] | None,
            cache: EvidenceCache | None) -> _Fitted:
    key = (id(store), namespace, study, band)
    cached = cache.get(key) if cache is not None else None
    if cached is not None and cache is not None and cache.fresh(cached):
        return cached
    began = cache.begin() if cache is not None else (0, 0.0)
    read = store.read_evidence(namespace, study, limit=EVIDENCE_LIMIT, family_band=band,
                               known_version=cached.version if cached else None)
    serial = None
    if read.runs is None and cached is not None:
        runs, model, critical = cached.runs, cached.model, cached.critical
        if _same_inputs(read, cached.read):  # the engine would see the same evidence: its answers still hold
            serial = cached.serial
    else:
        runs = read.runs or []
        model = EvidenceModel.from_runs(runs, direction=read.study.direction)
        # The critical batch along the run is fitted with the runs, once per version of the study's evidence
        # (a run opened or finished, a critical batch measured): bounded reads, the newest 64 trajectories.
        critical = critical_batch(store, namespace, study)
    entry = _Fitted(read.version, runs, model, read, began[1], began[0], critical, serial)
    if cache is not None:
        cache.put(key, entry)
    return entry


def _same_inputs(read: Any, before: Any) -> bool:
    """Whether two reads of a study give the engine the same inputs (the runs aside: same version, same runs)."""
    return (read.version == before.version and read.noise_scale == before.noise_scale
            and read.history == before.history and read.family_history == before.family_history
            and read.study == before.study)


def fitted_evidence(store: StudyStore, namespace: str, study: str, band: tuple[str, int, int] | None,
                    cache: EvidenceCache | None) -> tuple[Any, list[RunEvidence], EvidenceModel]:
    """The study's evidence read (one transaction), its finished runs and their fitted model: from the
    cache when the store's version of the evidence is the cached one, without a read while it is fresh."""
    f = _fitted(store, namespace, study, band, cache)
    return f.read, f.runs, f.model


def _family_band(request: RecommendationRequest) -> tuple[str, int, int]:
    p = request.model.params
    return request.model.family, min(int(p / FAMILY_BAND), MAX_BIGINT), min(int(p * FAMILY_BAND), MAX_BIGINT)


def fresh_serial(store: StudyStore | None, namespace: str, study: str, request: RecommendationRequest, *,
                 use_family: bool, cache: EvidenceCache) -> int | None:
    """The serial of the study's cached read while it is fresh, else None: asks nothing of the store, so an
    answer memoised for that read (:class:`RecipeMemo`) can be served without leaving the event loop."""
    if store is None:
        return None
    hit = cache.get((id(store), namespace, study, _family_band(request) if use_family else None))
    return hit.serial if hit is not None and cache.fresh(hit) else None


def gather_history(store: StudyStore, namespace: str, study: str | None, request: RecommendationRequest,
                   *, use_family: bool = False, cache: EvidenceCache | None = None) -> Evidence:
    """The study's (and optionally its family's) evidence, read in one transaction. Raises NotFound when
    ``study`` does not exist in ``namespace``."""
    ev = Evidence()
    band = _family_band(request)
    if study is None:
        if use_family:
            ev.history += store.family_history(band[0], band[1], band[2], namespace=namespace)
        return ev
    f = _fitted(store, namespace, study, band if use_family else None, cache)
    read, ev.runs, ev.model, ev.serial = f.read, f.runs, f.model, f.serial
    record = read.study
    ev.direction = record.direction
    ev.history = [*read.history, *read.family_history]
    ev.noise_scale = read.noise_scale
    ev.critical = f.critical
    if record.model_family != request.model.family or record.model_params != request.model.params:
        ev.warnings.append(
            f"study {study!r} is for a {record.model_family} of {record.model_params:,} parameters; this request "
            f"describes a {request.model.family} of {request.model.params:,}: its history may not apply"
        )
    return ev


_CONFLICT_RUN = "evidence conflict: run "


def summarise_warnings(warnings: list[str]) -> list[str]:
    """One line per kind of warning: the per-run evidence conflicts (one per completed run above an LR
    that diverged) become one line with their count and the first of them."""
    conflicts = [w for w in warnings if w.startswith(_CONFLICT_RUN)]
    if len(conflicts) <= 1:
        return warnings
    first = warnings.index(conflicts[0])
    rest = [w for w in warnings if not w.startswith(_CONFLICT_RUN)]
    line = (f"evidence conflict: {len(conflicts)} runs completed at or above an LR that diverged at their batch "
            f"size or a smaller one (divergence may have been noise; the cap still honours it), e.g. "
            f"{conflicts[0].removeprefix('evidence conflict: ')}")
    return [*rest[:first], line, *rest[first:]]


def _with_study_curve(request: RecommendationRequest, evidence: Evidence) -> tuple[RecommendationRequest, str | None]:
    """The request with the study's critical batch curve as its reference's noise trajectory, where the
    request measured none itself and the curve can be one; and the reason that says what fed the recipe."""
    ref = request.reference
    if ref is None or ref.noise_scale is not None or ref.noise_trajectory is not None or evidence.critical is None:
        return request, None
    points, why = reference_trajectory(evidence.critical, ref)
    if points is not None:
        update = {"reference": ref.model_copy(update={"noise_trajectory": points})}
        return request.model_copy(update=update), why
    if evidence.noise_scale is None:
        return request, None
    return request, (f"critical batch from the study: the median B_noise of its newest runs, "
                     f"{evidence.noise_scale:.4g} examples, a constant along the run ({why})")


def compute_recipe(request: RecommendationRequest, evidence: Evidence | None = None) -> Recipe:
    if evidence is None:
        recipe = recommend(request)
    else:
        request, fed = _with_study_curve(request, evidence)
        recipe = recommend(request, history=evidence.history, evidence=evidence.model if evidence.runs else (),
                           direction=evidence.direction, noise_scale=evidence.noise_scale)
        if fed is not None:
            recipe.rationale.append(fed)
        if evidence.history:
            n = sum(h.n_runs for h in evidence.history)
            recipe.rationale.append(f"history: {n} past run(s) over "
                                    f"{len({h.batch_size for h in evidence.history})} batch size(s) "
                                    "were taken into account")
        recipe.warnings.extend(evidence.warnings)
        recipe.warnings = summarise_warnings(recipe.warnings)
    return check_recipe(recipe, ["body"], computed=True)
