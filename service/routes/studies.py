"""Studies: create, list (paged), read, delete, the critical batch along the run. Always within the
caller's namespace."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from largebatch.scaling_rules.wire import NAME_PATTERN, Page, Study, StudyCreate
from largebatch.service.convert import MAX_BIGINT, MAX_INT, to_study
from largebatch.service.critical_batch import CriticalBatchOut, critical_batch
from largebatch.service.deps import IdempotencyKey, Reader, StoreDep, Writer
from largebatch.service.errors import ERROR_RESPONSES, ApiError, field_error
from largebatch.service.storage.base import AlreadyExists

router = APIRouter(prefix="/v1/studies", tags=["studies"])

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, description="Study name")]
_JSON = "application/json"


# The Idempotency-Key a study was created with, kept in its Optuna user attrs (never shown by the API).
_CREATION_KEY = "creation_key"


@router.post("", response_model=Study, status_code=status.HTTP_201_CREATED, responses={
                 **ERROR_RESPONSES,
                 200: {"model": Study, "description": "Idempotency-Key replay: the study the first request created"}},
             summary="Create a study (409 already_exists if the name is taken in your namespace)",
             description="With an `Idempotency-Key`, a retry of a request that did create the study answers 200 "
                         "with it (a client that lost the first answer is not told its own study exists).")
def create_study(body: StudyCreate, principal: Writer, store: StoreDep, idempotency_key: IdempotencyKey) -> Response:
    if body.model_params > MAX_BIGINT:
        raise field_error(["body", "model_params"], f"must be <= {MAX_BIGINT}", "less_than_equal")
    try:
        record = store.create_study(
            principal.namespace, body.name, model_family=body.model_family, model_params=body.model_params,
            metric=body.metric, direction=body.direction,
            user_attrs={_CREATION_KEY: idempotency_key} if idempotency_key else None,
        )
        created = True
    except AlreadyExists:
        if idempotency_key is None:
            raise
        record = store.get_study(principal.namespace, body.name)
        if record.user_attrs.get(_CREATION_KEY) != idempotency_key:
            raise
        same = (record.model_family, record.model_params, record.metric, record.direction) == (
            body.model_family, body.model_params, body.metric, body.direction)
        if not same:
            raise ApiError("conflict", f"Idempotency-Key {idempotency_key!r} was already used to create study "
                                       f"{body.name!r} with different attributes") from None
        created = False
    return Response(to_study(record).model_dump_json(),
                    status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK, media_type=_JSON,
                    headers={"Location": f"/v1/studies/{record.name}"})


@router.get("", response_model=Page[Study], responses=ERROR_RESPONSES, summary="List your namespace's studies")
def list_studies(
    principal: Reader,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> Response:
    page = store.list_studies(principal.namespace, limit=limit, offset=offset)
    out = Page[Study](items=[to_study(s) for s in page.items], total=page.total, limit=limit, offset=offset)
    return Response(out.model_dump_json(), media_type=_JSON)


@router.get("/{name}", response_model=Study, responses=ERROR_RESPONSES, summary="One study")
def get_study(name: StudyName, principal: Reader, store: StoreDep) -> Response:
    return Response(to_study(store.get_study(principal.namespace, name)).model_dump_json(),
                    media_type=_JSON)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=ERROR_RESPONSES, summary="Delete a study with its runs")
def delete_study(name: StudyName, principal: Writer, store: StoreDep, request: Request) -> Response:
    try:
        store.delete_study(principal.namespace, name)
    finally:
        request.app.state.evidence_cache.written()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/critical-batch", response_model=CriticalBatchOut, responses=ERROR_RESPONSES,
            summary="The critical batch along the examples seen, fitted from the runs' noise trajectories",
            description="B_noise(examples seen) = coefficient x examples_seen^exponent, least squares in log-log "
                        "over the trajectory points of the study's newest 64 runs that reported one, with a 95% "
                        "band (`fit.interval` says how it was made) and the study's calibration factor; `points` "
                        "are the runs' points pooled by bins of examples seen. No trajectory yet: 200 with "
                        "`fit: null` and a `reason`. `fit.points` is in the form `reference.noise_trajectory` "
                        "takes.")
def get_critical_batch(name: StudyName, principal: Reader, store: StoreDep) -> Response:
    return Response(critical_batch(store, principal.namespace, name).model_dump_json(), media_type=_JSON)
