"""The job's reporter thread, with the defaults users get, against the real service app in-process.

The transport is an ``httpx.MockTransport`` whose handler hands each request to the app through
Starlette's TestClient (the service's own code and a real SQLite store answer; no uvicorn, no torch),
and records what was sent when, or answers a scripted failure first.
"""

from __future__ import annotations

import inspect
import math
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from largebatch.client import Client, Job, Recipe
from largebatch.service.app import create_app
from largebatch.service.settings import Settings

REQUEST = {"model": {"params": 340_000_000},
           "reference": {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125, "steps": 1_000_000},
           "target": {"batch_size": 32768}}
DEFAULTS = {name: p.default for name, p in inspect.signature(Job).parameters.items()
            if p.default is not inspect.Parameter.empty}
FLUSH = DEFAULTS["flush_interval"]


class Service:
    """The app behind a MockTransport; ``sent`` logs (monotonic time, method, path) of every request."""

    def __init__(self, tc: TestClient) -> None:
        self.tc = tc
        self.sent: list[tuple[float, str, str]] = []
        self.fail_reports = 0  # answer this many report requests with 503 first
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.sent.append((time.monotonic(), request.method, request.url.path))
            if request.url.path.endswith("/reports") and self.fail_reports > 0:
                self.fail_reports -= 1
                return httpx.Response(503, headers={"Retry-After": "0"},
                                      json={"type": "store_unavailable", "detail": "try again"})
        r = self.tc._transport.handle_request(request)
        return httpx.Response(r.status_code, headers=r.headers, content=r.read())

    def posts(self, suffix: str) -> list[float]:
        with self._lock:
            return [t for t, method, path in self.sent if method == "POST" and path.endswith(suffix)]


@pytest.fixture
def service(tmp_path):
    app = create_app(Settings(store_url=f"sqlite:///{tmp_path / 'store.db'}", open_mode=True))
    with TestClient(app, base_url="http://localhost") as tc:
        yield Service(tc)


@pytest.fixture
def client(service):
    with Client("http://localhost", http_client=httpx.Client(transport=httpx.MockTransport(service))) as c:
        yield c


def open_job(client: Client, study: str, **options) -> Job:
    client.create_study(study, model_params=340_000_000)
    out = client.recommend(REQUEST, study=study, start_run=True)
    recipe = Recipe.model_validate(out.model_dump(exclude={"run", "variants", "variant_runs"}))
    return Job(client, out.run, recipe, **options)


def wait_for(predicate, timeout: float) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.005)
    return None


def test_defaults_are_what_the_docs_say():
    assert DEFAULTS["flush_interval"] == 1.0 and DEFAULTS["heartbeat_interval"] == 60.0


def test_a_report_leaves_within_flush_interval_not_at_the_heartbeat(client, service):
    with open_job(client, "prompt") as job:
        job.report(0, 2.5)
        # The service has it, mid-training, a flush interval later (not at the heartbeat, 60 s away).
        took = wait_for(lambda: client.get_run(job.run.id).last_step == 0, timeout=10 * FLUSH)
        assert took is not None, "the report did not arrive"
        assert took <= FLUSH + 0.5, f"the report arrived {took:.2f}s after it was made"
        assert not service.posts("/heartbeat")
        # A second report, after the first was delivered, leaves on its own schedule too.
        job.report(1, 2.4)
        assert wait_for(lambda: client.get_run(job.run.id).last_step == 1, timeout=10 * FLUSH) is not None
        job.complete(2.3)
    assert len(service.posts("/reports")) == 2


def test_reports_within_one_flush_interval_go_in_one_request(client, service):
    with open_job(client, "batched") as job:
        for step in range(50):
            job.report(step, 3.0 - step * 0.01)
        assert job.flush(timeout=10 * FLUSH)
        assert len(service.posts("/reports")) == 1
        job.complete(2.0)
    assert client.get_run(job.run.id).last_step == 49


