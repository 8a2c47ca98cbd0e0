"""What the sync and async clients share: configuration, request building, retry policy, parsing.

:class:`Client` and :class:`AsyncClient` differ only in how they send a request and how they
sleep between tries. Everything else is here, so the two cannot drift apart:

* Each endpoint is a method of :class:`BaseClient` returning a :class:`Call` (method, path, query,
  body, how to parse the answer); the public methods are one line each.
* The retry policy (:func:`is_transient`, :func:`retry_delay`; a :class:`~largebatch.client.Job`
  retries by the same policy): connection errors and timeouts, 408, 429 and 5xx are retried up to
  ``max_retries`` times with exponential backoff and full jitter, honouring ``Retry-After``; any
  other 4xx is raised at once.
* :class:`RunChannel`: the few calls a :class:`~largebatch.client.Job` makes; both clients hand
  a job one (:meth:`BaseClient.run_channel`).
* Writes (POST, DELETE) carry an ``Idempotency-Key`` header, chosen once per call and resent
  unchanged on every retry, so a write whose response was lost is not applied twice.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from largebatch.scaling_rules.models import Recipe, RecommendationRequest
from largebatch.scaling_rules.wire import (
    NAME_PATTERN,
    CompleteIn,
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
    ReportBatchIn,
    ReportIn,
    ReportOut,
    ReportPage,
    Run,
    RunCreate,
    Study,
    StudyCreate,
)

from . import errors
from ._version import __version__

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "BaseClient",
    "Call",
    "RunChannel",
    "is_transient",
    "retry_delay",
]

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"  # `largebatch serve`'s default
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5  # seconds before the first retry; doubles each time
MAX_RETRY_DELAY = 8.0  # cap of the exponential backoff
MAX_RETRY_AFTER = 60.0  # a Retry-After above this is not waited for (the backoff applies instead)
RETRY_STATUSES = frozenset({408, 429})  # plus every 5xx
_NAME = re.compile(NAME_PATTERN)

# httpx logs every request at INFO, so `logging.basicConfig(level=logging.INFO)` buried a job's
# progress line under a line per report (and showed the 404 of a study's first recommendation,
# which the client answers by creating the study). An application that set httpx's level keeps it.
def _quiet_httpx() -> None:
    log = logging.getLogger("httpx")
    if log.level == logging.NOTSET:
        log.setLevel(logging.WARNING)


_quiet_httpx()

Format = Literal["png", "svg"]


def is_transient(exc: BaseException) -> bool:
    """Worth trying again later: no response (connection error, timeout), or 408, 429, 5xx."""
    if isinstance(exc, errors.APIConnectionError):
        return True
    if isinstance(exc, errors.APIStatusError):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


def retry_delay(retries_taken: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number ``retries_taken + 1``.

    ``Retry-After`` (seconds or an HTTP date) wins when it is between 0 and
    :data:`MAX_RETRY_AFTER`; otherwise exponential backoff with full jitter:
    uniform in [0.5, 1] x min(INITIAL_RETRY_DELAY x 2**retries_taken, MAX_RETRY_DELAY).
    """
    after = _retry_after_seconds(retry_after)
    if after is not None and 0 <= after <= MAX_RETRY_AFTER:
        return after
    base = min(INITIAL_RETRY_DELAY * 2.0 ** max(retries_taken, 0), MAX_RETRY_DELAY)
    return base * (1.0 - 0.5 * random.random())


def _new_idempotency_key() -> str:
    return f"lb-{uuid.uuid4().hex}"


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)


