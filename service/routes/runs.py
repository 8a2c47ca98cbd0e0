"""Runs: open (in a study), read, heartbeat, report, record a measured critical batch, complete."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Discriminator, Tag

from largebatch.scaling_rules.evidence import Outcome
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.wire import (
    NAME_PATTERN,
    CompleteIn,
    HeartbeatOut,
    MeasuredCriticalBatch,
    MeasuredCriticalBatchIn,
    Page,
    ReportBatchIn,
    ReportIn,
    ReportOut,
    Run,
    RunCreate,
)
from largebatch.service.convert import MAX_INT, check_recipe, to_run
from largebatch.service.deps import IdempotencyKey, Reader, StoreDep, Writer, body_doc, strict_body
from largebatch.service.divergence import record_reports
from largebatch.service.errors import ERROR_RESPONSES, ApiError, field_error
from largebatch.service.recipes import compute_recipe, gather_history
from largebatch.service.storage._checks import NOISE_SCALE_RANGE
from largebatch.service.storage.base import Conflict, NotFound, RunRecord, StudyStore

router = APIRouter(prefix="/v1", tags=["runs"])

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, description="Study name")]
RunId = Annotated[int, Path(ge=0, le=2**63 - 1, description="Run id (unique across studies)")]
_JSON = "application/json"
_CSV_COLUMNS = ("id", "number", "state", "batch_size", "peak_lr", "warmup_ratio", "const_ratio", "optimizer",
                "steps", "metric", "reason", "diverged_step", "last_step", "last_loss", "recipe_hash",
                "created_at", "updated_at", "lease_expires_at")


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type=_JSON)


def body_digest(body: BaseModel) -> str:
    """The Idempotency-Key rule, stated once: a key names one request body (canonical JSON, every
    field); the same key with any other body is 409."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def open_run(request: Request, store: StudyStore, namespace: str, study: str, recipe: Recipe,
             key: str | None, environment: dict[str, Any], body: BaseModel | None = None, *,
             variant: bool = False) -> tuple[Run, bool]:
    """Open a run (idempotent on ``key``, see :func:`body_digest`). Returns (run, created). A ``variant``
    (an explore run handed out for some later job) gets the short claim lease."""
    settings = request.app.state.settings
    lease = min(settings.explore_claim_s, settings.lease_seconds) if variant else settings.lease_seconds
    try:
        record, created = store.create_run(namespace, study, recipe, client_key=key, environment=environment,
                                           lease_seconds=lease,
                                           request_hash=None if key is None or body is None else body_digest(body))
    except Conflict as e:
        raise ApiError("conflict", f"Idempotency-Key {key!r} was already used for another request: a key names "
                                   f"one request, reusing it with a different body is 409 ({e})") from None
    request.app.state.evidence_cache.written()
    return to_run(record), created


def _owned_run(store: StudyStore, namespace: str, run_id: int) -> RunRecord:
    run = store.get_run(run_id)
    if run.namespace != namespace:  # another namespace's run does not exist for this caller
        raise NotFound(f"run {run_id} not found")
    return run


@router.post(
    "/studies/{name}/runs",
    response_model=Run,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": Run, "description": "Idempotency-Key replay: the run the first request opened"},
               **ERROR_RESPONSES},
    summary="Open a run in a study, from a recipe or from a request",
    description="Give `recipe` (one you have) or `request` (the service computes the recipe, with the "
                "study's history). 201 when opened, 200 when the `Idempotency-Key` was seen before.",
    openapi_extra=body_doc(RunCreate),
)
def create_run(name: StudyName, principal: Writer, store: StoreDep, request: Request,
               idempotency_key: IdempotencyKey, body: Annotated[RunCreate, strict_body(RunCreate)]) -> Response:
    if (body.recipe is None) == (body.request is None):
        raise field_error(["body"], "give exactly one of recipe or request", "value_error")
    if body.recipe is not None:
        recipe = check_recipe(body.recipe, ["body", "recipe"])
        store.get_study(principal.namespace, name)  # 404 before anything else
    else:
        assert body.request is not None
        recipe = compute_recipe(body.request, gather_history(store, principal.namespace, name, body.request,
                                                             cache=request.app.state.evidence_cache))
    run, created = open_run(request, store, principal.namespace, name, recipe, idempotency_key, body.environment,
                            body)
    resp = _json(run)
    resp.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    resp.headers["Location"] = f"/v1/runs/{run.id}"
    return resp


_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string whose text starts with = + - @ (or a tab or CR), after
    any blanks, on any of its lines, would be run as a formula (``=HYPERLINK(...)``): each such line gets a
    leading apostrophe. Numbers stay numbers."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    parts = _LINE_BREAK.split(value)
    for i in range(0, len(parts), 2):  # the even parts are the lines, the odd ones the breaks between them
        line = parts[i]
        if line.startswith(("\t", "\r")) or line.lstrip().startswith(_FORMULA_START):
            parts[i] = "'" + line
    return "".join(parts)


