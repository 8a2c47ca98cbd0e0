"""Retries, backoff, idempotency keys and error mapping, against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pydantic
import pytest

import largebatch.client._async_client as async_mod
import largebatch.client._client as sync_mod
from largebatch.client import (
    ERROR_CLASSES,
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    Client,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    Page,
    RateLimitError,
    Run,
    ServerError,
    StoreUnavailableError,
    Study,
    _base,
)
from largebatch.scaling_rules.wire import ERROR_TYPES

BASE = "http://lb.test"
NOW = "2026-01-01T00:00:00Z"
STUDY = {"name": "s", "namespace": "default", "model_family": "transformer", "model_params": 1000,
         "metric": "eval_loss", "direction": "minimize", "created_at": NOW, "n_runs": 0}
RECIPE = {"optimizer": {"name": "lamb", "lr": 0.01},
          "stages": [{"batch_size": 64, "steps": 10, "peak_lr": 0.01, "warmup_steps": 2, "const_steps": 0,
                      "decay_steps": 8, "warmup_ratio": 0.2, "const_ratio": 0.0}],
          "total_steps": 10}
RUN = {"id": 7, "study": "s", "namespace": "default", "number": 0, "state": "running", "batch_size": 64,
       "peak_lr": 0.01, "warmup_ratio": 0.2, "const_ratio": 0.0, "optimizer": "lamb", "steps": 10,
       "recipe": RECIPE, "recipe_hash": "x", "created_at": NOW, "updated_at": NOW}


@pytest.fixture
def sleeps(monkeypatch):
    """Record the backoff delays instead of waiting them."""
    slept: list[float] = []

    async def async_sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(sync_mod, "_sleep", slept.append)
    monkeypatch.setattr(async_mod, "_sleep", async_sleep)
    return slept


class Recorder:
    """A handler answering from a script of responses/exceptions, recording every request."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        if callable(item):
            return item(request)
        return item


def error(status: int, type_: str | None = None, detail: str = "nope", **headers) -> httpx.Response:
    body = {"type": type_, "detail": detail} if type_ else {"detail": detail}
    return httpx.Response(status, json=body, headers=headers)


def sync_client(handler, **kw) -> Client:
    return Client(BASE, http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kw)


def async_client(handler, **kw) -> AsyncClient:
    return AsyncClient(BASE, http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), **kw)


# ---------------------------------------------------------------------------- the mapping table


def test_one_class_per_wire_error_type_with_its_status():
    assert set(ERROR_CLASSES) == set(ERROR_TYPES)
    for type_, cls in ERROR_CLASSES.items():
        assert issubclass(cls, APIStatusError)
        assert cls.status_code == ERROR_TYPES[type_], type_
        assert cls.type == type_
    assert len(set(ERROR_CLASSES.values())) == len(ERROR_CLASSES)  # 1:1


@pytest.mark.parametrize("type_", sorted(ERROR_TYPES))
def test_each_error_type_raises_its_exception(type_, sleeps):
    status = ERROR_TYPES[type_]
    rec = Recorder(error(status, type_, detail=f"detail of {type_}"))
    client = sync_client(rec, max_retries=2)
    with pytest.raises(ERROR_CLASSES[type_]) as info:
        client.get_study("s")
    e = info.value
    assert e.status_code == status and e.type == type_ and e.detail == f"detail of {type_}"
    assert type_ in str(e) and f"detail of {type_}" in str(e)
    retried = status in (408, 429) or status >= 500
    assert len(rec.requests) == (3 if retried else 1)
    assert len(sleeps) == (2 if retried else 0)


def test_validation_detail_list_is_readable():
    detail = [{"loc": ["body", "reference", "lr"], "msg": "lr must be > 0", "type": "value_error"}]
    rec = Recorder(httpx.Response(422, json={"type": "validation_error", "detail": detail}))
    with pytest.raises(InvalidRequestError, match=r"reference\.lr: lr must be > 0") as info:
        sync_client(rec).get_study("s")
    assert info.value.detail == detail


