"""Prometheus metrics: requests and latencies per route, requests in flight, store pool use,
divergences detected and leases expired.

Each app has its own registry (several apps in one process never collide). With several uvicorn
workers, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory: the counters are then shared
through it and any worker's ``/metrics`` shows the sum (pool gauges stay per worker, labelled pid).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _PoolCollector:
    """Reads the store's SQLAlchemy pool at scrape time (if the store exposes one)."""

    def __init__(self, get_store: Callable[[], Any]):
        self._get_store = get_store

    def _pool(self) -> Any:
        store = self._get_store()
        if store is None:
            return None
        for path in (("engine",), ("_engine",), ("db", "engine"), ("_db", "engine")):
            obj: Any = store
            for attr in path:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if obj is not None and hasattr(obj, "pool"):
                return obj.pool
        return None

    def describe(self):
        return []

    def collect(self):
        pool = self._pool()
        pid = str(os.getpid())
        checked_out = GaugeMetricFamily("largebatch_store_pool_checked_out",
                                        "Store connections in use", labels=["pid"])
        size = GaugeMetricFamily("largebatch_store_pool_size", "Store connection pool size", labels=["pid"])
        overflow = GaugeMetricFamily("largebatch_store_pool_overflow",
                                     "Store connections beyond the pool size", labels=["pid"])
        if pool is not None:
            for family, name in ((checked_out, "checkedout"), (size, "size"), (overflow, "overflow")):
                fn = getattr(pool, name, None)
                if callable(fn):
                    try:
                        # SQLAlchemy counts overflow from -pool_size; below the pool size there is none.
                        family.add_metric([pid], float(max(0, fn()) if name == "overflow" else fn()))
                    except Exception:  # a pool kind without that figure (StaticPool, NullPool)
                        pass
        yield checked_out
        yield size
        yield overflow


class Metrics:
    def __init__(self, get_store: Callable[[], Any]):
        self.registry = CollectorRegistry()
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        reg = None if multiproc else self.registry
        if multiproc:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
        self.requests = Counter("largebatch_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=reg)
        self.latency = Histogram("largebatch_http_request_duration_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=_BUCKETS, registry=reg)
        gauge_kw = {"multiprocess_mode": "livesum"} if multiproc else {}
        self.in_flight = Gauge("largebatch_http_requests_in_flight", "HTTP requests being served",
                               registry=reg, **gauge_kw)
        self.divergences = Counter("largebatch_runs_diverged_by_service",
                                   "Runs the service marked diverged from their reports", registry=reg)
        self.preempted = Counter("largebatch_runs_preempted", "Runs the lease sweeper marked preempted",
                                 registry=reg)
        # Sweeper guesses proved wrong (the job spoke again): a high rate says LEASE_SECONDS is too short.
        self.revived = Counter("largebatch_runs_revived", "Preempted runs made running again by their job",
                               registry=reg)
        self.registry.register(_PoolCollector(get_store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request under its route template (never the raw path)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # routes x statuses: small

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            key = (scope.get("method", ""), path, status)
            children = self._children.get(key)
            if children is None:  # label lookups cost more than the counting: do them once per label set
                children = (m.requests.labels(key[0], path, str(status)), m.latency.labels(key[0], path))
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
