"""The FastAPI application: ``create_app(settings=None, *, store=None)``.

The lifespan opens the study store (unless one is injected), starts the lease sweeper, and on
shutdown stops the sweeper and closes the store it opened. ``create_app_from_env`` is the factory
uvicorn workers call (``largebatch serve`` passes its options through ``LARGEBATCH_*`` variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from largebatch.service.auth import KeyCache
from largebatch.service.browser import BrowserGuardMiddleware
from largebatch.service.deps import StoreHolder
from largebatch.service.divergence import DivergenceRule
from largebatch.service.errors import install_error_handlers
from largebatch.service.metrics import Metrics, MetricsMiddleware
from largebatch.service.middleware import (
    InternalErrorMiddleware,
    RateLimitMiddleware,
    StrictJsonMiddleware,
)
from largebatch.service.recipes import EvidenceCache, RecipeMemo
from largebatch.service.settings import Settings
from largebatch.service.storage.base import StoreError, StudyStore

__all__ = ["create_app", "create_app_from_env", "sweep_once"]

log = logging.getLogger("largebatch.service")

DESCRIPTION = """\
Large-batch training recipes (LAMB/LANS) as a service, learning from the runs it hands out.

Every failure answers `{"type": ..., "detail": ...}`; `type` is one of a fixed set
(`largebatch.scaling_rules.wire.ERROR_TYPES`). Send API keys as `Authorization: Bearer <key>`.
"""


def sweep_once(app: FastAPI) -> list[int]:
    """Mark every run whose lease expired as ``preempted`` (what the background sweeper does)."""
    ids = app.state.store_holder.get().expire_leases()
    if ids:
        app.state.metrics.preempted.inc(len(ids))
        log.info("lease sweeper: %d run(s) preempted: %s", len(ids), ids[:20])
    return ids


async def _sweeper(app: FastAPI) -> None:
    interval = app.state.settings.sweep_interval_s
    await asyncio.sleep(random.uniform(0, interval))  # replicas started together do not sweep in step
    while True:
        try:
            await run_in_threadpool(sweep_once, app)
        except StoreError as e:
            log.warning("lease sweeper: %s", e)
        except Exception:
            log.exception("lease sweeper failed")
        await asyncio.sleep(interval * random.uniform(0.9, 1.1))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    holder: StoreHolder = app.state.store_holder
    await run_in_threadpool(holder.open)
    task = asyncio.create_task(_sweeper(app), name="largebatch-lease-sweeper")
    # Everything loaded so far (FastAPI, SQLAlchemy, Optuna, ...) lives as long as the process: take it out
    # of the cyclic GC's reach, so full collections stay short and do not show up as latency spikes.
    gc.freeze()
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await run_in_threadpool(holder.close)


def create_app(settings: Settings | None = None, *, store: StudyStore | None = None) -> FastAPI:
    """Build the app. ``store``: use this store (tests, embedding) instead of opening ``settings.store_url``;
    the caller keeps ownership of it (it is not closed on shutdown)."""
    from largebatch.service.routes import health, recommendations, runs, studies, ui, views

    settings = settings or Settings()
    holder = StoreHolder(settings, store)
    metrics = Metrics(lambda: holder.store)
    middleware = [Middleware(BrowserGuardMiddleware, allowed_hosts=settings.allowed_hosts),
                  Middleware(MetricsMiddleware, metrics=metrics), Middleware(InternalErrorMiddleware)]
    if settings.rate_limit_per_s:
        middleware.append(Middleware(RateLimitMiddleware, rate=settings.rate_limit_per_s,
                                     burst=settings.rate_limit_burst))
    # Innermost: a limited client's body is never read.
    middleware.append(Middleware(StrictJsonMiddleware, max_bytes=settings.max_body_bytes))
    app = FastAPI(
        title="largebatch",
        version="1",
        description=DESCRIPTION,
        lifespan=_lifespan,
        middleware=middleware,
        docs_url=None,  # ui.install serves both from the package: no CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store_holder = holder
    app.state.metrics = metrics
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    app.state.evidence_cache = EvidenceCache(fresh_s=settings.evidence_fresh_s)
    app.state.recipe_memo = RecipeMemo()
    app.state.divergence = DivergenceRule(settings.divergence_factor, settings.divergence_window)
    install_error_handlers(app)
    # First: they serve; the APIRoutes of the same paths document them.
    app.router.routes.extend([*health.fast_routes(), *recommendations.fast_routes()])
    app.include_router(recommendations.router)
    app.include_router(studies.router)
    app.include_router(runs.router)
    app.include_router(views.router)
    app.include_router(health.router)
    ui.install(app)
    return app


def create_app_from_env() -> FastAPI:
    """Uvicorn factory (``largebatch.service.app:create_app_from_env``): settings from ``LARGEBATCH_*``."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.open_mode:
        log.warning("OPEN MODE: requests without an API key act in namespace %r with WRITE scope. "
                    "Use --require-keys (LARGEBATCH_OPEN_MODE=false) on any shared network.", settings.open_namespace)
    return create_app(settings)