@pytest.mark.parametrize(("status", "cls"), [(502, ServerError), (504, ServerError), (409, ConflictError),
                                             (404, NotFoundError), (418, APIStatusError)])
def test_without_a_known_type_the_status_decides(status, cls, sleeps):
    rec = Recorder(httpx.Response(status, text="<html>proxy says no</html>"))
    with pytest.raises(cls) as info:
        sync_client(rec, max_retries=0).get_study("s")
    assert type(info.value) is cls
    assert info.value.status_code == status and info.value.body is None
    assert "proxy says no" in str(info.value)


# ---------------------------------------------------------------------------- retries


FAILURES = {
    "connect": lambda: httpx.ConnectError("refused"),
    "read_timeout": lambda: httpx.ReadTimeout("slow"),
    "408": lambda: error(408, None),
    "429": lambda: error(429, "rate_limited"),
    "500": lambda: error(500, "internal_error"),
    "502": lambda: httpx.Response(502, text="bad gateway"),
    "503": lambda: error(503, "store_unavailable"),
}


@pytest.mark.parametrize("mode", sorted(FAILURES))
@pytest.mark.parametrize("failures_before_success", [0, 1, 3])
def test_retries_taken(mode, failures_before_success, sleeps):
    rec = Recorder(*[FAILURES[mode]() for _ in range(failures_before_success)], httpx.Response(200, json=STUDY))
    study = sync_client(rec, max_retries=3).get_study("s")
    assert isinstance(study, Study) and study.name == "s"
    assert len(rec.requests) == failures_before_success + 1
    assert len(sleeps) == failures_before_success
    assert [r.headers.get("X-Largebatch-Retry") for r in rec.requests[1:]] == [
        str(i) for i in range(1, failures_before_success + 1)]


@pytest.mark.parametrize("mode", sorted(FAILURES))
def test_gives_up_after_max_retries(mode, sleeps):
    rec = Recorder(FAILURES[mode]())
    expected = {"connect": APIConnectionError, "read_timeout": APITimeoutError}.get(mode, APIStatusError)
    with pytest.raises(expected):
        sync_client(rec, max_retries=2).get_study("s")
    assert len(rec.requests) == 3


def test_max_retries_zero_tries_once(sleeps):
    rec = Recorder(httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError) as info:
        sync_client(rec, max_retries=0).get_study("s")
    assert not isinstance(info.value, APITimeoutError)
    assert len(rec.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 413, 415, 422])
def test_no_retry_on_4xx(status, sleeps):
    rec = Recorder(error(status, None))
    with pytest.raises(APIStatusError):
        sync_client(rec, max_retries=5).create_study("s", model_params=10)
    assert len(rec.requests) == 1 and sleeps == []


def test_retry_after_seconds_is_honoured(sleeps):
    rec = Recorder(error(429, "rate_limited", **{"Retry-After": "3"}),
                   error(503, "store_unavailable", **{"Retry-After": "0.5"}), httpx.Response(200, json=STUDY))
    sync_client(rec, max_retries=2).get_study("s")
    assert sleeps == [3.0, 0.5]


def test_retry_after_http_date_is_honoured(sleeps):
    when = datetime.now(timezone.utc) + timedelta(seconds=20)
    rec = Recorder(error(503, "store_unavailable", **{"Retry-After": format_datetime(when, usegmt=True)}),
                   httpx.Response(200, json=STUDY))
    sync_client(rec).get_study("s")
    assert 15 < sleeps[0] <= 20


def test_unreasonable_retry_after_falls_back_to_backoff(sleeps):
    rec = Recorder(error(429, "rate_limited", **{"Retry-After": "3600"}), httpx.Response(200, json=STUDY))
    sync_client(rec).get_study("s")
    assert 0 < sleeps[0] <= _base.INITIAL_RETRY_DELAY