def test_should_stop_follows_a_diverged_report_within_two_flush_intervals(client, service):
    with open_job(client, "nan") as job:
        job.report(0, 2.5)
        job.report(1, float("nan"))
        took = wait_for(lambda: job.should_stop, timeout=10 * FLUSH)
        assert took is not None, "should_stop never came"
        assert took <= 2 * FLUSH, f"should_stop came {took:.2f}s after the NaN"
        assert "nan" in (job.stop_reason or "").lower()
    run = client.get_run(job.run.id)
    assert run.state == "diverged" and run.diverged_step == 1


def test_transient_failures_are_retried_and_nothing_is_lost(client, service):
    service.fail_reports = 2
    with open_job(client, "flaky") as job:
        for step in range(5):
            job.report(step, 2.0)
        assert job.flush(timeout=30)
        assert job.delivered == 5 and job.pending == 0
        job.complete(1.9)
    assert len(service.posts("/reports")) == 3  # two 503s, then the batch
    assert client.get_run(job.run.id).last_step == 4


def test_a_report_the_service_refuses_for_good_is_dropped_not_retried(client, service):
    job = open_job(client, "finished")
    client.complete_run(job.run.id, outcome="failed", reason="finished elsewhere")
    job.report(0, math.pi)
    assert job.flush(timeout=10 * FLUSH)
    assert job.refused is not None and job.refused.status_code == 409
    assert len(service.posts("/reports")) == 1
    job.close()


def test_progress_line_every_n_steps_on_the_client_logger(client, service, caplog):
    assert DEFAULTS["progress_every"] == 100
    caplog.set_level("INFO", logger="largebatch.client")
    with open_job(client, "progress", progress_every=2) as job:
        total = job.recipe.total_steps
        for step in range(5):
            job.report(step, 3.0 - step / 10)
        job.complete(2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "largebatch.client" and "step" in r.getMessage()
             and r.levelname == "INFO"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"largebatch: step 2/{total} loss 2.9 lr ") and lines[0].endswith("eta ?")
    assert lines[1].startswith(f"largebatch: step 4/{total} loss 2.7 lr {job.lr_at(3):.3g} eta ")
    assert lines[1].split("eta ")[1].endswith((" s", " min", " h"))


def test_noise_scale_reports_reach_the_run(client, service):
    with open_job(client, "noise") as job:
        job.report(0, 3.0, noise_scale=-5.0)  # an estimate not meaningful yet: left out, the report kept
        job.report(1, 2.9, noise_scale=float("inf"))
        assert job.flush(timeout=10 * FLUSH)
        assert client.get_run(job.run.id).noise_scale is None and client.get_run(job.run.id).last_step == 1
        job.report(2, 2.8, noise_scale=1234.5)
        job.report(3, 2.7)
        assert job.flush(timeout=10 * FLUSH)
        job.complete(2.5)
    run = client.get_run(job.run.id)
    assert run.noise_scale == 1234.5 and run.last_step == 3


def test_a_stop_that_arrives_during_the_vote_waits_for_the_next_report(client, service, monkeypatch):
    """Under several ranks ``should_stop`` is what all ranks voted: a stop the reporter thread learns
    while the all-reduce runs must not make rank 0 alone leave the loop (its peers would wait in their
    next collective for good); it is voted at the next report."""
    from largebatch.client import _dist

    votes: list[bool] = []
    with open_job(client, "vote") as job:
        job.world_size = 2

        def agree(loss, grad_norm, stop, skipped, examples=None):  # rank 1 saw nothing: the verdict is this rank's vote
            votes.append(stop)
            job._note_run(job.run, True, "the service says stop")  # the reporter thread, meanwhile
            return float(loss), grad_norm, stop, skipped

        monkeypatch.setattr(_dist, "agree", agree)
        job.report(0, 2.5)
        assert votes == [False] and not job.should_stop  # what rank 1 knows too
        job.report(1, 2.4)
        assert votes == [False, True] and job.should_stop
