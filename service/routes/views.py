"""Read-only views for people (the recipe explorer page, notebooks): a run's reported losses, the
evidence a study's recipes are fitted on, and a recipe's LR schedule as points to draw.

Nothing here writes; each view answers from what the store already holds, within the caller's namespace.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from largebatch.scaling_rules.evidence import Direction, Outcome
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.schedule import lr_curve, stage_boundaries
from largebatch.scaling_rules.wire import NAME_PATTERN, ReportPage, ReportPoint
from largebatch.service.convert import MAX_BIGINT, MAX_INT, check_recipe
from largebatch.service.deps import Reader, body_doc, strict_body
from largebatch.service.errors import ERROR_RESPONSES
from largebatch.service.recipes import FAMILY_BAND, fitted_evidence, summarise_warnings
from largebatch.service.storage.base import NotFound, StudyStore
from largebatch.service.storage.reports import MAX_REPORT_PAGE

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["views"])

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, description="Study name")]
RunId = Annotated[int, Path(ge=0, le=2**63 - 1, description="Run id (unique across studies)")]
_JSON = "application/json"


class EvidenceRun(BaseModel):
    run_id: int | None
    batch_size: int
    lr: float
    outcome: Outcome
    metric: float | None = None


class Fit(BaseModel):
    exponent: float = Field(description="a in LR* ~ batch^a, well below the bend")
    exponent_sd: float
    log_c: float = Field(description="ln LR*(B) = log_c + exponent * ln B where the curve does not bend")
    n_runs: int
    batch_sizes: list[int]
    data_weight: float = Field(description="0: the rule's prior alone, 1: the runs alone")
    prior_exponent: float = Field(0.5, description="the prior's centre: the LR rule's exponent the runs' optimizers "
                                                   "share (1: linear, SGD and LARS; 0.5: sqrt, the Adam family)")
    bend: float | None = Field(None, description="N, where the runs show their best LR stop growing (an F-test "
                                                 "at 5%): ln LR*(B) = log_c + a (ln B - ln(1 + B/N)); reported, "
                                                 "not used: the optimum is the power law's unless a critical batch "
                                                 "is measured; null: no bend shown")
    bend_weight: float = Field(0.0, description="the shown bend's posterior weight (the rest on none)")


class LrPoint(BaseModel):
    batch_size: int
    lr: float


class Boundary(BaseModel):
    batch_size: int
    diverged_lr: float = Field(description="The smallest LR that diverged at this batch size or a smaller one")
    cap: float = Field(description="The LR recipes stay under at this batch size (margin x diverged_lr)")


class StudyEvidence(BaseModel):
    study: str
    metric: str
    direction: Direction
    runs: list[EvidenceRun] = Field(description="Finished runs (completed or diverged) the fit reads, newest first")
    fit: Fit | None = Field(description="The fitted LR-vs-batch curve; null while the runs show no U shape")
    optimum: list[LrPoint] = Field(description="The fitted optimum LR at each batch size with evidence "
                                               "(and at `batch_size` when given)")
    boundary: list[Boundary] = Field(description="The divergence boundary, per batch size with evidence")
    conflicts: list[str]


class SchedulePoints(BaseModel):
    steps: list[int]
    lr: list[float]
    stage_starts: list[int]
    total_steps: int


def _store(request: Request) -> StudyStore:
    return request.app.state.store_holder.get()


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _reports_csv(store: StudyStore, run_id: int, offset: int, limit: int | None) -> Iterator[str]:
    """The CSV in keyset pages: one page in memory at a time, however long the run."""
    # CSV, unlike JSON, can say nan and inf: the values are written as Python writes floats.
    yield "step,loss,grad_norm\n"
    after: int | None = None
    left = limit
    while left is None or left > 0:
        n = _CSV_PAGE if left is None else min(_CSV_PAGE, left)
        page = store.reports(run_id, after_step=after, offset=offset if after is None else 0, limit=n)
        if not page:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in page:
            w.writerow((r.step, repr(float(r.loss)), "" if r.grad_norm is None else repr(float(r.grad_norm))))
        yield buf.getvalue()
        after = page[-1].step
        if left is not None:
            left -= len(page)


_CSV_PAGE = 5000


def _owned_run(store: StudyStore, namespace: str, run_id: int) -> None:
    if store.get_run(run_id).namespace != namespace:  # another namespace's run does not exist for this caller
        raise NotFound(f"run {run_id} not found")


@router.get("/runs/{id}/reports", response_model=ReportPage,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "A page of reports by step (JSON), or with `format=csv` a CSV table "
                                            "`step,loss,grad_norm` (every report unless `limit` is given; NaN and "
                                            "infinite values as `nan`, `inf`), streamed"},
                       **ERROR_RESPONSES},
            summary="A run's reported losses, by step (paged; CSV)",
            description="Pages by `after_step` (the reports after that step: costs the same at any step; the "
                        "next page's `after_step` is the last step of this one) or by `offset`.")
def list_reports(
    id: RunId,
    principal: Reader,
    request: Request,
    limit: Annotated[int | None, Query(ge=1, le=MAX_REPORT_PAGE, description="Page size (JSON default 1000)")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_INT, description="Only reports after this step")] = None,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Response:
    store = _store(request)
    _owned_run(store, principal.namespace, id)
    total = store.report_count(id)
    if format == "csv":
        return StreamingResponse(_reports_csv(store, id, offset, limit), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="run-{id}-reports.csv"',
                                          "X-Total-Count": str(total)})
    limit = limit or 1000
    reports = store.reports(id, after_step=after_step, offset=offset, limit=limit)
    items = [ReportPoint(step=r.step, loss=_finite(r.loss), grad_norm=_finite(r.grad_norm), finite=math.isfinite(r.loss))
             for r in reports]
    page = ReportPage(run_id=id, items=items, total=total, limit=limit, offset=offset)
    return Response(page.model_dump_json(), media_type=_JSON)


class CurveBucket(BaseModel):
    first_step: int
    last_step: int
    low: float | None = Field(description="The lowest finite loss reported in these steps")
    high: float | None = Field(description="The highest finite loss reported in these steps")
    nonfinite: int = Field(description="How many losses in these steps were NaN or infinite")


class Curve(BaseModel):
    run_id: int
    total: int = Field(description="Reports the run has")
    last_step: int | None = Field(description="The newest step: fetch what follows with `after_step`")
    buckets: list[CurveBucket]


@router.get("/runs/{id}/curve", response_model=Curve, responses=ERROR_RESPONSES,
            summary="A run's loss curve downsampled to at most `points` step ranges (lowest and highest loss each)",
            description="For drawing a long run: one aggregate query, an answer of bounded size however many "
                        "reports the run has. New reports can then be fetched with `GET /v1/runs/{id}/reports"
                        "?after_step=` the curve's `last_step`.")
def run_curve(
    id: RunId,
    principal: Reader,
    request: Request,
    points: Annotated[int, Query(ge=1, le=5000, description="At most this many buckets")] = 500,
) -> Response:
    store = _store(request)
    _owned_run(store, principal.namespace, id)
    buckets = [CurveBucket(first_step=a, last_step=b, low=_finite(lo), high=_finite(hi), nonfinite=bad)
               for a, b, lo, hi, bad in store.report_curve(id, points)]
    out = Curve(run_id=id, total=store.report_count(id), last_step=buckets[-1].last_step if buckets else None,
                buckets=buckets)
    return Response(out.model_dump_json(), media_type=_JSON)


@router.get("/studies/{name}/evidence", response_model=StudyEvidence, responses=ERROR_RESPONSES,
            summary="What a study's recipes are fitted on: its finished runs, the fitted optimum, the "
                    "divergence boundary",
            description="The same runs and fit `POST /v1/recommendations` with this `study` uses. With "
                        "`family=true`, the runs of the same family's studies within 2x the model size are "
                        "added (as `use_family_evidence` does).")
def study_evidence(
    name: StudyName,
    principal: Reader,
    request: Request,
    batch_size: Annotated[int | None, Query(ge=1, le=MAX_INT, description="Also give the optimum here")] = None,
    family: Annotated[bool, Query(description="Add the family's evidence")] = False,
) -> Response:
    store = _store(request)
    study = store.get_study(principal.namespace, name)
    p = study.model_params
    band = ((study.model_family, int(p / FAMILY_BAND), min(int(p * FAMILY_BAND), MAX_BIGINT)) if family
            else None)
    _, runs, model = fitted_evidence(store, principal.namespace, name, band, request.app.state.evidence_cache)
    batches = sorted({r.batch_size for r in runs} | ({batch_size} if batch_size else set()))
    fit = None
    optimum: list[LrPoint] = []
    if model.fit is not None:
        f, shown = model.fit, model.shown_bend()
        fit = Fit(exponent=f.exponent, exponent_sd=f.exponent_sd, log_c=f.log_c, n_runs=f.n_runs,
                  batch_sizes=list(f.batch_sizes), data_weight=f.data_weight, prior_exponent=f.prior_exponent,
                  bend=shown.bend if shown else None, bend_weight=shown.bend_weight if shown else 0.0)
        optimum = [LrPoint(batch_size=b, lr=f.optimum(b)) for b in batches if math.isfinite(f.optimum(b))]
    boundary = []
    for b in batches:
        worst, cap = model.min_diverged_at_or_below(b), model.stable_cap(b)
        if worst is not None and cap is not None:
            boundary.append(Boundary(batch_size=b, diverged_lr=worst.lr, cap=cap))
    out = StudyEvidence(
        study=study.name, metric=study.metric, direction=study.direction,
        runs=[EvidenceRun(run_id=r.run_id, batch_size=r.batch_size, lr=r.lr, outcome=r.outcome,
                          metric=_finite(r.metric)) for r in runs],
        fit=fit, optimum=optimum, boundary=boundary,
        conflicts=[w.removeprefix("evidence conflict: ") for w in
                   summarise_warnings([f"evidence conflict: {c}" for c in model.conflicts])],
    )
    return Response(out.model_dump_json(), media_type=_JSON)


@router.post("/schedule", response_model=SchedulePoints, responses=ERROR_RESPONSES,
             summary="A recipe's LR schedule as points to draw",
             description="Body: a recipe (as `POST /v1/recommendations` returns it). The answer samples the "
                         "schedule at `points` evenly spaced steps plus every phase boundary, so a chart drawn "
                         "through them is exact for linear phases.",
             openapi_extra=body_doc(Recipe))
def schedule_points(
    principal: Reader,
    body: Annotated[Recipe, strict_body(Recipe)],
    points: Annotated[int, Query(ge=2, le=5000, description="Evenly spaced samples")] = 400,
) -> Response:
    recipe = check_recipe(body, ["body"])
    total = sum(s.steps for s in recipe.stages)
    steps = {0, total - 1}
    steps.update(round(i * (total - 1) / (points - 1)) for i in range(points))
    for start, s in zip(stage_boundaries(recipe), recipe.stages, strict=True):
        # The phase edges, each seen from both sides: the LR jumps where a stage re-warms from zero.
        for edge in (start, start + s.warmup_steps, start + s.warmup_steps + s.const_steps, start + s.steps):
            steps.update(x for x in (edge - 1, edge) if 0 <= x < total)
    ordered = sorted(steps)
    lrs = lr_curve(recipe, ordered)
    out = SchedulePoints(steps=ordered, lr=[float(x) for x in lrs], stage_starts=stage_boundaries(recipe),
                         total_steps=total)
    return Response(out.model_dump_json(), media_type=_JSON)