def _encode_json(payload: Any) -> bytes:
    # httpx's json= refuses NaN; a diverging job must be able to say its loss is NaN, and the
    # service parses the non-standard NaN/Infinity tokens the way Python's json module writes them.
    return json.dumps(payload, allow_nan=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, before it is sent: the request and how to read a successful answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    body: Any = None
    accept: str = "application/json"
    idempotency_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")

    def with_key(self) -> Call[T]:
        """This call with its idempotency key fixed (a new one for writes that have none)."""
        if not self.is_write or self.idempotency_key is not None:
            return self
        return replace(self, idempotency_key=_new_idempotency_key())


def _parse_model(model: Any) -> Callable[[httpx.Response], Any]:
    adapter = TypeAdapter(model)

    def parse(response: httpx.Response) -> Any:
        try:
            return adapter.validate_json(response.content)
        except ValidationError as e:
            raise errors.APIResponseError(
                f"{response.request.method} {response.request.url.path}: the response is not a valid "
                f"{getattr(model, '__name__', model)}: {e.errors()[:3]}",
                response=response,
            ) from e

    return parse


def _parse_none(response: httpx.Response) -> None:
    return None


def _parse_bytes(response: httpx.Response) -> bytes:
    return response.content


def _parse_text(response: httpx.Response) -> str:
    return response.text


_parse_study = _parse_model(Study)
_parse_study_page = _parse_model(Page[Study])
_parse_critical_batch = _parse_model(CriticalBatchOut)
_parse_run = _parse_model(Run)
_parse_run_page = _parse_model(Page[Run])
_parse_report_out = _parse_model(ReportOut)
_parse_report_page = _parse_model(ReportPage)
_parse_heartbeat = _parse_model(HeartbeatOut)
_parse_measured = _parse_model(MeasuredCriticalBatch)
_parse_recommendation = _parse_model(RecommendationOut)
_parse_health = _parse_model(HealthOut)
_parse_ready = _parse_model(ReadyOut)


def _recommendation_in(request: RecommendationIn | RecommendationRequest | Mapping[str, Any],
                       overrides: Mapping[str, Any]) -> RecommendationIn:
    """Validate here, before anything is sent: a typo is a local pydantic error, not a 422."""
    if isinstance(request, BaseModel):
        data = request.model_dump(exclude_unset=True)
    else:
        data = dict(request)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RecommendationIn.model_validate(data)


def _report(item: ReportIn | Mapping[str, Any] | tuple) -> ReportIn:
    if isinstance(item, ReportIn):
        return item
    if isinstance(item, tuple):
        return ReportIn(step=item[0], loss=item[1], grad_norm=item[2] if len(item) > 2 else None)
    return ReportIn.model_validate(item)


class RunChannel(Protocol):
    """What a :class:`~largebatch.client.Job` needs of the service: open its study and run, report,
    heartbeat, complete, read. Synchronous (the job's reporter is a thread) and without retries of
    its own: the job retries by :func:`is_transient` / :func:`retry_delay`, for as long as it takes.
    :meth:`Client.run_channel` and :meth:`AsyncClient.run_channel` return one."""

    def create_study(self, name: str, *, model_params: int, model_family: str = ..., metric: str = ...,
                     direction: str = ..., idempotency_key: str | None = None) -> Study: ...

    def get_study(self, name: str) -> Study: ...

    def create_run(self, study: str, *, recipe: Recipe | Mapping[str, Any] | None = None,
                   request: RecommendationRequest | Mapping[str, Any] | None = None,
                   environment: Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> Run: ...

    def get_run(self, run_id: int) -> Run: ...

    def report_batch(self, run_id: int, reports: Iterable[ReportIn | Mapping[str, Any] | tuple]) -> ReportOut: ...

    def heartbeat(self, run_id: int) -> HeartbeatOut: ...

    def report_critical_batch(self, run_id: int, measurement: MeasuredCriticalBatchIn | Mapping[str, Any]
                              ) -> MeasuredCriticalBatch: ...

    def complete_run(self, run_id: int, *, outcome: FinalOutcome = ..., metric: float | None = None,
                     reason: str | None = None, step: int | None = None) -> Run: ...


class BaseClient:
    """Configuration and endpoint definitions shared by :class:`Client` and :class:`AsyncClient`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get("LARGEBATCH_URL") or DEFAULT_URL
        if api_key is None:
            api_key = os.environ.get("LARGEBATCH_API_KEY") or None
        url = httpx.URL(str(base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000, got {base_url!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.base_url = str(url).rstrip("/")
        self.api_key = api_key
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self._default_headers = dict(default_headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, max_retries={self.max_retries})"

    def _options(self) -> dict[str, Any]:
        return {"api_key": self.api_key, "timeout": self.timeout, "max_retries": self.max_retries,
                "default_headers": self._default_headers}

    def run_channel(self) -> RunChannel:
        """The client a :class:`~largebatch.client.Job` talks to the service with (see :class:`RunChannel`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ request / response

    def _headers(self, call: Call[Any], retries_taken: int) -> dict[str, str]:
        headers = {"Accept": call.accept, "User-Agent": f"largebatch-client/{__version__}",
                   **self._default_headers, **call.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        if retries_taken:
            headers["X-Largebatch-Retry"] = str(retries_taken)
        return headers

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any],
                       retries_taken: int) -> httpx.Request:
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        return http.build_request(
            call.method,
            self.base_url + call.path,
            params=params or None,
            content=_encode_json(call.body) if call.body is not None else None,
            headers=self._headers(call, retries_taken),
            timeout=self.timeout,
        )

    @staticmethod
    def _should_retry(response: httpx.Response) -> bool:
        return response.status_code in RETRY_STATUSES or response.status_code >= 500

    @staticmethod
    def _should_retry_exception(exc: httpx.TransportError) -> bool:
        # A bad URL scheme or a misconfigured proxy does not heal by waiting.
        return not isinstance(exc, (httpx.UnsupportedProtocol, httpx.ProxyError))

    def _retry_delay(self, retries_taken: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number ``retries_taken + 1`` (see :func:`retry_delay`)."""
        return retry_delay(retries_taken, response.headers.get("retry-after") if response is not None else None)

    def _connection_error(self, exc: httpx.TransportError, request: httpx.Request,
                          tries: int) -> errors.APIConnectionError:
        """One line a newcomer can act on: where, what was tried, how often, and what to check.
        Raised without the transport's exception chain (it stays on ``__context__``)."""
        after = f" after {tries} tries" if tries > 1 else ""
        what = f"{request.method} {request.url.path}: {exc or type(exc).__name__}"
        if isinstance(exc, httpx.TimeoutException):
            return errors.APITimeoutError(f"no answer from {self.base_url}{after} ({what}, timed out): is "
                                          "`largebatch serve` running there, and not overloaded?", request=request)
        return errors.APIConnectionError(f"cannot reach {self.base_url}{after} ({what}): is `largebatch serve` "
                                         "running there?", request=request)

    @staticmethod
    def _process(call: Call[T], response: httpx.Response, *, retried: bool = False) -> T:
        if response.is_success:
            return call.parse(response)
        if retried and call.method == "DELETE" and response.status_code == 404:
            # An earlier try whose answer was lost did the delete: what was asked for is done.
            return call.parse(response)
        raise errors.error_from_response(response)

    # ------------------------------------------------------------------ endpoints

    def _healthz(self) -> Call[HealthOut]:
        return Call("GET", "/healthz", _parse_health)

    def _readyz(self) -> Call[ReadyOut]:
        return Call("GET", "/readyz", _parse_ready)

    def _create_study(self, name: str, *, model_params: int, model_family: str, metric: str,
                      direction: str, idempotency_key: str | None) -> Call[Study]:
        body = StudyCreate(name=name, model_params=model_params, model_family=model_family,  # type: ignore[arg-type]
                           metric=metric, direction=direction)  # type: ignore[arg-type]
        return Call("POST", "/v1/studies", _parse_study, body=_dump(body), idempotency_key=idempotency_key)

    def _list_studies(self, *, limit: int, offset: int) -> Call[Page[Study]]:
        return Call("GET", "/v1/studies", _parse_study_page, params={"limit": limit, "offset": offset})

    def _get_study(self, name: str) -> Call[Study]:
        return Call("GET", f"/v1/studies/{_segment(name)}", _parse_study)

    def _critical_batch(self, name: str) -> Call[CriticalBatchOut]:
        return Call("GET", f"/v1/studies/{_segment(name)}/critical-batch", _parse_critical_batch)

    def _delete_study(self, name: str, *, idempotency_key: str | None) -> Call[None]:
        return Call("DELETE", f"/v1/studies/{_segment(name)}", _parse_none, idempotency_key=idempotency_key)

    def _create_run(self, study: str, *, recipe: Recipe | Mapping[str, Any] | None,
                    request: RecommendationRequest | Mapping[str, Any] | None,
                    environment: Mapping[str, Any] | None, idempotency_key: str | None) -> Call[Run]:
        if (recipe is None) == (request is None):
            raise ValueError("give exactly one of recipe= (a recipe you have) or request= (the service computes it)")
        body = RunCreate(
            recipe=recipe if recipe is None or isinstance(recipe, Recipe) else Recipe.model_validate(recipe),
            request=(request if request is None or isinstance(request, RecommendationRequest)
                     else RecommendationRequest.model_validate(request)),
            environment=dict(environment or {}),
        )
        return Call("POST", f"/v1/studies/{_segment(study)}/runs", _parse_run, body=_dump(body),
                    idempotency_key=idempotency_key)

    def _list_runs(self, study: str, *, state: str | None, batch_size: int | None, limit: int,
                   offset: int) -> Call[Page[Run]]:
        return Call("GET", f"/v1/studies/{_segment(study)}/runs", _parse_run_page,
                    params={"state": state, "batch_size": batch_size, "limit": limit, "offset": offset})

    def _list_runs_csv(self, study: str, *, state: str | None, batch_size: int | None, limit: int,
                       offset: int) -> Call[str]:
        return Call("GET", f"/v1/studies/{_segment(study)}/runs", _parse_text, accept="text/csv",
                    params={"format": "csv", "state": state, "batch_size": batch_size, "limit": limit,
                            "offset": offset})

    def _get_run(self, run_id: int) -> Call[Run]:
        return Call("GET", f"/v1/runs/{_run_id(run_id)}", _parse_run)

    def _list_reports(self, run_id: int, *, limit: int, offset: int) -> Call[ReportPage]:
        return Call("GET", f"/v1/runs/{_run_id(run_id)}/reports", _parse_report_page,
                    params={"limit": limit, "offset": offset})

    def _list_reports_csv(self, run_id: int, *, limit: int | None, offset: int) -> Call[str]:
        return Call("GET", f"/v1/runs/{_run_id(run_id)}/reports", _parse_text, accept="text/csv",
                    params={"format": "csv", "limit": limit, "offset": offset})

    def _heartbeat(self, run_id: int) -> Call[HeartbeatOut]:
        # Every POST carries a JSON body (the service refuses a body-less one: a cross-site page can send that).
        return Call("POST", f"/v1/runs/{_run_id(run_id)}/heartbeat", _parse_heartbeat, body={})

    def _report(self, run_id: int, step: int, loss: float, grad_norm: float | None) -> Call[ReportOut]:
        body = ReportIn(step=step, loss=loss, grad_norm=grad_norm)
        return Call("POST", f"/v1/runs/{_run_id(run_id)}/reports", _parse_report_out, body=_dump(body))

    def _report_batch(self, run_id: int, reports: Iterable[ReportIn | Mapping[str, Any] | tuple]) -> Call[ReportOut]:
        body = ReportBatchIn(reports=[_report(r) for r in reports])
        return Call("POST", f"/v1/runs/{_run_id(run_id)}/reports", _parse_report_out, body=_dump(body))

    def _report_critical_batch(self, run_id: int, measurement: MeasuredCriticalBatchIn | Mapping[str, Any]
                               ) -> Call[MeasuredCriticalBatch]:
        body = measurement if isinstance(measurement, MeasuredCriticalBatchIn) else \
            MeasuredCriticalBatchIn.model_validate(measurement)
        return Call("POST", f"/v1/runs/{_run_id(run_id)}/critical-batches", _parse_measured, body=_dump(body))

    def _complete_run(self, run_id: int, *, outcome: FinalOutcome, metric: float | None, reason: str | None,
                      step: int | None) -> Call[Run]:
        body = CompleteIn(outcome=outcome, metric=metric, reason=reason, step=step)
        return Call("POST", f"/v1/runs/{_run_id(run_id)}/complete", _parse_run, body=_dump(body))

    def _recommend(self, request: RecommendationIn | RecommendationRequest | Mapping[str, Any],
                   overrides: Mapping[str, Any], idempotency_key: str | None) -> Call[RecommendationOut]:
        body = _recommendation_in(request, overrides)
        return Call("POST", "/v1/recommendations", _parse_recommendation,
                    body=body.model_dump(mode="json", exclude_unset=True), idempotency_key=idempotency_key)

    def _schedule_plot(self, request: RecommendationIn | RecommendationRequest | Mapping[str, Any],
                       fmt: Format) -> Call[bytes]:
        if fmt not in ("png", "svg"):
            raise ValueError(f"format must be 'png' or 'svg', got {fmt!r}")
        body = _recommendation_in(request, {})
        accept = "image/png" if fmt == "png" else "image/svg+xml"
        return Call("POST", f"/v1/recommendations/schedule.{fmt}", _parse_bytes,
                    body=body.model_dump(mode="json", exclude_unset=True), accept=accept)


def _segment(name: str) -> str:
    # Names are URL-safe by construction (letters, digits, '_', '.', '-'); anything else is refused
    # here rather than sent to a path it was not meant for.
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"not a study name: {name!r} (letters, digits, '_', '.', '-'; at most 128)")
    return name


def _run_id(run_id: int) -> int:
    if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id < 0:
        raise ValueError(f"run id must be an int >= 0, got {run_id!r}")
    return run_id


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) else None
