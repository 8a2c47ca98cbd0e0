"""Probes: ``/healthz`` (the process is alive), ``/readyz`` (the store answers), ``/metrics``."""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from largebatch.scaling_rules.wire import HealthOut, ReadyOut
from largebatch.service.errors import ERROR_RESPONSES, ApiError
from largebatch.service.metrics import CONTENT_TYPE_LATEST
from largebatch.service.routes._fast import FastRoute
from largebatch.service.storage.base import StoreError, StoreUnavailable

router = APIRouter(tags=["operations"])


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("largebatch")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process serves HTTP")
async def healthz() -> HealthOut:
    return HealthOut(status="ok", version=_version())


@functools.cache
def _health_bytes() -> bytes:
    return HealthOut(status="ok", version=_version()).model_dump_json().encode()


async def _fast_healthz(request: Request) -> Response:
    return Response(_health_bytes(), media_type="application/json")


def fast_routes() -> list[FastRoute]:
    """``/healthz`` ahead of every other route: the probe that answers first (the route above documents it)."""
    return [FastRoute("/healthz", _fast_healthz, methods=["GET"], name="healthz")]


@router.get("/readyz", response_model=ReadyOut, responses={503: ERROR_RESPONSES[503]},
            summary="Readiness: the study store answers; its schema versions")
async def readyz(request: Request) -> ReadyOut:
    holder = request.app.state.store_holder

    def probe() -> dict[str, str]:
        store = holder.get()
        store.ping(write=True)
        return store.schema_versions()

    settings = request.app.state.settings
    try:
        # Bounded whatever the database does (a held lock, a full pool, a dead host): the probe's thread
        # finishes in the background within the store's own timeouts.
        versions = await asyncio.wait_for(run_in_threadpool(probe), settings.ready_timeout_s)
    except (StoreError, TimeoutError) as e:
        why = str(e) if isinstance(e, StoreUnavailable) else f"no answer within {settings.ready_timeout_s:g}s"
        raise ApiError("store_unavailable", f"the study store is unreachable: {why}",
                       headers={"Retry-After": str(settings.retry_after_s)}) from None
    return ReadyOut(status="ready", version=_version(), schema_versions=versions)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}},
            summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