def test_rate_limit_error_exposes_retry_after(sleeps):
    rec = Recorder(error(429, "rate_limited", **{"Retry-After": "7"}))
    with pytest.raises(RateLimitError) as info:
        sync_client(rec, max_retries=0).get_study("s")
    assert info.value.retry_after == "7"


def test_backoff_is_exponential_with_jitter_and_capped():
    client = Client(BASE)
    for attempt in range(8):
        cap = min(_base.INITIAL_RETRY_DELAY * 2**attempt, _base.MAX_RETRY_DELAY)
        delays = [client._retry_delay(attempt) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 100  # jitter
    client.close()


def test_no_retry_on_a_bad_url_scheme_error(sleeps):
    rec = Recorder(httpx.UnsupportedProtocol("nope"))
    with pytest.raises(APIConnectionError):
        sync_client(rec, max_retries=3).get_study("s")
    assert len(rec.requests) == 1


# ---------------------------------------------------------------------------- idempotency


def test_retried_write_carries_the_same_idempotency_key(sleeps):
    rec = Recorder(httpx.ReadTimeout("response lost"), error(503, "store_unavailable"),
                   httpx.Response(201, json=RUN))
    client = sync_client(rec, max_retries=2)
    run = client.create_run("s", recipe=RECIPE)
    assert isinstance(run, Run) and run.id == 7
    keys = [r.headers["Idempotency-Key"] for r in rec.requests]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0].startswith("lb-")
    # every try sends the same body too
    assert len({r.content for r in rec.requests}) == 1
    # a new call is a new operation: a new key
    rec2 = Recorder(httpx.Response(201, json=RUN))
    sync_client(rec2).create_run("s", recipe=RECIPE)
    assert rec2.requests[0].headers["Idempotency-Key"] != keys[0]


def test_explicit_idempotency_key_is_sent_verbatim_on_every_try(sleeps):
    rec = Recorder(httpx.ConnectError("down"), httpx.Response(200, json={**RECIPE, "run": RUN}))
    out = sync_client(rec).recommend(
        {"model": {"params": 1000}, "reference": {"batch_size": 8, "lr": 1e-3, "steps": 100},
         "target": {"batch_size": 64}}, study="s", start_run=True, idempotency_key="job-42")
    assert out.run is not None and out.run.id == 7
    assert [r.headers["Idempotency-Key"] for r in rec.requests] == ["job-42", "job-42"]
    body = json.loads(rec.requests[0].content)
    assert body["study"] == "s" and body["start_run"] is True


def test_a_delete_whose_answer_was_lost_is_done_when_the_retry_finds_nothing(sleeps):
    rec = Recorder(httpx.ReadTimeout("answer lost"), error(404, "not_found"))
    assert sync_client(rec).delete_study("s") is None
    assert len(rec.requests) == 2
    # Without a lost try, 404 is the caller's mistake and says so.
    with pytest.raises(NotFoundError):
        sync_client(Recorder(error(404, "not_found"))).delete_study("s")
    # Only deletes: a GET that finds nothing after a retry is still not found.
    with pytest.raises(NotFoundError):
        sync_client(Recorder(httpx.ReadTimeout("lost"), error(404, "not_found"))).get_study("s")


def test_async_delete_whose_answer_was_lost_is_done(sleeps):
    rec = Recorder(error(502), error(404, "not_found"))

    async def go():
        async with async_client(rec) as client:
            return await client.delete_study("s")

    assert asyncio.run(go()) is None and len(rec.requests) == 2


def test_reads_carry_no_idempotency_key():
    rec = Recorder(httpx.Response(200, json=STUDY))
    sync_client(rec).get_study("s")
    assert "Idempotency-Key" not in rec.requests[0].headers


# ---------------------------------------------------------------------------- requests and typed responses


