"""Recipes for a namespace: the engine, fed with what the study store remembers."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from largebatch.scaling_rules.engine import recommend
from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence
from largebatch.scaling_rules.models import Recipe, RecommendationRequest
from largebatch.service.convert import MAX_BIGINT, check_recipe
from largebatch.service.storage.base import StudyStore

__all__ = ["FAMILY_BAND", "Evidence", "EvidenceCache", "compute_recipe", "gather_history", "summarise_warnings"]

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


class EvidenceCache:
    """Fitted evidence models by study, each kept with the store's version of the evidence it was fitted
    on: a request reads the version (and the runs only when it changed) and fits only then."""

    def __init__(self, max_studies: int = 256):
        self.max_studies = max_studies
        self._entries: OrderedDict[tuple, tuple[tuple, list[RunEvidence], EvidenceModel]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[tuple, list[RunEvidence], EvidenceModel] | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: tuple, version: tuple, runs: list[RunEvidence], model: EvidenceModel) -> None:
        with self._lock:
            self._entries[key] = (version, runs, model)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_studies:
                self._entries.popitem(last=False)


def fitted_evidence(store: StudyStore, namespace: str, study: str, band: tuple[str, int, int] | None,
                    cache: EvidenceCache | None) -> tuple[Any, list[RunEvidence], EvidenceModel]:
    """The study's evidence read (one transaction), its finished runs and their fitted model: from the
    cache when the store's version of the evidence is the cached one."""
    key = (id(store), namespace, study, band)
    cached = cache.get(key) if cache is not None else None
    read = store.read_evidence(namespace, study, limit=EVIDENCE_LIMIT, family_band=band,
                               known_version=cached[0] if cached else None)
    if read.runs is None and cached is not None:
        return read, cached[1], cached[2]
    runs = read.runs or []
    model = EvidenceModel.from_runs(runs, direction=read.study.direction)
    if cache is not None:
        cache.put(key, read.version, runs, model)
    return read, runs, model


def gather_history(store: StudyStore, namespace: str, study: str | None, request: RecommendationRequest,
                   *, use_family: bool = False, cache: EvidenceCache | None = None) -> Evidence:
    """The study's (and optionally its family's) evidence, read in one transaction. Raises NotFound when
    ``study`` does not exist in ``namespace``."""
    ev = Evidence()
    p = request.model.params
    band = (request.model.family, min(int(p / FAMILY_BAND), MAX_BIGINT), min(int(p * FAMILY_BAND), MAX_BIGINT))
    if study is None:
        if use_family:
            ev.history += store.family_history(band[0], band[1], band[2], namespace=namespace)
        return ev
    read, ev.runs, ev.model = fitted_evidence(store, namespace, study, band if use_family else None, cache)
    record = read.study
    ev.direction = record.direction
    ev.history = [*read.history, *read.family_history]
    ev.noise_scale = read.noise_scale
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


def compute_recipe(request: RecommendationRequest, evidence: Evidence | None = None) -> Recipe:
    if evidence is None:
        recipe = recommend(request)
    else:
        recipe = recommend(request, history=evidence.history, evidence=evidence.model if evidence.runs else (),
                           direction=evidence.direction, noise_scale=evidence.noise_scale)
        if evidence.history:
            n = sum(h.n_runs for h in evidence.history)
            recipe.rationale.append(f"history: {n} past run(s) over "
                                    f"{len({h.batch_size for h in evidence.history})} batch size(s) "
                                    "were taken into account")
        recipe.warnings.extend(evidence.warnings)
        recipe.warnings = summarise_warnings(recipe.warnings)
    return check_recipe(recipe, ["body"], computed=True)
