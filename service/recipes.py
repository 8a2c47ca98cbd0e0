"""Recipes for a namespace: the engine, fed with what the study store remembers."""

from __future__ import annotations

from largebatch.scaling_rules.engine import recommend
from largebatch.scaling_rules.evidence import BatchSummary
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.scaling_rules.models import Recipe, RecommendationRequest
from largebatch.service.convert import MAX_BIGINT, check_recipe
from largebatch.service.storage.base import StudyStore

__all__ = ["FAMILY_BAND", "Evidence", "compute_recipe", "gather_history"]

# Family evidence: studies of the same family whose model is within this factor of the request's size.
FAMILY_BAND = 2.0


# How many of a study's finished runs the scaling-curve fit reads (newest first): enough for any
# sweep a team runs by hand, bounded so the hot path stays a single small indexed query.
EVIDENCE_LIMIT = 2000


class Evidence:
    """What the store knows for one recommendation: per-batch summaries and the finished runs."""

    def __init__(self) -> None:
        self.history: list[BatchSummary] = []
        self.runs: list[RunEvidence] = []
        self.warnings: list[str] = []
        self.direction = "minimize"
        self.noise_scale: float | None = None  # the median B_noise the study's runs measured


def gather_history(store: StudyStore, namespace: str, study: str | None, request: RecommendationRequest,
                   *, use_family: bool = False) -> Evidence:
    """The study's (and optionally its family's) evidence. Raises NotFound when ``study`` does not
    exist in ``namespace``."""
    ev = Evidence()
    history, warnings = ev.history, ev.warnings
    p = request.model.params
    band = (request.model.family, min(int(p / FAMILY_BAND), MAX_BIGINT), min(int(p * FAMILY_BAND), MAX_BIGINT))
    if study is not None:
        record = store.get_study(namespace, study)
        ev.direction = record.direction
        history += store.history(namespace, study)
        ev.runs = store.evidence(namespace, study, limit=EVIDENCE_LIMIT, family_band=band if use_family else None)
        ev.noise_scale = store.noise_scale(namespace, study)
        if record.model_family != request.model.family or record.model_params != request.model.params:
            warnings.append(
                f"study {study!r} is for a {record.model_family} of {record.model_params:,} parameters; this request "
                f"describes a {request.model.family} of {request.model.params:,}: its history may not apply"
            )
    if use_family:
        history += store.family_history(band[0], band[1], band[2], namespace=namespace)
    return ev


def compute_recipe(request: RecommendationRequest, evidence: Evidence | None = None) -> Recipe:
    if evidence is None:
        recipe = recommend(request)
    else:
        recipe = recommend(request, history=evidence.history, evidence=evidence.runs, direction=evidence.direction,
                           noise_scale=evidence.noise_scale)
        if evidence.history:
            n = sum(h.n_runs for h in evidence.history)
            recipe.rationale.append(f"history: {n} past run(s) over "
                                    f"{len({h.batch_size for h in evidence.history})} batch size(s) "
                                    "were taken into account")
        recipe.warnings.extend(evidence.warnings)
    return check_recipe(recipe, ["body"], computed=True)