def test_requests_are_built_as_the_contract_says():
    page = {"items": [RUN], "total": 1, "limit": 10, "offset": 0}
    rec = Recorder(lambda r: httpx.Response(200, json=page))
    client = sync_client(rec, api_key="k-123")
    result = client.list_runs("s", state="running", batch_size=64, limit=10)
    req = rec.requests[0]
    assert req.method == "GET" and req.url.path == "/v1/studies/s/runs"
    assert dict(req.url.params) == {"state": "running", "batch_size": "64", "limit": "10", "offset": "0"}
    assert req.headers["Authorization"] == "Bearer k-123"
    assert isinstance(result, Page) and isinstance(result.items[0], Run)
    assert result.items[0].recipe.stages[0].batch_size == 64


def test_report_batch_sends_nan_losses():
    rec = Recorder(lambda r: httpx.Response(200, json={"run": RUN, "should_stop": True, "reason": "loss is nan"}))
    out = sync_client(rec).report_batch(7, [(0, 2.5), {"step": 1, "loss": float("nan"), "grad_norm": 1.0}])
    assert out.should_stop and out.reason == "loss is nan"
    sent = json.loads(rec.requests[0].content)  # Python's json reads the NaN token, as the service does
    assert sent["reports"][0] == {"step": 0, "loss": 2.5}
    assert math.isnan(sent["reports"][1]["loss"])
    assert rec.requests[0].url.path == "/v1/runs/7/reports"


def test_a_malformed_success_body_is_an_api_response_error():
    rec = Recorder(httpx.Response(200, json={"name": "s"}))
    with pytest.raises(APIResponseError):
        sync_client(rec).get_study("s")


def test_bad_input_is_refused_before_sending():
    rec = Recorder(httpx.Response(200, json=STUDY))
    client = sync_client(rec)
    with pytest.raises(pydantic.ValidationError):
        client.recommend({"model": {"params": 10}, "reference": {"batch_size": 8, "lr": -1, "steps": 10},
                          "target": {"batch_size": 64}})
    with pytest.raises(ValueError, match="study name"):
        client.get_study("../admin")
    with pytest.raises(ValueError, match="exactly one"):
        client.create_run("s")
    with pytest.raises(ValueError):
        Client("ftp://x")
    assert rec.requests == []


def test_schedule_plot_and_csv_and_delete():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("schedule.svg"):
            return httpx.Response(200, content=b"<svg/>", headers={"content-type": "image/svg+xml"})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, text="id,number\n7,0\n", headers={"content-type": "text/csv"})

    rec = Recorder(handler)
    client = sync_client(rec)
    req = {"model": {"params": 1000}, "reference": {"batch_size": 8, "lr": 1e-3, "steps": 100},
           "target": {"batch_size": 64}}
    assert client.schedule_plot(req, format="svg") == b"<svg/>"
    assert rec.requests[0].headers["Accept"] == "image/svg+xml"
    assert client.list_runs_csv("s").startswith("id,number")
    assert rec.requests[1].url.params["format"] == "csv"
    assert client.delete_study("s") is None
    assert "Idempotency-Key" in rec.requests[2].headers


# ---------------------------------------------------------------------------- async: same behaviour


def test_async_retries_and_idempotency_key(sleeps):
    rec = Recorder(httpx.ConnectError("down"), error(502, None), httpx.Response(201, json=RUN))

    async def go():
        async with async_client(rec, max_retries=2) as client:
            return await client.create_run("s", recipe=RECIPE)

    run = asyncio.run(go())
    assert run.id == 7 and len(rec.requests) == 3 and len(sleeps) == 2
    assert len({r.headers["Idempotency-Key"] for r in rec.requests}) == 1


@pytest.mark.parametrize("type_", sorted(ERROR_TYPES))
def test_async_error_mapping(type_, sleeps):
    rec = Recorder(error(ERROR_TYPES[type_], type_))

    async def go():
        await async_client(rec, max_retries=1).get_run(7)

    with pytest.raises(ERROR_CLASSES[type_]):
        asyncio.run(go())
    status = ERROR_TYPES[type_]
    assert len(rec.requests) == (2 if status in (408, 429) or status >= 500 else 1)


