"""The asynchronous client: the same surface as :class:`Client`, every method a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

import httpx

from largebatch.scaling_rules.models import Recipe, RecommendationRequest, Reference
from largebatch.scaling_rules.wire import (
    CriticalBatchOut,
    FinalOutcome,
    HealthOut,
    HeartbeatOut,
    MeasuredCriticalBatch,
    MeasuredCriticalBatchIn,
    Page,
    ReadyOut,
    RecommendationIn,
    RecommendationOut,
    ReportIn,
    ReportOut,
    ReportPage,
    Run,
    Study,
)

from ._autoconfigure import autoconfigure_async
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient, Call, Format
from ._client import Client
from .job import Job

__all__ = ["AsyncClient"]

T = TypeVar("T")

_sleep = asyncio.sleep  # tests replace this to run retries without waiting


class AsyncClient(BaseClient):
    """Asynchronous client of the largebatch service (same arguments and methods as :class:`Client`).

    Args:
        base_url: Root of the service (default: ``$LARGEBATCH_URL``, else ``http://127.0.0.1:8000``).
        api_key: Sent as ``Authorization: Bearer <key>`` (default: ``$LARGEBATCH_API_KEY``, else none).
        timeout: Seconds, or an :class:`httpx.Timeout` (default: 30 s, 5 s to connect).
        max_retries: Retries after the first try, for connection errors, 408, 429 and 5xx.
        http_client: An :class:`httpx.AsyncClient` to send with (proxies, custom transports); the
            caller keeps ownership of it and closes it.

    Use it as an async context manager, or await :meth:`close`, to release its connections.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries,
                         default_headers=default_headers)
        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise TypeError(f"http_client must be an httpx.AsyncClient, got {type(http_client).__name__}")
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=self.timeout)

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the connections (only those of an ``http_client`` this client created)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def with_options(self, *, api_key: str | None = None, timeout: float | httpx.Timeout | None = None,
                     max_retries: int | None = None) -> AsyncClient:
        """A client with some options changed, sharing this one's connections."""
        options = self._options()
        if api_key is not None:
            options["api_key"] = api_key
        if timeout is not None:
            options["timeout"] = timeout
        if max_retries is not None:
            options["max_retries"] = max_retries
        return AsyncClient(self.base_url, http_client=self._http, **options)

    def run_channel(self) -> Client:
        """The client a :class:`Job` sends with: a synchronous :class:`Client` of the same
        configuration (the job's reporter is a thread), with its own connections and no retries of
        its own (the job's thread retries, for as long as it takes)."""
        return Client(self.base_url, **{**self._options(), "max_retries": 0})

    # ------------------------------------------------------------------ sending

    async def send(self, call: Call[T]) -> T:
        """Send one :class:`Call` (an endpoint of :class:`BaseClient`) with this client's retries."""
        return await self._request(call)

    async def _request(self, call: Call[T]) -> T:
        call = call.with_key()  # one idempotency key for every try of this call
        retries_taken = 0
        while True:
            request = self._build_request(self._http, call, retries_taken)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                if retries_taken < self.max_retries and self._should_retry_exception(exc):
                    await _sleep(self._retry_delay(retries_taken))
                    retries_taken += 1
                    continue
                raise self._connection_error(exc, request, retries_taken + 1) from None
            if retries_taken < self.max_retries and self._should_retry(response):
                await _sleep(self._retry_delay(retries_taken, response))
                retries_taken += 1
                continue
            return self._process(call, response, retried=retries_taken > 0)

    # ------------------------------------------------------------------ health

    async def healthz(self) -> HealthOut:
        """Liveness: the process answers."""
        return await self._request(self._healthz())

    async def readyz(self) -> ReadyOut:
        """Readiness: the service can reach its store."""
        return await self._request(self._readyz())

    # ------------------------------------------------------------------ studies

    async def create_study(self, name: str, *, model_params: int, model_family: str = "transformer",
                     metric: str = "eval_loss", direction: str = "minimize",
                     idempotency_key: str | None = None) -> Study:
        """Create a study. Raises :class:`AlreadyExistsError` if the name is taken."""
        return await self._request(self._create_study(name, model_params=model_params, model_family=model_family,
                                                metric=metric, direction=direction,
                                                idempotency_key=idempotency_key))

    async def list_studies(self, *, limit: int = 100, offset: int = 0) -> Page[Study]:
        """One page of the studies visible to this key, oldest first."""
        return await self._request(self._list_studies(limit=limit, offset=offset))

    async def iter_studies(self, *, page_size: int = 100) -> AsyncIterator[Study]:
        """Every study, fetching pages of ``page_size`` as needed."""
        offset = 0
        while True:
            page = await self.list_studies(limit=page_size, offset=offset)
            for item in page.items:
                yield item
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    async def get_study(self, name: str) -> Study:
        return await self._request(self._get_study(name))

    async def critical_batch(self, study: str) -> CriticalBatchOut:
        """The study's critical batch along the examples seen: fitted from its runs' noise trajectories, with
        a 95% band; ``fit.points`` is in the form ``reference.noise_trajectory`` takes."""
        return await self._request(self._critical_batch(study))

    async def delete_study(self, name: str, *, idempotency_key: str | None = None) -> None:
        """Delete a study and all its runs."""
        return await self._request(self._delete_study(name, idempotency_key=idempotency_key))

    # ------------------------------------------------------------------ runs

    async def create_run(self, study: str, *, recipe: Recipe | Mapping[str, Any] | None = None,
                   request: RecommendationRequest | Mapping[str, Any] | None = None,
                   environment: Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> Run:
        """Open a run from a recipe you have, or from a request (the service computes the recipe).

        With the same ``idempotency_key`` a second call returns the first run.
        """
        return await self._request(self._create_run(study, recipe=recipe, request=request, environment=environment,
                                              idempotency_key=idempotency_key))

    async def list_runs(self, study: str, *, state: str | None = None, batch_size: int | None = None,
                  limit: int = 100, offset: int = 0) -> Page[Run]:
        """One page of a study's runs, in creation order, optionally filtered."""
        return await self._request(self._list_runs(study, state=state, batch_size=batch_size, limit=limit,
                                             offset=offset))

    async def iter_runs(self, study: str, *, state: str | None = None, batch_size: int | None = None,
                  page_size: int = 100) -> AsyncIterator[Run]:
        offset = 0
        while True:
            page = await self.list_runs(study, state=state, batch_size=batch_size, limit=page_size, offset=offset)
            for item in page.items:
                yield item
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    async def list_runs_csv(self, study: str, *, state: str | None = None, batch_size: int | None = None,
                      limit: int = 1000, offset: int = 0) -> str:
        """A study's runs as CSV text (``?format=csv``)."""
        return await self._request(self._list_runs_csv(study, state=state, batch_size=batch_size, limit=limit,
                                                 offset=offset))

    async def list_reports(self, run_id: int, *, limit: int = 1000, offset: int = 0) -> ReportPage:
        """One page of a run's reported losses, by step (NaN/inf losses are ``None`` with ``finite=False``)."""
        return await self._request(self._list_reports(run_id, limit=limit, offset=offset))

    async def list_reports_csv(self, run_id: int, *, limit: int | None = None, offset: int = 0) -> str:
        """A run's reports as CSV text ``step,loss,grad_norm`` (all of them unless ``limit``; ``nan``/``inf`` kept)."""
        return await self._request(self._list_reports_csv(run_id, limit=limit, offset=offset))

    async def get_run(self, run_id: int) -> Run:
        return await self._request(self._get_run(run_id))

    async def heartbeat(self, run_id: int) -> HeartbeatOut:
        """Renew the run's lease; ``should_stop`` says whether the service wants it stopped."""
        return await self._request(self._heartbeat(run_id))

    async def report(self, run_id: int, step: int, loss: float, grad_norm: float | None = None) -> ReportOut:
        """One intermediate report, sent now. A :class:`Job` batches them in the background instead."""
        return await self._request(self._report(run_id, step, loss, grad_norm))

    async def report_batch(self, run_id: int, reports: Iterable[ReportIn | Mapping[str, Any] | tuple]) -> ReportOut:
        """Several reports in one request; the service is idempotent per step."""
        return await self._request(self._report_batch(run_id, reports))

    async def report_critical_batch(self, run_id: int, measurement: MeasuredCriticalBatchIn | Mapping[str, Any]
                              ) -> MeasuredCriticalBatch:
        """Record a critical batch measured by branching (``job.branch_probe`` sends its own); a resend of the
        same measurement at the same step answers the stored one."""
        return await self._request(self._report_critical_batch(run_id, measurement))

    async def complete_run(self, run_id: int, *, outcome: FinalOutcome = "completed", metric: float | None = None,
                     reason: str | None = None, step: int | None = None) -> Run:
        """Record the final outcome (``completed`` needs ``metric``). Repeating it is a no-op."""
        return await self._request(self._complete_run(run_id, outcome=outcome, metric=metric, reason=reason, step=step))

    # ------------------------------------------------------------------ recommendations

    async def recommend(self, request: RecommendationIn | RecommendationRequest | Mapping[str, Any] | None = None,
                  /, *, idempotency_key: str | None = None, **fields: Any) -> RecommendationOut:
        """Ask for a recipe. ``fields`` set or override request fields (``study=``, ``start_run=True``,
        ``environment=``, ...). With ``start_run`` the answer's ``run`` is the opened run; repeating
        the call with the same ``idempotency_key`` returns that same run."""
        return await self._request(self._recommend(request or {}, fields, idempotency_key))

    async def schedule_plot(self, request: RecommendationIn | RecommendationRequest | Mapping[str, Any],
                      format: Format = "png") -> bytes:
        """The recipe's LR-over-steps plot, as PNG or SVG bytes."""
        return await self._request(self._schedule_plot(request, format))

    # ------------------------------------------------------------------ training jobs

    async def autoconfigure(self, model: Any, *, study: str, reference: Reference | Mapping[str, Any] | None = None,
                      target_batch_size: int | None = None, target_steps: int | None = None,
                      model_params: int | None = None, model_family: str | None = None,
                      environment: Mapping[str, Any] | None = None, idempotency_key: str | None = None,
                      create_study: bool = True, metric: str = "eval_loss", direction: str = "minimize",
                      job_options: Mapping[str, Any] | None = None, **request_fields: Any) -> Job:
        """Ask for a recipe for ``model`` and open a run; return a :class:`Job` with the optimizer
        and scheduler built for it (``largebatch.client.optim.build``). The job reports from a
        background thread with a synchronous client of the same configuration.

        Args:
            model: The ``torch.nn.Module`` to train.
            study: Study to file the run in; created (with ``metric``/``direction``) if missing
                and ``create_study`` is true.
            reference: The small-batch setup that works (``Reference`` or its dict).
            target_batch_size: The batch size to train at; ``target_steps`` an explicit step budget.
            model_family: ``transformer``, ``cnn`` or ``other``; by default inferred from the module
                types (convolutions: cnn; attention or token embeddings: transformer; else other).
            model_params: Parameter count (default: the model's trainable parameters).
            idempotency_key: Reuse it when restarting the same job to get the same run back.
            job_options: Keyword arguments for :class:`Job` (flush interval, heartbeat interval, ...).
            request_fields: Any other :class:`RecommendationIn` field (``rule``, ``budget``,
                ``lr_cap``, ``optimizer``, ``stages``, ...).
        """
        return await autoconfigure_async(self, model, study=study, reference=reference, target_batch_size=target_batch_size,
                             target_steps=target_steps, model_params=model_params, model_family=model_family,
                             environment=environment, idempotency_key=idempotency_key,
                             create_study=create_study, metric=metric, direction=direction,
                             job_options=job_options, **request_fields)