def _csv_rows(rows: list[Run], header: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(_CSV_COLUMNS)
    for r in rows:
        d = r.model_dump(mode="json")
        w.writerow([csv_cell(d[c]) for c in _CSV_COLUMNS])
    return buf.getvalue()


@router.get(
    "/studies/{name}/runs",
    response_model=Page[Run],
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                     "description": "A page of runs (JSON), or with `format=csv` a CSV table (all matching runs "
                                    "unless `limit` is given)"},
               **ERROR_RESPONSES},
    summary="List a study's runs (paged; filter by state and batch size; CSV)",
)
def list_runs(
    name: StudyName,
    principal: Reader,
    store: StoreDep,
    state: Annotated[Outcome | None, Query(description="Only runs in this state")] = None,
    batch_size: Annotated[int | None, Query(ge=1, le=MAX_INT, description="Only runs at this batch size")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Page size (JSON default 100)")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Response:
    ns = principal.namespace
    if format == "json":
        page = store.list_runs(ns, name, state=state, batch_size=batch_size, limit=limit or 100, offset=offset)
        out = Page[Run](items=[to_run(r) for r in page.items], total=page.total, limit=limit or 100, offset=offset)
        return _json(out)
    # Streamed a page at a time: the answer's size does not set the server's memory.
    first = store.list_runs(ns, name, state=state, batch_size=batch_size, limit=min(limit or 1000, 1000),
                            offset=offset)

    def pages() -> Iterator[str]:
        yield _csv_rows([to_run(r) for r in first.items], header=True)
        pos, left = offset + len(first.items), None if limit is None else limit - len(first.items)
        while first.items and pos < first.total and (left is None or left > 0):
            page = store.list_runs(ns, name, state=state, batch_size=batch_size,
                                   limit=1000 if left is None else min(left, 1000), offset=pos)
            if not page.items:
                return
            yield _csv_rows([to_run(r) for r in page.items], header=False)
            pos += len(page.items)
            left = None if left is None else left - len(page.items)

    filename = f"{name}-runs.csv"
    return StreamingResponse(pages(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "X-Total-Count": str(first.total)})


@router.get("/runs/{id}", response_model=Run, responses=ERROR_RESPONSES, summary="One run")
def get_run(id: RunId, principal: Reader, store: StoreDep) -> Response:
    return _json(to_run(_owned_run(store, principal.namespace, id)))


_STOP_STATES = ("diverged", "pruned")


def _report_kind(v: Any) -> str:
    return "report-batch" if isinstance(v, dict) and "reports" in v else "single-report"


# One report or a batch; the discriminator picks one so errors name the field (`body.step`), not both shapes.
ReportBody = Annotated[
    Annotated[ReportIn, Tag("single-report")] | Annotated[ReportBatchIn, Tag("report-batch")],
    Discriminator(_report_kind),
]


def _not_running(run: RunRecord) -> ApiError:
    return ApiError("conflict", f"run {run.id} is already {run.state}")


# A run the lease sweeper preempted comes back to life when its job speaks: the store decides.
_LIVE_STATES = ("running", "preempted")


def _count_revival(request: Request, before: str) -> None:
    if before == "preempted":  # the store call succeeded, so the run is running again
        request.app.state.metrics.revived.inc()


@router.post(
    "/runs/{id}/heartbeat",
    response_model=HeartbeatOut,
    responses=ERROR_RESPONSES,
    summary="Renew a running run's lease",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object"}, "example": {}}}}},
    description="Body: `{}` (every POST carries a JSON body). A run whose heartbeats stop is marked `preempted` when its lease expires; a heartbeat (or "
                "report) from its job makes it `running` again. On a run the service stopped (`diverged`, "
                "`pruned`) the answer is 200 with `should_stop: true`; on a run that is otherwise no longer "
                "running, 409.",
)
def heartbeat(id: RunId, principal: Writer, store: StoreDep, request: Request) -> Response:
    run_id = id
    run = _owned_run(store, principal.namespace, run_id)
    if run.state in _LIVE_STATES:
        try:
            before = run.state
            run = store.heartbeat(run_id, lease_seconds=request.app.state.settings.lease_seconds)
            _count_revival(request, before)
            return _json(HeartbeatOut(run=to_run(run), should_stop=False))
        except Conflict:
            run = store.get_run(run_id)
    if run.state in _STOP_STATES:
        return _json(HeartbeatOut(run=to_run(run), should_stop=True, reason=run.reason or f"run is {run.state}"))
    raise _not_running(run)


def _report(request: Request, store: StudyStore, run: RunRecord, reports: list[ReportIn]) -> ReportOut:
    metrics = request.app.state.metrics
    try:
        run = record_reports(store, request.app.state.divergence, run, reports, on_revived=metrics.revived.inc,
                             on_diverged=metrics.divergences.inc)
    finally:  # a batch may be partly stored when it fails: its noise scales and divergence count
        request.app.state.evidence_cache.written()
    if run.state == "running":
        return ReportOut(run=to_run(run), should_stop=False)
    if run.state in _STOP_STATES:
        return ReportOut(run=to_run(run), should_stop=True, reason=run.reason or f"run is {run.state}")
    raise _not_running(run)


def _check_noise_scales(reports: list[ReportIn], batch: bool) -> None:
    """The store's range, checked before any report of a batch is stored."""
    lo, hi = NOISE_SCALE_RANGE
    for i, r in enumerate(reports):
        if r.noise_scale is not None and not lo <= r.noise_scale <= hi:
            loc: list[str | int] = ["body", "reports", i, "noise_scale"] if batch else ["body", "noise_scale"]
            raise field_error(loc, f"must be in [{lo:g}, {hi:g}] examples (a gradient noise scale)")


@router.post(
    "/runs/{id}/reports",
    response_model=ReportOut,
    responses=ERROR_RESPONSES,
    summary="Report intermediate losses; the answer says whether to stop",
    description="One report (`step`, `loss`, optional `grad_norm`) or a batch `{\"reports\": [...]}`. Idempotent "
                "per step. `should_stop` is true, with `reason`, when a loss is NaN/Inf or exploded above "
                "3x the run's early loss (median of its first 5 reports); the run is then recorded `diverged`. "
                "Reports to a run already stopped by the service answer `should_stop: true`; to a run finished "
                "otherwise, 409.",
)
def report(id: RunId, body: Annotated[ReportBody, Body()], principal: Writer, store: StoreDep,
           request: Request) -> Response:
    run_id = id
    run = _owned_run(store, principal.namespace, run_id)
    reports = body.reports if isinstance(body, ReportBatchIn) else [body]
    _check_noise_scales(reports, isinstance(body, ReportBatchIn))
    if run.state not in _LIVE_STATES:
        if run.state in _STOP_STATES:
            return _json(ReportOut(run=to_run(run), should_stop=True, reason=run.reason or f"run is {run.state}"))
        raise _not_running(run)
    return _json(_report(request, store, run, reports))


@router.post(
    "/runs/{id}/critical-batches",
    response_model=MeasuredCriticalBatch,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": MeasuredCriticalBatch, "description": "The same measurement at that step was "
                                                                       "stored before: the stored one"},
               **ERROR_RESPONSES},
    summary="Record a critical batch measured by branching (study evidence: it calibrates the streaming B_noise)",
    description="What `job.branch_probe` measured at one step of a running run: B_crit (examples) with its "
                "interval, the batch and multiples branched, and the job's streaming B_noise there if it had "
                "one. 201 when stored, 200 when the same measurement at that step was stored before; 409 for "
                "another measurement at that step, on a run no longer running, or past 64 per run. "
                "`GET /v1/studies/{name}/critical-batch` calibrates its curve with them.",
    openapi_extra=body_doc(MeasuredCriticalBatchIn),
)
def record_critical_batch(id: RunId, principal: Writer, store: StoreDep, request: Request,
                          body: Annotated[MeasuredCriticalBatchIn, strict_body(MeasuredCriticalBatchIn)]) -> Response:
    _owned_run(store, principal.namespace, id)
    stored, created, revived = store.add_critical_batch(id, body)
    if revived:
        request.app.state.metrics.revived.inc()
    request.app.state.evidence_cache.written()  # the study's calibration moved: recipes see it at once
    resp = _json(stored)
    resp.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return resp


@router.post(
    "/runs/{id}/complete",
    response_model=Run,
    responses=ERROR_RESPONSES,
    summary="Record a run's final outcome",
    description="`completed` needs a finite `metric`; `diverged`, `failed`, `pruned` take an optional `reason` "
                "and `step`. Completing again with the same outcome (and the same `metric`, `reason`, `step` where "
                "given) is a no-op (200); anything else is 409. A run the lease sweeper marked `preempted` can "
                "still be completed by its job.",
)
def complete(id: RunId, body: CompleteIn, principal: Writer, store: StoreDep, request: Request) -> Response:
    run_id = id
    if body.outcome == "completed":
        if body.metric is None:
            raise field_error(["body", "metric"], "a completed run needs its final metric", "missing")
    if body.metric is not None and not math.isfinite(body.metric):
        raise field_error(["body", "metric"], "must be a finite number", "finite_number")
    _owned_run(store, principal.namespace, run_id)
    try:
        run = store.complete_run(run_id, body.outcome, metric=body.metric, reason=body.reason, step=body.step)
    finally:
        request.app.state.evidence_cache.written()
    request.app.state.divergence.forget(run_id)
    return _json(to_run(run))


__all__ = ["csv_cell", "open_run", "router"]