def test_async_pagination():
    pages = [{"items": [STUDY, STUDY], "total": 3, "limit": 2, "offset": 0},
             {"items": [STUDY], "total": 3, "limit": 2, "offset": 2}]
    rec = Recorder(*[httpx.Response(200, json=p) for p in pages])

    async def go():
        return [s async for s in async_client(rec).iter_studies(page_size=2)]

    assert len(asyncio.run(go())) == 3
    assert [r.url.params["offset"] for r in rec.requests] == ["0", "2"]


def test_sync_and_async_clients_have_the_same_surface():
    def public(cls):
        return {n: m for n, m in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}

    sync_api, async_api = public(Client), public(AsyncClient)
    assert set(sync_api) == set(async_api)
    for name, fn in sync_api.items():
        assert inspect.signature(fn).parameters.keys() == inspect.signature(async_api[name]).parameters.keys(), name
        if name not in ("with_options", "run_channel"):  # factories, not requests
            assert inspect.iscoroutinefunction(async_api[name]) or inspect.isasyncgenfunction(async_api[name]), name


def test_with_options_shares_the_connection_pool(sleeps):
    rec = Recorder(error(503, "store_unavailable"))
    client = sync_client(rec, max_retries=5)
    with pytest.raises(StoreUnavailableError):
        client.with_options(max_retries=0).get_study("s")
    assert len(rec.requests) == 1


# ---------------------------------------------------------------------------- what a newcomer sees


def _nothing_listens() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _shown(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc))


def test_a_wrong_url_is_one_line_after_the_retries_without_a_chained_traceback(sleeps):
    url = _nothing_listens()
    with pytest.raises(APIConnectionError) as info, Client(url, max_retries=2) as client:
        client.get_study("s")
    message = str(info.value)
    assert len(sleeps) == 2 and "\n" not in message
    assert message.startswith(f"cannot reach {url} after 3 tries (GET /v1/studies/s: ")
    assert message.endswith("is `largebatch serve` running there?")
    shown = _shown(info.value)
    assert "direct cause" not in shown and "During handling" not in shown and "httpcore" not in shown
    assert isinstance(info.value.__context__, httpx.ConnectError)  # kept for whoever debugs it


def test_async_wrong_url_reads_the_same(sleeps):
    url = _nothing_listens()

    async def go():
        async with AsyncClient(url, max_retries=1) as client:
            await client.get_run(7)

    with pytest.raises(APIConnectionError) as info:
        asyncio.run(go())
    assert str(info.value).startswith(f"cannot reach {url} after 2 tries (GET /v1/runs/7: ")
    assert "direct cause" not in _shown(info.value)


def test_a_timeout_names_the_url_and_a_single_try_no_count(sleeps):
    rec = Recorder(httpx.ReadTimeout("read timed out"))
    with pytest.raises(APITimeoutError) as info:
        sync_client(rec, max_retries=0).get_study("s")
    assert str(info.value) == (f"no answer from {BASE} (GET /v1/studies/s: read timed out, timed out): "
                               "is `largebatch serve` running there, and not overloaded?")


def test_requests_are_not_logged_at_info(caplog):
    """`logging.basicConfig(level=logging.INFO)` shows a job's progress, not a line per request."""
    caplog.set_level("INFO")
    sync_client(Recorder(httpx.Response(200, json=STUDY))).get_study("s")
    assert not [r for r in caplog.records if r.name.startswith("httpx")]


def test_an_application_that_set_httpxs_level_keeps_it():
    import logging

    log = logging.getLogger("httpx")
    before = log.level
    try:
        log.setLevel(logging.INFO)
        _base._quiet_httpx()
        assert log.level == logging.INFO
        log.setLevel(logging.NOTSET)
        _base._quiet_httpx()
        assert log.level == logging.WARNING
    finally:
        log.setLevel(before)
